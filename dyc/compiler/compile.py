"""The compile driver: checkpoint -> analyse -> budget -> group -> slice/export -> bundle."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import Checkpoint, load_checkpoint
from ..errors import UsageError
from ..timesteps import check_sampler, sampler_timesteps
from .analyse import (
    DEFAULT_CALIB_STEPS,
    DEFAULT_CFG_SCALE,
    analyse,
    architectures,
    calibrate_keep_rates,
    keep_rates_per_t,
)
from .budget import check_lambda, fit_budget
from .bundle import check_output, write_bundle
from .export import check_dtype
from .group import compiled_ratio, format_table, partition
from .plan import Architecture, Plan, mask_to_bits
from .slice import reorder_groups

Progress = Callable[[str], None]
MAX_RECALIBRATIONS = 2  # a forced offset changes the trajectory, so keep rates are re-measured


@dataclass
class CompileResult:
    path: Path
    plan: Plan
    manifest: dict
    table: str
    seconds: float


def _source_info(ck: Checkpoint) -> dict:
    """What the bundle records of its checkpoint: the sha256 of the very bytes the weights came from."""
    return {"path": str(ck.path.resolve()), "bytes": ck.size, "sha256": ck.sha256}


def check_options(lambda_target: float | None, groups: int | None, sampler: str, steps: int | None,
                  dtype: str, calib: int) -> tuple[float | None, str, list[int]]:
    if groups is not None and groups < 1:
        raise UsageError(f"--groups must be at least 1, got {groups}")
    if calib < 1:
        raise UsageError(f"--calib must be at least 1, got {calib}")
    check_dtype(dtype)
    sampler = check_sampler(sampler)
    return check_lambda(lambda_target), sampler, sampler_timesteps(sampler, steps)


def compile_checkpoint(
    ckpt: str | os.PathLike, out: str | os.PathLike, *, lambda_target: float | None = None,
    groups: int | None = None, sampler: str = "ddim", steps: int | None = None, dtype: str = "fp32",
    calib: int = 2, calib_steps: int = DEFAULT_CALIB_STEPS, seed: int = 0, progress: Progress | None = None,
    num_heads: int | None = None,
) -> CompileResult:
    """Compile a DiT/DyDiT checkpoint into ``out`` (a ``NAME.dyc`` directory; see bundle.py for the policy
    on an existing ``out``). ``num_heads``: for a plain DiT of a non-official width (see load_checkpoint)."""
    with torch.no_grad():  # scoped: the caller's autograd mode is left as it was
        return _compile(ckpt, out, lambda_target=lambda_target, groups=groups, sampler=sampler, steps=steps,
                        dtype=dtype, calib=calib, calib_steps=calib_steps, seed=seed, progress=progress,
                        num_heads=num_heads)


def _compile(
    ckpt: str | os.PathLike, out: str | os.PathLike, *, lambda_target: float | None, groups: int | None,
    sampler: str, steps: int | None, dtype: str, calib: int, calib_steps: int, seed: int,
    progress: Progress | None, num_heads: int | None,
) -> CompileResult:
    t0 = time.perf_counter()
    say = progress or (lambda _m: None)
    lambda_target, sampler, schedule = check_options(lambda_target, groups, sampler, steps, dtype, calib)
    if calib_steps < 1:
        raise UsageError(f"--calib-steps must be at least 1, got {calib_steps}")
    ckpt = Path(ckpt)
    check_output(out, (ckpt,))  # fail before minutes of work, not at the rename
    ck = load_checkpoint(ckpt, num_heads=num_heads)
    cfg, model = ck.config, ck.model
    say(f"loaded {cfg.name} from {ckpt} ({ck.num_params / 1e6:.1f} M parameters)")

    # 1. analyse at the trained thresholds
    an = analyse(model, schedule, calib=calib, calib_steps=calib_steps, seed=seed, progress=say)
    keep, cal_rates, keep_offset = an.keep, an.calib_rates, 0.0
    # 2. budget; a forced offset changes what the model computes, so re-measure keep rates there
    b = fit_budget(model, keep, schedule, lambda_target)
    for _ in range(MAX_RECALIBRATIONS):
        if not b.forced or b.offset == keep_offset:
            break
        say(f"budget: offset {b.offset:.4g} on the router logits; re-calibrating keep rates at that offset")
        keep_offset = b.offset
        cal_rates = calibrate_keep_rates(model, an.calib_timesteps, calib, seed=seed, threshold_offset=b.offset,
                                         progress=say)
        keep = keep_rates_per_t(an.calib_timesteps, cal_rates)
        b = fit_budget(model, keep, schedule, lambda_target)
    if b.forced:
        say(f"budget: λ {b.trained_ratio:.4f} at the trained thresholds is above the target {lambda_target}; "
            f"forced a router logit offset of {b.offset:.6g} (the model was not trained for this) -> λ {b.ratio:.4f}")

    # 3. group
    arch_of_t, arch_head, arch_channel = architectures(b.head, b.channel)
    # list each layer's units in one shared order, so that groups' slices are prefixes of one stored copy
    gplans = reorder_groups(partition(cfg, arch_of_t, arch_head, arch_channel, keep, schedule, groups), cfg.depth)
    lam_real = compiled_ratio(cfg, gplans, keep, schedule)
    say(f"group: {len(arch_head)} distinct architectures over t -> {len(gplans)} group(s)")
    plan = Plan(
        config=cfg.to_dict(), dtype=dtype, sampler=sampler, steps=len(schedule), schedule=schedule,
        lambda_target=lambda_target, lambda_model=b.ratio, lambda_realized=lam_real, lambda_trained=b.trained_ratio,
        threshold_offset=float(b.offset), offset_forced=b.forced,
        architectures=[Architecture(mask_to_bits(h), mask_to_bits(c)) for h, c in zip(arch_head, arch_channel,
                                                                                        strict=True)],
        arch_of_t=[int(a) for a in arch_of_t], groups=gplans,
        calibration={
            "samples": calib, "seed": seed, "sampler": "ddim (eta=0)", "cfg_scale": DEFAULT_CFG_SCALE,
            "labels": "uniform random classes; each call batches the conditional and null-class halves",
            "threshold_offset": keep_offset, "timesteps": list(an.calib_timesteps),
            "keep_rates": np.asarray(cal_rates, dtype=np.float64).tolist(),
            "interpolation": "linear in t between calibration timesteps, constant beyond the ends",
        },
    )
    table = format_table(cfg, gplans, len(schedule))

    # 4-6. slice, export, bundle
    path, manifest = write_bundle(out, plan, cfg, model.state_dict(), keep, _source_info(ck), progress=say)
    return CompileResult(path, plan, manifest, table, time.perf_counter() - t0)
