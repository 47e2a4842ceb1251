"""``dyc verify``: every group's ONNX (standard ops on ONNX Runtime's CPU EP by default) against the exact eager model.

For each group, at every t of the bundle's schedule that falls in it (a group that holds no
schedule step is checked at its first t), random latents and labels (the null class included)
go through

* the ONNX graph, in the bundle's dtype, built from the bundle's checked bytes (``dyc.ort_session``);
* the **reference**: the eager model in float64 with the bundle's TDW masks (the masks every backend
  runs; that they are the model's own routers' decisions at the bundle's threshold offset is
  checked separately, at every schedule t);
* the eager model in the bundle's dtype, on the same inputs: its distance to the reference is the
  rounding error that this dtype costs on this model and input, however well or badly conditioned
  the model is (random weights can make fp32 itself 1e-4 off float64).

Error of a group: the largest relative error max |onnx − ref| / max |ref| of any of its samples.
It passes when every output is finite and that error is at most ``max(FLOOR[dtype], SLACK × e)``,
``e`` the eager model's largest error over the samples of every group (the model's conditioning in
this dtype). The graph computes the same operations in the same precision in another order (other
kernels, fused ops), so its rounding error is of the size of the eager model's: over random, badly
conditioned models the ratio of the two largest errors stayed below 8.1 (per sample it scatters
far more, so samples are pooled: over a group's few samples alone a lucky eager error once gave 25);
``SLACK`` = 10. The floor (fp32 1e-5 ≈ 170 unit roundoffs, fp16 1e-2 ≈ 20) covers
well-conditioned models, whose eager error is far below it. A model whose eager forward is itself
more than ``UNFIT[dtype]`` off float64 is reported as unfit for that dtype (a failure, not a
tolerance that grows without end). A NaN or Inf output always fails. ``--tolerance`` sets one
fixed bound instead.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..bundle import Bundle
from ..checkpoint import load_checkpoint
from ..errors import ChecksumMismatch, DycError, UsageError
from ..families import mixed_conditions

FLOOR = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 2e-2}
SLACK = 10.0
UNFIT = {"fp32": 1e-2, "fp16": 1e-1, "bf16": 2e-1}
TOLERANCE = FLOOR  # the dtype floors, under the name earlier versions used
_TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Progress = Callable[[str], None]


@dataclass
class GroupCheck:
    group: int
    t_range: str
    timesteps: int
    max_abs: float  # max |onnx - ref| (inf when an output is not finite)
    max_rel: float  # the largest max |onnx - ref| / max |ref| of a sample
    eager_rel: float  # the eager model's own largest error in the bundle dtype, same samples and measure
    tolerance: float  # what max_rel was held to
    ok: bool
    problem: str = ""  # why it failed, when not just "above tolerance"


@dataclass
class VerifyReport:
    bundle: str
    dtype: str
    tolerance: float | None  # a fixed --tolerance, or None: per group from the dtype (module doc)
    groups: list[GroupCheck]

    @property
    def ok(self) -> bool:
        return all(g.ok for g in self.groups)

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "dtype": self.dtype, "tolerance": self.tolerance, "ok": self.ok,
                "reference": "eager float64", "floor": FLOOR.get(self.dtype), "slack": SLACK,
                "groups": [asdict(g) for g in self.groups]}

    def format(self) -> str:
        rows = [f"{'group':>5}  {'t-range':>9}  {'steps':>5}  {'max abs':>10}  {'max rel':>10}  "
                f"{'eager ' + self.dtype:>10}  {'tolerance':>10}  result"]
        for g in self.groups:
            verdict = "ok" if g.ok else f"FAIL{': ' + g.problem if g.problem else ''}"
            rows.append(f"{g.group:>5}  {g.t_range:>9}  {g.timesteps:>5}  {g.max_abs:>10.3e}  {g.max_rel:>10.3e}  "
                        f"{g.eager_rel:>10.3e}  {g.tolerance:>10.3e}  {verdict}")
        how = (f"fixed tolerance {self.tolerance:g}" if self.tolerance is not None else
               f"tolerance max({FLOOR[self.dtype]:g}, {SLACK:g} × the eager {self.dtype} model's own error "
               "over all groups)")
        verdict = "all groups within" if self.ok else "ERRORS ABOVE"
        rows.append(f"{verdict} {how}; relative to the eager float64 model ({self.dtype} bundle)")
        return "\n".join(rows)


def _to_ort(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "fp16":
        return a.astype(np.float16)
    if dtype == "bf16":
        raise DycError("ONNX Runtime on CPU has no bf16 kernels for these graphs: verify a bf16 bundle on a GPU "
                       "backend, or compile with --dtype fp32/fp16 to verify here")
    return a.astype(np.float32)


def _load_source(bundle: Bundle, checkpoint: str | os.PathLike | None):
    src = bundle.manifest["source"]
    if not isinstance(src, dict) or not isinstance(src.get("sha256"), str):
        raise DycError(f"{bundle.path}: the manifest records no source checkpoint sha256")
    ckpt = Path(checkpoint) if checkpoint is not None else Path(str(src.get("path")))
    if not ckpt.exists():
        raise DycError(f"source checkpoint {ckpt} of {bundle.path.name} not found: pass it with --checkpoint")
    try:  # the checksum is checked on the very bytes the weights are read from
        return load_checkpoint(ckpt, num_heads=bundle.config.num_heads, expect_sha256=src["sha256"]).model
    except ChecksumMismatch:
        raise DycError(f"{ckpt} is not the checkpoint {bundle.path.name} was compiled from (sha256 differs)") from None


def _rel(out: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: (max |out - ref|, that / max |ref|); inf for a sample whose output is not all finite."""
    flat_out, flat_ref = out.reshape(out.shape[0], -1), ref.reshape(ref.shape[0], -1)
    finite = np.isfinite(flat_out).all(axis=1)
    diff = np.abs(np.where(np.isfinite(flat_out), flat_out, 0.0) - flat_ref).max(axis=1)
    err = np.where(finite, diff, np.inf)  # never max(0, nan): a NaN must not read as "no error"
    return err, err / np.maximum(np.abs(flat_ref).max(axis=1), 1e-30)


