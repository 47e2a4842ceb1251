"""Diffusers-format DiT checkpoints (``DiTTransformer2DModel``), read into the official layout.

diffusers keeps a DiT as ``transformer/diffusion_pytorch_model.safetensors`` with ``transformer/config.json``
beside it (e.g. ``facebook/DiT-XL-2-256``), under its own names. This is the inverse of diffusers' own
``scripts/convert_dit_to_diffusers.py``:

=====================================================  ===============================================
diffusers                                              official DiT
=====================================================  ===============================================
``pos_embed.proj.*``                                   ``x_embedder.proj.*``
``transformer_blocks.0.norm1.emb.timestep_embedder``   ``t_embedder.mlp.0`` / ``.mlp.2``
``.linear_1`` / ``.linear_2``
``transformer_blocks.0.norm1.emb.class_embedder``      ``y_embedder.embedding_table`` (last row: null class)
``transformer_blocks.i.norm1.linear.*``                ``blocks.i.adaLN_modulation.1.*``
``transformer_blocks.i.attn1.to_q|to_k|to_v.*``        ``blocks.i.attn.qkv.*`` (concatenated q, k, v)
``transformer_blocks.i.attn1.to_out.0.*``              ``blocks.i.attn.proj.*``
``transformer_blocks.i.ff.net.0.proj.*`` / ``.net.2``  ``blocks.i.mlp.fc1.*`` / ``.fc2.*``
``proj_out_1.*`` / ``proj_out_2.*``                    ``final_layer.adaLN_modulation.1.*`` / ``.linear.*``
=====================================================  ===============================================

What is not a renaming:

* diffusers stores the timestep and class embedders once per block (all copies equal: checked here);
* it does not store the fixed sin-cos position table: it is rebuilt from ``config.json`` (``sample_size``);
* its forward differs from the official DiT's in two conventions the weights were not trained with: the
  timestep features use ``Timesteps(flip_sin_to_cos=True, downscale_freq_shift=1)`` (frequencies
  10000^(-k/127) instead of DiT's 10000^(-k/128)) and the LayerNorm before the MLP has eps 1e-5 (DiT: 1e-6).
  The weights of ``facebook/DiT-XL-2-*`` are the official ones, converted; dyc runs them with the official
  semantics, so its outputs equal the official DiT's, and diffusers' only up to those two conventions
  (tests/test_diffusers_format.py checks both statements).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import DycError

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
_EMB = "transformer_blocks.{i}.norm1.emb."


def is_diffusers_dit(sd: Mapping[str, torch.Tensor]) -> bool:
    return "pos_embed.proj.weight" in sd and "transformer_blocks.0.attn1.to_q.weight" in sd


def directory_hint(path: Path) -> str | None:
    """For a diffusers model or pipeline directory: which file to give instead."""
    for d in (path, path / "transformer"):
        for name in WEIGHTS_NAMES:
            if (d / name).is_file():
                return f"{path}: a diffusers directory; give its weights file: {d / name}"
    return None


def read_config(weights: Path) -> dict:
    """``config.json`` beside the weights, checked to describe a DiT (class-conditional, adaLN-Zero)."""
    path = weights.parent / CONFIG_NAME
    if not path.is_file():
        raise DycError(f"{weights}: a diffusers DiT needs the {CONFIG_NAME} beside it (for sample_size and the "
                       "head count), and there is none")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DycError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("_class_name") not in _CLASSES:
        raise DycError(f"{path}: not a DiT transformer config (_class_name {cfg.get('_class_name')!r}, expected "
                       f"{' or '.join(_CLASSES)})")
    if cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or cfg.get("num_embeds_ada_norm") is None:
        raise DycError(f"{path}: not a class-conditional DiT (norm_type {cfg.get('norm_type')!r}, "
                       f"num_embeds_ada_norm {cfg.get('num_embeds_ada_norm')!r})")
    for key in ("sample_size", "patch_size", "num_attention_heads"):
        if not isinstance(cfg.get(key), int):
            raise DycError(f"{path}: {key} missing or not an integer")
    return cfg


def to_official_layout(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str], weights: Path
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The official-layout state dict of a diffusers DiT, and metadata carrying its head count."""
    from .model import sincos_pos_embed

    cfg = read_config(weights)
    src = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        try:
            return src.pop(name)
        except KeyError:
            raise DycError(f"{weights}: diffusers DiT without {name!r}") from None

    depth = 0
    while f"transformer_blocks.{depth}.attn1.to_q.weight" in src:
        depth += 1
    shared = {"timestep_embedder.linear_1": "t_embedder.mlp.0", "timestep_embedder.linear_2": "t_embedder.mlp.2",
              "class_embedder.embedding_table": "y_embedder.embedding_table"}
    for d_name, o_name in shared.items():
        for p in (("weight",) if "embedding_table" in d_name else ("weight", "bias")):
            first = take(_EMB.format(i=0) + f"{d_name}.{p}")
            for i in range(1, depth):  # the per-block copies must all be the same module's
                if not torch.equal(take(_EMB.format(i=i) + f"{d_name}.{p}"), first):
                    raise DycError(f"{weights}: block {i}'s {d_name} differs from block 0's; the official layout "
                                   "has one timestep/class embedder for all blocks")
            out[f"{o_name}.{p}"] = first
    for p in ("weight", "bias"):
        out[f"x_embedder.proj.{p}"] = take(f"pos_embed.proj.{p}")
        out[f"final_layer.adaLN_modulation.1.{p}"] = take(f"proj_out_1.{p}")
        out[f"final_layer.linear.{p}"] = take(f"proj_out_2.{p}")
        for i in range(depth):
            d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
            out[f"{o}adaLN_modulation.1.{p}"] = take(f"{d}norm1.linear.{p}")
            out[f"{o}attn.qkv.{p}"] = torch.cat([take(f"{d}attn1.to_{x}.{p}") for x in "qkv"])
            out[f"{o}attn.proj.{p}"] = take(f"{d}attn1.to_out.0.{p}")
            out[f"{o}mlp.fc1.{p}"] = take(f"{d}ff.net.0.proj.{p}")
            out[f"{o}mlp.fc2.{p}"] = take(f"{d}ff.net.2.{p}")
    if src:
        names = sorted(src)
        raise DycError(f"{weights}: keys a DiT does not have: {', '.join(names[:6])}"
                       + (f" (+{len(names) - 6} more)" if len(names) > 6 else ""))
    width = out["x_embedder.proj.weight"].shape[0]
    grid, rem = divmod(cfg["sample_size"], cfg["patch_size"])
    if rem:
        raise DycError(f"{weights.parent / CONFIG_NAME}: sample_size {cfg['sample_size']} is not a multiple of "
                       f"patch_size {cfg['patch_size']}")
    out["pos_embed"] = torch.from_numpy(sincos_pos_embed(width, grid)).float().unsqueeze(0)
    meta = dict(metadata)
    meta["dyc.config"] = json.dumps({"num_heads": cfg["num_attention_heads"]})
    meta["dyc.source_format"] = f"diffusers {cfg['_class_name']}"
    return out, meta
