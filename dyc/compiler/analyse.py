"""Pass 1, analyse: TDW masks for every t, SDT keep rates by calibration, FLOPs per t.

Calibration choice (documented in docs/bundle.md): ``samples`` Gaussian latents with random
class labels follow a deterministic DDIM (eta = 0) trajectory of the eager model itself, with
classifier-free guidance (scale 4.0, DiT's sample.py default) so that every model call sees the
batch the runtime will run: the conditional half and the null-class half. The trajectory visits
at most ``calib_steps`` timesteps, evenly picked from the grouping schedule (first and last
included); the keep rate of a (t, layer) is the share of kept tokens over that whole batch.
Keep rates at other t are linearly interpolated in t (held constant beyond the ends), which is
what the FLOPs per t of all 1000 timesteps use.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ModelConfig
from ..families import sample_conditions
from ..flops import block_flops, dynamic_flops
from ..model import DyDiT
from ..noise_schedule import linear_alphas_cumprod
from .plan import NUM_T

Progress = Callable[[str], None]

DEFAULT_CALIB_STEPS = 10
DEFAULT_CFG_SCALE = 4.0


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tdw_masks(model: DyDiT, threshold_offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Head and channel-group masks for t = 0..999, each [1000, L, H] bool.

    Uses the model's own gate (sigmoid > 0.5 on logits - offset), so masks are bit-identical
    to what the eager forward computes with the same ``threshold_offset``.
    """
    hm, cm = model.tdw_masks(torch.arange(NUM_T), threshold_offset)
    return hm.numpy() > 0.5, cm.numpy() > 0.5


def calibration_timesteps(schedule: Sequence[int], calib_steps: int) -> list[int]:
    """At most ``calib_steps`` t's evenly picked from the schedule (kept in sampling order)."""
    sched = list(schedule)
    if calib_steps >= len(sched):
        return sched
    idx = np.unique(np.round(np.linspace(0, len(sched) - 1, max(calib_steps, 2))).astype(int))
    return [sched[i] for i in idx]


@torch.no_grad()
def calibrate_keep_rates(
    model: DyDiT, timesteps: Sequence[int], samples: int, *, seed: int = 0, threshold_offset: float = 0.0,
    cfg_scale: float = DEFAULT_CFG_SCALE, progress: Progress | None = None,
) -> np.ndarray:
    """SDT keep rates [len(timesteps), L] along a guided DDIM trajectory of the eager model.

    A plain DiT keeps every token: all ones.
    """
    cfg: ModelConfig = model.config
    ts = list(timesteps)
    if not cfg.dynamic:
        return np.ones((len(ts), cfg.depth))
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(samples, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen).to(dtype)
    y, null = sample_conditions(model, samples, gen)  # DiT: uniform classes and the null class
    y_cfg = torch.cat([y, null])  # the null condition for the guided half
    abar = linear_alphas_cumprod()
    rates = np.zeros((len(ts), cfg.depth))
    for i, t in enumerate(ts):
        tt = torch.full((2 * samples,), t, dtype=torch.long)
        out, masks = model(torch.cat([x, x]), tt, y_cfg, return_masks=True, threshold_offset=threshold_offset)
        rates[i] = masks["token"].double().mean(dim=(0, 2)).numpy()
        eps_c, eps_u = out[:, : cfg.in_channels].double().chunk(2)
        eps = eps_u + cfg_scale * (eps_c - eps_u)
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        xd = x.double()
        x0 = (xd - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        x = (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps).to(dtype)
        every = max(1, len(ts) // 10)  # about ten progress lines per trajectory
        if progress and (i == 0 or (i + 1) % every == 0 or i + 1 == len(ts)):
            progress(f"calibration: step {i + 1}/{len(ts)} (t={t}), mean keep rate {rates[i].mean():.3f}")
    return rates


def keep_rates_per_t(timesteps: Sequence[int], rates: np.ndarray, num_t: int = NUM_T) -> np.ndarray:
    """Interpolate measured keep rates [len(timesteps), L] to every t: [num_t, L]."""
    ts = np.asarray(list(timesteps), dtype=np.float64)
    order = np.argsort(ts)
    ts, rates = ts[order], np.asarray(rates, dtype=np.float64)[order]
    grid = np.arange(num_t, dtype=np.float64)
    return np.stack([np.interp(grid, ts, rates[:, l]) for l in range(rates.shape[1])], axis=1)


def architectures(head: np.ndarray, channel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (head, channel) mask pairs over t.

    Returns ``arch_of_t`` [T] (indices numbered in order of first appearance in t) and the
    tables ``arch_head``, ``arch_channel`` [A, L, H] bool.
    """
    flat = np.concatenate([head.reshape(len(head), -1), channel.reshape(len(channel), -1)], axis=1)
    _, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))  # renumber by first appearance: stable across runs
    arch_of_t = rank[inverse]
    order = np.sort(first)
    return arch_of_t, head[order], channel[order]


@dataclass
class Analysis:
    """Result of the analyse pass (numpy tables; the plan stores them compactly)."""

    head: np.ndarray  # [1000, L, H] bool
    channel: np.ndarray  # [1000, L, H] bool
    keep: np.ndarray  # [1000, L] interpolated keep rates
    calib_timesteps: list[int]
    calib_rates: np.ndarray  # [len(calib_timesteps), L] measured
    flops_per_t: np.ndarray  # [1000] MACs per image per forward (all parts)
    block_flops_per_t: np.ndarray  # [1000] MHSA+MLP MACs

    @property
    def num_architectures(self) -> int:
        return len(architectures(self.head, self.channel)[1])


def flops_per_t(
    cfg: ModelConfig, head: np.ndarray, channel: np.ndarray, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    attn, mlp = block_flops(cfg, head, channel, keep)
    return dynamic_flops(cfg, head, channel, keep), attn + mlp


def analyse(
    model: DyDiT, schedule: Sequence[int], *, calib: int = 2, calib_steps: int = DEFAULT_CALIB_STEPS, seed: int = 0,
    threshold_offset: float = 0.0, cfg_scale: float = DEFAULT_CFG_SCALE, progress: Progress | None = None,
) -> Analysis:
    """Masks for t = 0..999, keep rates calibrated along ``schedule``, FLOPs per t."""
    cfg = model.config
    head, channel = tdw_masks(model, threshold_offset)
    cal_t = calibration_timesteps(schedule, calib_steps)
    rates = calibrate_keep_rates(
        model, cal_t, calib, seed=seed, threshold_offset=threshold_offset, cfg_scale=cfg_scale, progress=progress
    )
    keep = keep_rates_per_t(cal_t, rates)
    total, blocks = flops_per_t(cfg, head, channel, keep)
    return Analysis(head, channel, keep, cal_t, rates, total, blocks)
