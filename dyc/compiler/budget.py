"""Pass 2, budget: fit the FLOPs ratio λ to a target with one offset on the TDW router logits.

λ = (MHSA+MLP MACs of the per-t masks, SDT keep rates included) / (same, static), averaged over
the steps of the schedule (DESIGN.md §2). Raising the offset turns heads/groups off (a router
keeps unit h iff sigmoid(logit_h - offset) > 0.5), so λ is non-increasing in the offset and
bisection finds the smallest offset that fits. The model was never trained for a non-zero
offset: the plan and manifest record ``offset_forced`` and the CLI says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DycError, UsageError
from ..flops import flops_ratio
from ..model import DyDiT
from .analyse import tdw_masks

BISECT_ITERS = 60


def realized_ratio(cfg, head: np.ndarray, channel: np.ndarray, keep: np.ndarray, schedule: Sequence[int]) -> float:
    """λ of per-t masks [1000, L, H] and keep rates [1000, L] over the schedule's steps."""
    return flops_ratio(cfg, head, channel, keep, timesteps=list(schedule))


def check_lambda(target: float | None) -> float | None:
    if target is None:
        return None
    if not (0.0 < float(target) <= 1.0) or not np.isfinite(target):
        raise UsageError(f"λ target must be in (0, 1], got {target}")
    return float(target)


@dataclass
class BudgetResult:
    target: float | None
    trained_ratio: float  # at offset 0
    ratio: float  # at the chosen offset
    offset: float
    forced: bool
    head: np.ndarray  # [1000, L, H] masks at the chosen offset
    channel: np.ndarray


def fit_budget(
    model: DyDiT, keep: np.ndarray, schedule: Sequence[int], target: float | None,
) -> BudgetResult:
    """Smallest logit offset ≥ 0 whose λ (with the given keep rates) is ≤ target.

    Without a target, or when the trained thresholds already fit, the offset stays 0.
    """
    cfg = model.config
    target = check_lambda(target)
    head, channel = tdw_masks(model, 0.0)
    trained = realized_ratio(cfg, head, channel, keep, schedule)
    if target is None or trained <= target:
        return BudgetResult(target, trained, trained, 0.0, False, head, channel)
    if not cfg.dynamic:
        raise DycError(
            f"{cfg.name} is a plain DiT (no routers): its FLOPs ratio is {trained:.3f}, it cannot meet λ={target}"
        )
    attn_logits, mlp_logits = model.router_logits(torch.arange(head.shape[0]))

    def masks(offset: float) -> tuple[np.ndarray, np.ndarray]:
        # the model's own gate on the same logits (sigmoid(logit - offset) > 0.5, float32): bit-identical
        # to tdw_masks(model, offset) without re-running the timestep MLP at every bisection step
        def gate(z: torch.Tensor) -> np.ndarray:
            m = (torch.sigmoid(z - offset) > 0.5).numpy()
            return np.concatenate([np.ones_like(m[..., :1]), m], axis=-1)

        return gate(attn_logits), gate(mlp_logits)

    hi = float(max(attn_logits.max(), mlp_logits.max())) + 1.0  # every maskable unit off above this
    h_min, c_min = masks(hi)
    floor = realized_ratio(cfg, h_min, c_min, keep, schedule)
    if floor > target:
        raise DycError(
            f"λ target {target} is unreachable: with only head 0 and channel group 0 on in every layer the "
            f"ratio is {floor:.4f}"
        )
    lo = 0.0
    for _ in range(BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        h, c = masks(mid)
        if realized_ratio(cfg, h, c, keep, schedule) <= target:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-7 * max(1.0, hi):
            break
    head, channel = tdw_masks(model, hi)
    ratio = realized_ratio(cfg, head, channel, keep, schedule)
    return BudgetResult(target, trained, ratio, hi, True, head, channel)
