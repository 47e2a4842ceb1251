"""Model families beyond DiT that DyDiT applies to (the paper's appendix B): U-ViT and PixArt-α.

A family is one module (``dyc.families.uvit``, ``dyc.families.pixart``) that gives, for its
official checkpoint layout: the eager model with the official masked DyDiT semantics (the
reference), config inference from weight shapes, the official configs by name, a FLOPs breakdown,
the inputs it is conditioned on, and the hooks synth needs. Its ONNX export and its torch-backend
engines live beside (``dyc.families.*_onnx``, ``dyc.backends.torch_*``). DiT itself stays in
``dyc.model``; every shared pass asks this package only where a family differs (``cfg.family``).

Conditioning, one tensor ``y`` per call in every family: class ids [B] int64 (DiT, class-conditional
U-ViT; the null class ``num_classes`` for guidance), text embeddings [B, T, C_text] float (PixArt-α;
the null is the model's ``y_embedding``); an unconditional U-ViT ignores ``y``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType

import torch

from ..errors import DycError

_MODULES = {"uvit": "dyc.families.uvit", "pixart": "dyc.families.pixart"}


def family_module(family: str) -> ModuleType:
    """The module of a non-DiT family."""
    if family not in _MODULES:
        raise DycError(f"unknown model family {family!r}: one of dit, {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[family])


def detect_family(sd: Mapping[str, torch.Tensor]) -> str:
    """Which family an official-layout state dict is, by its key names."""
    if "mid_block.attn.qkv.weight" in sd or "in_blocks.0.attn.qkv.weight" in sd:
        return "uvit"
    if "t_block.1.weight" in sd or "y_embedder.y_proj.fc1.weight" in sd:
        return "pixart"
    return "dit"


def parse_family_name(name: str, image_size: int | None):
    """A U-ViT / PixArt-α name -> its official config, or None for a name of another family."""
    for mod in _MODULES.values():
        cfg = importlib.import_module(mod).parse_name(name, image_size)
        if cfg is not None:
            return cfg
    return None


def build_model(cfg) -> torch.nn.Module:
    """The eager model of any family (DiT: ``dyc.model.DyDiT``)."""
    if cfg.family == "dit":
        from ..model import DyDiT

        return DyDiT(cfg)
    return family_module(cfg.family).build(cfg)


def sample_conditions(model: torch.nn.Module, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random conditions of the model's kind and the null condition of the same shape (the
    guided half of a CFG batch). DiT: uniform class ids and the null class."""
    cfg = model.config
    if cfg.family == "dit":
        y = torch.randint(0, cfg.num_classes, (n,), generator=generator)
        return y, torch.full_like(y, cfg.num_classes)
    return family_module(cfg.family).sample_conditions(model, n, generator)


def mixed_conditions(model: torch.nn.Module, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random conditions, every other one the null condition (checks cover both)."""
    y, null = sample_conditions(model, n, generator)
    y = y.clone()
    y[1::2] = null[1::2]
    return y


def null_condition(cfg, like: torch.Tensor, null_embedding: torch.Tensor | None = None) -> torch.Tensor:
    """The null condition shaped like ``like``: the null class id, or the null text embedding."""
    if cfg.family == "pixart":
        if null_embedding is None:
            raise DycError("guidance of a PixArt model needs its null text embedding (y_embedding)")
        return null_embedding.to(device=like.device, dtype=like.dtype).expand_as(like)
    return torch.full_like(like, cfg.num_classes)


def router_flops(cfg) -> float:
    """MACs of the DyDiT routers per image: TDW (C → H−1, twice per block) and token (C → C/16 → 1 per token)."""
    c, n = cfg.hidden_size, cfg.num_tokens
    return cfg.depth * (2 * c * (cfg.num_heads - 1) + n * (c * cfg.token_hidden + cfg.token_hidden))


__all__ = ["build_model", "detect_family", "family_module", "mixed_conditions", "null_condition",
           "parse_family_name", "router_flops", "sample_conditions"]
