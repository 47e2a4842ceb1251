"""FLOPs in the DiT/DyDiT papers' convention: one multiply-accumulate counts as one FLOP (DESIGN.md §2).

Counted: every Linear/Conv and the two attention matmuls (Q·Kᵀ, A·V). Not counted: softmax,
norms, activations, elementwise ops (as fvcore, which the papers used, does not count them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .model import FREQ_DIM


def attn_flops_per_head(cfg: ModelConfig) -> float:
    """qkv rows, Q·Kᵀ, A·V and proj columns of one head, per image."""
    n, c, d = cfg.num_tokens, cfg.hidden_size, cfg.head_dim
    return 3 * n * c * d + 2 * n * n * d + n * d * c


def mlp_flops_per_group(cfg: ModelConfig) -> float:
    """fc1 rows + fc2 columns of one channel group, per image, all tokens kept."""
    return 2 * cfg.num_tokens * cfg.hidden_size * cfg.group_size


@dataclass(frozen=True)
class FlopsBreakdown:
    """MACs per image per forward, by part. ``attn + mlp`` is the part the ratio λ is defined over."""

    embed: float  # patch embedding + timestep MLP
    adaln: float  # all adaLN modulations (blocks + final)
    attn: float
    mlp: float
    routers: float  # TDW routers + token routers (dynamic only)
    final: float  # final linear
    # what other families add outside MHSA+MLP: U-ViT's skip linears, PixArt-α's cross-attention and
    # text projection (dyc.families); 0 for DiT
    other: float = 0.0

    @property
    def blocks(self) -> float:
        return self.attn + self.mlp

    @property
    def total(self) -> float:
        return self.embed + self.adaln + self.attn + self.mlp + self.routers + self.final + self.other

    def to_dict(self) -> dict:
        return {k: getattr(self, k) / 1e9 for k in ("embed", "adaln", "attn", "mlp", "routers", "final", "other",
                                                     "total")}


def _fixed_parts(cfg: ModelConfig, dynamic: bool) -> dict[str, float]:
    """MACs outside MHSA+MLP, by part (``FlopsBreakdown``'s other fields)."""
    if cfg.family != "dit":
        from .families import family_module

        return family_module(cfg.family).fixed_flops(cfg, dynamic)
    n, c, p = cfg.num_tokens, cfg.hidden_size, cfg.patch_size
    embed = n * c * cfg.in_channels * p * p + FREQ_DIM * c + c * c
    adaln = cfg.depth * 6 * c * c + 2 * c * c
    final = n * c * p * p * cfg.out_channels
    routers = 0.0
    if dynamic:
        per_block = 2 * c * (cfg.num_heads - 1) + n * (c * cfg.token_hidden + cfg.token_hidden)
        routers = cfg.depth * per_block
    return {"embed": embed, "adaln": adaln, "final": final, "routers": routers}


def static_breakdown(cfg: ModelConfig) -> FlopsBreakdown:
    """The full-width DiT (no routers, every head, group and token)."""
    h = cfg.num_heads
    return FlopsBreakdown(
        attn=cfg.depth * h * attn_flops_per_head(cfg), mlp=cfg.depth * h * mlp_flops_per_group(cfg),
        **_fixed_parts(cfg, dynamic=False),
    )


def static_gflops(cfg: ModelConfig) -> float:
    return static_breakdown(cfg).total / 1e9


def _keep_array(token_keep, t: int, depth: int) -> np.ndarray:
    k = np.asarray(token_keep, dtype=np.float64)
    if k.ndim == 0:
        return np.full((t, depth), float(k))
    if k.ndim == 1:
        return np.broadcast_to(k[None, :], (t, depth))
    return np.broadcast_to(k, (t, depth))


def block_flops(
    cfg: ModelConfig, head_mask: np.ndarray, channel_mask: np.ndarray, token_keep: float | np.ndarray = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Attention and MLP MACs per t, summed over layers: masks [T, L, H] of 0/1.

    ``token_keep`` is the share of tokens the MLP runs on: a scalar, per layer [L], or [T, L].
    """
    head_mask = np.asarray(head_mask, dtype=np.float64)
    channel_mask = np.asarray(channel_mask, dtype=np.float64)
    keep = _keep_array(token_keep, head_mask.shape[0], cfg.depth)
    attn = head_mask.sum(-1) * attn_flops_per_head(cfg)  # [T, L]
    mlp = channel_mask.sum(-1) * keep * mlp_flops_per_group(cfg)
    return attn.sum(-1), mlp.sum(-1)


def dynamic_flops(
    cfg: ModelConfig, head_mask: np.ndarray, channel_mask: np.ndarray, token_keep: float | np.ndarray = 1.0
) -> np.ndarray:
    """Total MACs per image per forward at each t (routers included): shape [T]."""
    attn, mlp = block_flops(cfg, head_mask, channel_mask, token_keep)
    fixed = _fixed_parts(cfg, dynamic=cfg.dynamic)
    return attn + mlp + sum(fixed.values())


def flops_ratio(
    cfg: ModelConfig, head_mask: np.ndarray, channel_mask: np.ndarray, token_keep: float | np.ndarray = 1.0,
    timesteps: Sequence[int] | None = None,
) -> float:
    """λ: dynamic MHSA+MLP MACs over static, averaged over ``timesteps`` (default: every t given)."""
    attn, mlp = block_flops(cfg, head_mask, channel_mask, token_keep)
    per_t = (attn + mlp) / static_breakdown(cfg).blocks
    if timesteps is not None:
        per_t = per_t[np.asarray(list(timesteps))]
    return float(per_t.mean())


def fvcore_gflops(cfg: ModelConfig) -> float:
    """Static GFLOPs as fvcore's tracer counts the family's official code, the way the DyDiT paper's
    tables were made: this convention plus LayerNorms (4 per element without affine, 5 with), minus
    attention matmuls that the official code runs in fused kernels fvcore does not count (U-ViT,
    PixArt-α). DiT's official attention multiplies explicitly, so only the norms are added."""
    if cfg.family != "dit":
        from .families import family_module

        return family_module(cfg.family).fvcore_gflops(cfg)
    norms = (2 * cfg.depth + 1) * cfg.num_tokens * cfg.hidden_size * 4
    return (static_breakdown(ModelConfig(**{**cfg.to_dict(), "dynamic": False})).total + norms) / 1e9