def verify_bundle(
    bundle: Bundle | str | os.PathLike, checkpoint: str | os.PathLike | None = None, *, batch: int = 2,
    seed: int = 0, tolerance: float | None = None, progress: Progress | None = None, variant: str = "std",
    device: str = "cpu",
) -> VerifyReport:
    """Check every group of a bundle against the float64 eager model of its source checkpoint.

    ``variant``/``device`` other than std/cpu run the graphs through the onnxruntime backend (the
    ``cuda`` graphs on the CPU need fp32 and ``libdyc_ort_ops.so``; on CUDA fp16 and bf16 too).
    """
    from ..ort_session import bundle_session

    if batch < 1:
        raise UsageError(f"--batch must be at least 1, got {batch}")
    if tolerance is not None and not (np.isfinite(tolerance) and tolerance > 0):
        raise UsageError(f"--tolerance must be a positive number, got {tolerance}")
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    backend = None
    if (variant, device) != ("std", "cpu"):
        from ..backends.onnxruntime import OnnxRuntimeBackend

        if device == "cpu" and bundle.dtype != "fp32":
            raise DycError(f"the {variant!r} graphs of a {bundle.dtype} bundle verify on CUDA only (ONNX Runtime's "
                           "CPU kernels of their operators are fp32): --device cuda, or a --dtype fp32 bundle")
        backend = OnnxRuntimeBackend(bundle, device=device, variant=variant)
    elif bundle.dtype == "bf16":
        _to_ort(np.zeros(1), "bf16")  # the clear "no bf16 on ORT CPU" error, before any work
    model = _load_source(bundle, checkpoint)
    cfg, offset = bundle.config, bundle.threshold_offset
    schedule = bundle.schedule
    mask_problem = _check_masks(bundle, model, schedule)
    # the reference in float64 (exact from fp32 weights), the same model in the bundle's dtype
    ref_model = copy.deepcopy(model).double()
    dt_model = model if bundle.dtype == "fp32" else model.to(_TORCH[bundle.dtype])
    gen = torch.Generator().manual_seed(seed)
    weights = bundle.weights_bytes()  # read and checked once for every group's session
    measured = []
    for g in bundle.groups:
        ts = [t for t in schedule if g.contains(t)] or [g.t_lo]
        sess = bundle_session(bundle, g, "std", weights=weights) if backend is None else None
        max_abs = max_rel = eager_rel = 0.0
        for t in ts:
            x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
            if cfg.family == "dit":
                y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=gen)  # null class included
            else:  # another family's condition (dyc.families), the null one included
                y = mixed_conditions(model, batch, gen)
            tt = torch.full((batch,), t, dtype=torch.long)
            masks = None
            if cfg.dynamic:
                h, c = (torch.from_numpy(m).double().expand(batch, -1, -1) for m in bundle.masks_for_t(t))
                masks = (h, c)
            with torch.no_grad():
                # a float condition (PixArt-α's text) goes in each model's dtype, class ids as they are
                yd, yt = (y.double(), y.to(_TORCH[bundle.dtype])) if y.is_floating_point() else (y, y)
                ref = ref_model(x.double(), tt, yd, threshold_offset=offset, tdw_masks=masks).numpy()
                dt = dt_model(x.to(_TORCH[bundle.dtype]), tt, yt, threshold_offset=offset,
                              tdw_masks=None if masks is None else tuple(m.to(_TORCH[bundle.dtype]) for m in masks))
            if backend is None:
                feeds = {"x": _to_ort(x.numpy(), bundle.dtype), "t": tt.numpy(),
                         "y": y.numpy() if not y.is_floating_point() else _to_ort(y.numpy(), bundle.dtype)}
                feeds.update({k: _to_ort(v, bundle.dtype) for k, v in bundle.mask_inputs(t, batch).items()})
                out = sess.run(None, feeds)[0].astype(np.float64)
            else:
                feeds = {"x": x, "t": tt, "y": y}
                feeds.update({k: torch.from_numpy(v) for k, v in bundle.mask_inputs(t, batch).items()})
                out = backend.run_group(g.index, feeds).double().cpu().numpy()
            abs_err, rel = _rel(out, ref)
            max_abs, max_rel = max(max_abs, float(abs_err.max())), max(max_rel, float(rel.max()))
            eager_rel = max(eager_rel, float(_rel(dt.double().numpy(), ref)[1].max()))
        measured.append((g, len(ts), max_abs, max_rel, eager_rel))
        if progress:
            progress(f"verify: group {g.index + 1}/{len(bundle.groups)}: max rel {max_rel:.2e} over {len(ts)} t "
                     f"(eager {bundle.dtype}: {eager_rel:.2e})")
    # the model's own rounding error in this dtype, pooled over every group's samples: a group with
    # one or two samples can be luckily exact in eager (seen: 9e-7 at t = 0 where the model is 2.6e-5
    # off elsewhere) while other kernels (MLAS's tanh/exp approximations) round it as the model does
    model_rel = max((eager for *_, eager in measured), default=0.0)
    tol = float(tolerance) if tolerance is not None else max(FLOOR[bundle.dtype], SLACK * model_rel)
    checks = []
    for g, n_t, max_abs, max_rel, eager_rel in measured:
        problem = ""
        if not np.isfinite(max_rel):
            problem = "NaN or Inf in the output"
        elif mask_problem and g.index in mask_problem:
            problem = mask_problem[g.index]
        elif tolerance is None and not eager_rel <= UNFIT[bundle.dtype]:
            problem = (f"the model itself is unfit for {bundle.dtype}: its eager {bundle.dtype} forward is "
                       f"{eager_rel:.2g} off float64")
        ok = not problem and max_rel <= tol
        checks.append(GroupCheck(g.index, f"{g.t_lo}-{g.t_hi}", n_t, max_abs, max_rel, eager_rel, tol, ok, problem))
    return VerifyReport(str(bundle.path), bundle.dtype, None if tolerance is None else float(tolerance), checks)


def _check_masks(bundle: Bundle, model, schedule: list[int]) -> dict[int, str]:
    """Groups whose manifest masks differ from the model's own routers at some schedule t."""
    if not bundle.config.dynamic:
        return {}
    with torch.no_grad():
        head, channel = model.tdw_masks(torch.tensor(schedule), bundle.threshold_offset)
    bad: dict[int, str] = {}
    for i, t in enumerate(schedule):
        h, c = bundle.masks_for_t(t)
        if not (np.array_equal(h, head[i].numpy() > 0.5) and np.array_equal(c, channel[i].numpy() > 0.5)):
            g = bundle.group_for_t(t).index
            bad.setdefault(g, f"the manifest's masks at t={t} are not the model's router decisions")
    return bad
