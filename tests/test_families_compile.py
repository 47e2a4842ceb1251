"""U-ViT / PixArt-α / DiT at 1024 tokens through the compiler and the runtimes: ONNX vs eager at every t,
torch-backend engines vs eager, ONNX-counted FLOPs, ``dyc run`` end to end (CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_families import pixart_config, uvit_config

from dyc.backends.eager import EagerBackend
from dyc.backends.torch_sliced import TorchBackend
from dyc.bundle import Bundle
from dyc.checkpoint import save_checkpoint
from dyc.cli import main
from dyc.compiler.compile import compile_checkpoint
from dyc.compiler.verify import verify_bundle
from dyc.config import ModelConfig
from dyc.families import mixed_conditions
from dyc.runtime.pipeline import Pipeline, bundle_scheduler
from dyc.synth import synth_metadata, synthesize

CONFIGS = {
    "uvit-uncond": uvit_config(),
    "uvit-cond": uvit_config(num_classes=10, in_channels=4, final_conv=False, vae_scale=8),
    "pixart": pixart_config(),
    # DiT at 512 px's token count: 64x64 latents, patch 2 -> 1024 tokens
    "dit-1024": ModelConfig(input_size=64, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                            num_classes=10),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def compiled(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    model, info = synthesize(CONFIGS[request.param], 0.6, token_keep=0.7)
    ckpt = save_checkpoint(model, d / "m.safetensors", metadata=synth_metadata(info))
    r = compile_checkpoint(ckpt, d / "m.dyc", steps=10, calib=1, calib_steps=4)
    return request.param, model, ckpt, r


def test_onnx_matches_eager_at_every_t(compiled):
    _, model, _, r = compiled
    assert len(r.plan.groups) > 1  # union engines with mask inputs, not one full-width graph
    rep = verify_bundle(r.path)
    assert rep.ok, rep.format()
    assert sum(g.timesteps for g in rep.groups) >= 10


def test_onnx_counted_flops_equal_realized_ratio(compiled):
    _, _, _, r = compiled
    lam = r.manifest["lambda"]
    assert lam["onnx_counted"] == pytest.approx(lam["realized"], rel=1e-9)
    assert lam["realized"] < 0.95


def _torch_engines_match_eager(b: Bundle, tb: TorchBackend, eb: EagerBackend, rtol: float) -> None:
    sched = bundle_scheduler(b)
    gen = torch.Generator().manual_seed(0)
    cfg = b.config
    for t in b.schedule[::3]:
        x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
        y = mixed_conditions(eb.model, 2, gen)
        for omit in (False, True):  # masked and mask-free forms
            g, feeds = sched.inputs(t, x, y, omit_full_masks=omit)
            out, ref = tb.run_group(g.index, feeds).cpu(), eb.run_group(g.index, feeds)
            assert (out - ref).abs().max() <= rtol * ref.abs().max(), (t, omit)


def test_torch_backend_matches_eager(compiled):
    _, _, _, r = compiled
    b = Bundle.load(r.path)
    _torch_engines_match_eager(b, TorchBackend(b, device="cpu"), EagerBackend(b), 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the engines' CUDA graphs and kernels)")
def test_torch_backend_on_cuda_matches_eager_in_fp32(compiled, monkeypatch):
    """The CUDA engines (channels-last patch embedding, CUDA graphs, every MLP form of a DiT) in fp32 against
    the eager model on the CPU. cuDNN's TF32 convolutions are switched off: the check is of the engines'
    maths, at fp32's tolerance."""
    from dyc.backends.torch_sliced import MLP_MODES

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    _, _, _, r = compiled
    b = Bundle.load(r.path)
    eb = EagerBackend(b)
    for mode in MLP_MODES if b.config.family == "dit" else (None,):  # U-ViT / PixArt-α: their one form
        if mode:
            monkeypatch.setenv("DYC_MLP_MODE", mode)
        _torch_engines_match_eager(b, TorchBackend(b, device="cuda", dtype="fp32"), eb, 1e-4)


def test_dyc_run_end_to_end_across_backends(compiled, tmp_path, capsys):
    name, model, _, r = compiled
    cfg = model.config
    rng = np.random.default_rng(0)
    np.save(tmp_path / "noise.npy", rng.standard_normal((2, cfg.in_channels, cfg.input_size, cfg.input_size))
            .astype(np.float32))
    args = ["--noise", str(tmp_path / "noise.npy"), "--steps", "4"]
    if cfg.family == "pixart":
        np.save(tmp_path / "text.npy", (0.15 * rng.standard_normal((2, cfg.text_len, cfg.text_channels)))
                .astype(np.float32))
        args += ["--text-emb", str(tmp_path / "text.npy")]
    elif cfg.conditional:
        args += ["--classes", "1,7"]
    else:
        args += ["--num-samples", "2"]
    lat = {}
    for backend in ("onnxruntime", "torch", "eager"):
        out = tmp_path / backend
        assert main(["run", str(r.path), *args, "--backend", backend, "--device", "cpu", "-o", str(out),
                     "--save-latents", str(out / "lat.npy")]) == 0
        lat[backend] = np.load(out / "lat.npy")
        rec = json.loads((out / "run.json").read_text())
        assert rec["cfg"] == (4.0 if cfg.conditional else 1.0)  # unconditional: no guidance
    for backend in ("onnxruntime", "torch"):
        assert np.abs(lat[backend] - lat["eager"]).max() <= 1e-4 * np.abs(lat["eager"]).max()
    if cfg.vae_scale == 1:
        assert (tmp_path / "eager" / "0001.png").is_file()


def test_family_inputs_are_checked(compiled, capsys):
    _, model, _, r = compiled
    cfg = model.config
    pipe = Pipeline.load(r.path, backend="onnxruntime")
    if cfg.family == "pixart":
        assert main(["run", str(r.path), "--classes", "1"]) == 2
        assert "takes no class ids" in capsys.readouterr().err
        with pytest.raises(Exception, match=r"expected \[num_samples, 6, 32\]"):
            pipe(text_emb=np.zeros((1, 5, 32), np.float32))
    elif not cfg.conditional:
        assert main(["run", str(r.path), "--classes", "1"]) == 2
        assert "unconditional" in capsys.readouterr().err
    else:
        with pytest.raises(Exception, match="not a text-to-image model"):
            pipe([1], text_emb=np.zeros((1, 6, 32), np.float32))


def test_bench_rows_checked_against_eager(compiled):
    """`dyc bench`'s torch rows for the family: the compiled DyDiT-family model and its compiled static
    model, each checked against eager before timing (CPU: fp32, no graphs)."""
    from dyc.bench import run_bench

    name, model, ckpt, _ = compiled
    if name == "dit-1024":
        pytest.skip("DiT's bench rows are tested in test_bench.py; 1024 tokens only add time here")
    rep = run_bench(ckpt, backends=["torch"], batch=2, steps=4, dtype="fp32", device="cpu", repeats=1)
    rows = {r["backend"]: r for r in rep["rows"]}
    for r in ("torch", "torch-static"):
        assert rows[r]["status"] == "ok" and rows[r]["rel_l2_err"] < 1e-5, rows[r]
    assert rows["torch"]["speedup_vs_static"] is not None
    assert rows["torch"]["gflops_per_step"] < rows["torch-static"]["gflops_per_step"]
    assert rep["cfg"] == model.config.conditional
