"""``dyc verify``: every group's standard-op ONNX (ONNX Runtime, CPU) against the eager model.

For each group, at every t of the bundle's schedule that falls in it (a group that holds no
schedule step is checked at its first t), random latents and labels (the null class included)
go through both; the eager model runs in fp32 with the bundle's threshold offset, the reference
every backend answers to. Error metrics per group: max |onnx - eager| and the relative error
max |onnx - eager| / max |eager| over all its t's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..bundle import Bundle, file_sha256
from ..checkpoint import load_checkpoint
from ..errors import DycError
from ..families import mixed_conditions

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 2e-2}
Progress = Callable[[str], None]


@dataclass
class GroupCheck:
    group: int
    t_range: str
    timesteps: int
    max_abs: float
    max_rel: float
    ok: bool


@dataclass
class VerifyReport:
    bundle: str
    dtype: str
    tolerance: float
    groups: list[GroupCheck]

    @property
    def ok(self) -> bool:
        return all(g.ok for g in self.groups)

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "dtype": self.dtype, "tolerance": self.tolerance, "ok": self.ok,
                "groups": [asdict(g) for g in self.groups]}

    def format(self) -> str:
        rows = [f"{'group':>5}  {'t-range':>9}  {'steps':>5}  {'max abs':>10}  {'max rel':>10}  result"]
        for g in self.groups:
            rows.append(f"{g.group:>5}  {g.t_range:>9}  {g.timesteps:>5}  {g.max_abs:>10.3e}  {g.max_rel:>10.3e}  "
                        f"{'ok' if g.ok else 'FAIL'}")
        verdict = "all groups within" if self.ok else "ERRORS ABOVE"
        rows.append(f"{verdict} tolerance {self.tolerance:g} (relative, {self.dtype})")
        return "\n".join(rows)


def _session(path: Path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise DycError("dyc verify needs onnxruntime (pip install 'dyc[onnx]')") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types
        raise DycError(f"{path}: ONNX Runtime cannot load this graph ({str(e).splitlines()[0]})") from None


def _to_ort(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "fp16":
        return a.astype(np.float16)
    if dtype == "bf16":
        raise DycError("ONNX Runtime on CPU has no bf16 kernels for these graphs: verify a bf16 bundle on a GPU "
                       "backend, or compile with --dtype fp32/fp16 to verify here")
    return a.astype(np.float32)


def verify_bundle(
    bundle: Bundle | str | os.PathLike, checkpoint: str | os.PathLike | None = None, *, batch: int = 2,
    seed: int = 0, tolerance: float | None = None, progress: Progress | None = None,
) -> VerifyReport:
    """Check every group of a bundle against the eager model of its source checkpoint."""
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    if bundle.dtype == "bf16":
        _to_ort(np.zeros(1), "bf16")  # the clear "no bf16 on ORT CPU" error, before any work
    src = bundle.manifest["source"]
    ckpt = Path(checkpoint) if checkpoint is not None else Path(src["path"])
    if not ckpt.is_file():
        raise DycError(f"source checkpoint {ckpt} of {bundle.path.name} not found: pass it with --checkpoint")
    if file_sha256(ckpt) != src["sha256"]:
        raise DycError(f"{ckpt} is not the checkpoint {bundle.path.name} was compiled from (sha256 differs)")
    model = load_checkpoint(ckpt).model
    cfg = bundle.config
    tol = TOLERANCE[bundle.dtype] if tolerance is None else float(tolerance)
    gen = torch.Generator().manual_seed(seed)
    schedule = bundle.schedule
    checks = []
    for g in bundle.groups:
        ts = [t for t in schedule if g.contains(t)] or [g.t_lo]
        sess = _session(bundle.onnx_path(g, "std"))
        max_abs = max_ref = 0.0
        for t in ts:
            x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
            if cfg.family == "dit":
                y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=gen)  # null class included
            else:  # another family's condition (dyc.families), the null one included
                y = mixed_conditions(model, batch, gen)
            tt = torch.full((batch,), t, dtype=torch.long)
            with torch.no_grad():
                ref = model(x, tt, y, threshold_offset=bundle.threshold_offset).double().numpy()
            feeds = {"x": _to_ort(x.numpy(), bundle.dtype), "t": tt.numpy(),
                     "y": y.numpy() if not y.is_floating_point() else _to_ort(y.numpy(), bundle.dtype)}
            feeds.update({k: _to_ort(v, bundle.dtype) for k, v in bundle.mask_inputs(t, batch).items()})
            out = sess.run(None, feeds)[0].astype(np.float64)
            max_abs = max(max_abs, float(np.abs(out - ref).max()))
            max_ref = max(max_ref, float(np.abs(ref).max()))
        rel = max_abs / max(max_ref, 1e-30)
        checks.append(GroupCheck(g.index, f"{g.t_lo}-{g.t_hi}", len(ts), max_abs, rel, bool(rel <= tol)))
        if progress:
            progress(f"verify: group {g.index + 1}/{len(bundle.groups)}: max rel {rel:.2e} over {len(ts)} t")
    return VerifyReport(str(bundle.path), bundle.dtype, tol, checks)
