"""Diffusers-format DiT checkpoints (DiTTransformer2DModel) load into the official layout: dyc's eager model
equals diffusers' own forward, given the official timestep features and LayerNorm eps; as shipped, diffusers
differs by exactly those two conventions (dyc/diffusers_format.py)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from dyc import model as M
from dyc.checkpoint import load_checkpoint
from dyc.cli import main
from dyc.errors import DycError

diffusers = pytest.importorskip("diffusers", reason="the reference is diffusers' own DiTTransformer2DModel")

CLASSES = 10


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random diffusers DiT (width 48, 3 heads: no official size, so the head count comes from config.json)."""
    torch.manual_seed(0)
    ref = diffusers.DiTTransformer2DModel(num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=8,
                                          num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=CLASSES)
    with torch.no_grad():  # every weight random (diffusers zero-initialises adaLN and the output layers)
        for p in ref.parameters():
            p.normal_(0.0, 0.3 if p.ndim > 1 else 0.1)
        emb0 = ref.transformer_blocks[0].norm1.emb
        for blk in ref.transformer_blocks[1:]:  # one shared embedder, as diffusers' conversion writes it
            blk.norm1.emb.load_state_dict(emb0.state_dict())
    root = tmp_path_factory.mktemp("dit") / "pipeline"
    ref.save_pretrained(root / "transformer")
    return ref.eval(), root / "transformer" / "diffusion_pytorch_model.safetensors"


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 731, 999])
    y = torch.tensor([0, 3, CLASSES, 9, CLASSES])  # CLASSES: the null class (classifier-free guidance)
    return x, t, y


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_eager_equals_diffusers_with_the_official_conventions(saved):
    ref, path = saved
    ck = load_checkpoint(path)
    cfg = ck.config
    assert (cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.input_size, cfg.num_classes) == (48, 3, 3, 8, CLASSES)
    assert not cfg.dynamic and cfg.learn_sigma and ck.metadata["dyc.source_format"].startswith("diffusers")
    x, t, y = _inputs()
    for blk in ref.transformer_blocks:  # the official DiT's conventions
        blk.norm1.emb.time_proj.downscale_freq_shift = 0
        blk.norm3.eps = 1e-6
    try:
        with torch.no_grad():
            want = ref(x, timestep=t, class_labels=y).sample
            got = ck.model(x, t, y)
    finally:
        for blk in ref.transformer_blocks:
            blk.norm1.emb.time_proj.downscale_freq_shift = 1
            blk.norm3.eps = 1e-5
    assert got.shape == want.shape == (5, 8, 8, 8)
    assert _rel(got, want) < 1e-5


def test_diffusers_as_shipped_differs_by_exactly_its_two_conventions(saved, monkeypatch):
    ref, path = saved
    ck = load_checkpoint(path)
    x, t, y = _inputs()
    with torch.no_grad():
        want = ref(x, timestep=t, class_labels=y).sample
        assert _rel(ck.model(x, t, y), want) > 1e-3  # not a rounding difference

        def shifted(tt, dim=M.FREQ_DIM, max_period=10000.0):  # diffusers' downscale_freq_shift=1
            half = dim // 2
            freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - 1))
            args = tt[:, None].float() * freqs[None]
            return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

        monkeypatch.setattr(M, "timestep_embedding", shifted)
        for blk in ck.model.blocks:
            blk.norm2.eps = 1e-5  # dyc: norm2 is the LayerNorm before the MLP
        assert _rel(ck.model(x, t, y), want) < 1e-5


def test_cli_reads_it_and_bad_layouts_fail_clearly(saved, tmp_path, capsys):
    _, path = saved
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["num_heads"] == 3 and info["config"]["hidden_size"] == 48
    # a directory: told which file to give
    with pytest.raises(DycError, match="give its weights file: .*diffusion_pytorch_model.safetensors"):
        load_checkpoint(path.parent.parent)
    # no config.json beside the weights
    lone = tmp_path / "lone" / path.name
    lone.parent.mkdir()
    shutil.copy2(path, lone)
    with pytest.raises(DycError, match="needs the config.json"):
        load_checkpoint(lone)
    # embedder copies that differ cannot be one official embedder
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    sd["transformer_blocks.2.norm1.emb.class_embedder.embedding_table.weight"] += 1.0
    bad = tmp_path / "bad" / path.name
    bad.parent.mkdir()
    shutil.copy2(path.parent / "config.json", bad.parent / "config.json")
    save_file(sd, str(bad))
    with pytest.raises(DycError, match="block 2's class_embedder"):
        load_checkpoint(bad)
