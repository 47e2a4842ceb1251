"""Pass 6, bundle: write ``NAME.dyc/`` (graphs, weights, manifest) atomically.

Everything is written into a hidden sibling directory ``.NAME.dyc.partial-<pid>-<rand>``; the
manifest (which the loader requires) is written last, then the directory is renamed into place
in one ``rename``. A compile killed at any point (kill -9 included) therefore leaves either the
previous bundle or nothing loadable; leftovers of dead compiles are removed by the next compile
into the same directory.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import torch

from ..bundle import FORMAT, MANIFEST, SCHEMA_VERSION, file_sha256, manifest_checksum
from ..config import ModelConfig
from ..errors import DycError
from .export import VARIANTS, WEIGHTS_FILE, WeightStore, build_graph, save_model
from .onnx_flops import count_macs_by_layer
from .plan import Plan
from .slice import unit_orders

Progress = Callable[[str], None]
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(partial|old)-(?P<pid>\d+)-[0-9a-f]+$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> None:
    """Remove temp dirs of compiles into ``out`` whose process is gone (a kill -9 leaves them)."""
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        m = _PARTIAL.match(p.name)
        if m and m.group("name") == out.name and p.is_dir() and not _pid_alive(int(m.group("pid"))):
            shutil.rmtree(p, ignore_errors=True)


def tool_versions() -> dict[str, str]:
    from importlib import metadata

    def ver(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {"dyc": ver("dyc"), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnx_opset": "17", "numpy": np.__version__, "python": platform.python_version()}


def group_file(index: int, variant: str, dynamic: bool) -> str:
    # a plain DiT has no SDT: the two variants would be identical graphs, so both name one file
    if variant == "std" or not dynamic:
        return f"group{index}.onnx"
    return f"group{index}.{variant}.onnx"


def build_manifest(plan: Plan, cfg: ModelConfig, files: Mapping[str, dict], group_macs: list[dict],
                   source: Mapping, lambda_onnx: float) -> dict:
    p = plan.to_dict()
    groups = []
    for g, macs in zip(p["groups"], group_macs, strict=True):
        g = dict(g)
        g["files"] = {v: group_file(g["index"], v, cfg.dynamic) for v in VARIANTS}
        g["inputs"] = {
            "head_mask": [cfg.depth, max(len(h) for h in g["heads"])] if any(g["vary_head"]) else None,
            "channel_mask": [cfg.depth, max(len(c) for c in g["channels"])] if any(g["vary_channel"]) else None,
        }
        g["onnx_macs_keep1"] = macs  # per image, all tokens kept (MLP scales linearly with keep)
        groups.append(g)
    notes = []
    if plan.offset_forced:
        notes.append(f"router thresholds raised by a logit offset of {plan.threshold_offset:.6g} to meet λ target "
                     f"{plan.lambda_target}: the model was not trained for this offset (quality may drop)")
    if plan.lambda_target is not None and plan.lambda_realized > plan.lambda_target:
        notes.append(f"the {len(plan.groups)} engines realize λ {plan.lambda_realized:.4f} > target "
                     f"{plan.lambda_target} (the model's masks give {plan.lambda_model:.4f}): each engine computes "
                     "the union of its members; more --groups bring it closer")
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": cfg.name, "config": cfg.to_dict()},
        "dtype": plan.dtype,
        "source": dict(source),
        "lambda": {"target": plan.lambda_target, "trained": plan.lambda_trained, "model": plan.lambda_model,
                   "realized": plan.lambda_realized, "onnx_counted": lambda_onnx},
        "threshold_offset": plan.threshold_offset,
        "offset_forced": plan.offset_forced,
        "notes": notes,
        "schedule": {"sampler": plan.sampler, "steps": plan.steps, "timesteps": plan.schedule},
        "calibration": plan.calibration,
        "masks": {"num_timesteps": len(plan.arch_of_t), "encoding": "bitmask per layer, bit h = head/group h on",
                  "arch_of_t": plan.arch_of_t, "architectures": p["architectures"]},
        "groups": groups,
        "onnx": {"opset": 17, "custom_domain": "dyc", "variants": {
            "std": "SDT decomposed into standard ops (ONNX Runtime, any runtime)",
            "trt": "SDT as custom op dyc::SdtMlp (TensorRT plugin)"}, "weights_file": WEIGHTS_FILE},
        "files": dict(files),
        "tools": tool_versions(),
    }
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    return manifest


def _onnx_ratio(cfg: ModelConfig, plan: Plan, group_macs: list[dict], keep: np.ndarray) -> float:
    """λ from the graphs' own MAC counts: attention as counted, MLP layer l scaled by keep[t, l]."""
    from ..flops import static_breakdown

    static = static_breakdown(cfg).blocks
    vals = []
    for t in plan.schedule:
        gi = next(g.index for g in plan.groups if g.contains(t))
        m = group_macs[gi]
        vals.append((m["attn"] + float(np.dot(m["mlp_layers"], keep[t]))) / static)
    return float(np.mean(vals))


def write_bundle(
    out: str | os.PathLike, plan: Plan, cfg: ModelConfig, sd: Mapping[str, torch.Tensor], keep: np.ndarray,
    source: Mapping, progress: Progress | None = None,
) -> tuple[Path, dict]:
    """Export every group (both variants), write weights + manifest, move into place atomically."""
    out = Path(out)
    if out.suffix != ".dyc":
        raise DycError(f"{out}: a bundle's name must end in .dyc")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        group_macs = []
        orders = unit_orders(plan.groups, cfg.depth)
        with WeightStore(tmp / WEIGHTS_FILE, plan.dtype) as store:
            for g in plan.groups:
                for variant in VARIANTS:
                    name = group_file(g.index, variant, cfg.dynamic)
                    if (tmp / name).exists():
                        continue
                    model = graph_builder(cfg)(cfg, sd, g, store, variant, orders)
                    save_model(model, tmp / name)
                    if variant == "std":
                        group_macs.append(_macs_by_layer(model, cfg.depth))
                if progress:
                    progress(f"export: group {g.index + 1}/{len(plan.groups)} (t {g.t_lo}-{g.t_hi}), "
                             f"weights {store.size() / 2**30:.2f} GiB")
            weights_info = {"bytes": store.size(), "sha256": store.sha256()}
        from ..runtime.conditions import bundle_files

        extra = bundle_files(cfg, sd)  # a family's files beside the graphs (PixArt-α: the null text)
        for name, data in extra.items():
            (tmp / name).write_bytes(data)
        files = {WEIGHTS_FILE: weights_info}
        for f in sorted(tmp.iterdir()):
            if f.suffix == ".onnx" or f.name in extra:
                files[f.name] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
        lam_onnx = _onnx_ratio(cfg, plan, group_macs, keep)
        manifest = build_manifest(plan, cfg, files, group_macs, source, lam_onnx)
        _write_manifest(tmp, manifest)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, manifest


def graph_builder(cfg: ModelConfig):
    """The exporter of the model's family (DiT: ``export.build_graph``; others: ``dyc.families``)."""
    if cfg.family == "dit":
        return build_graph
    import importlib

    return importlib.import_module(f"dyc.families.{cfg.family}_onnx").build_graph


def _macs_by_layer(model: onnx.ModelProto, depth: int) -> dict:
    """Counted MACs of a graph at keep 1, with the MLP split per layer (it scales with keep[l])."""
    full, layers = count_macs_by_layer(model, depth)
    out = {k: full[k] for k in ("embed", "adaln", "attn", "mlp", "routers", "final", "other", "total")}
    out["mlp_layers"] = layers["mlp"]
    return out


def _write_manifest(tmp: Path, manifest: dict) -> None:
    path = tmp / MANIFEST
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename tmp -> out; an existing bundle is moved aside first and deleted after."""
    old = None
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise DycError(f"{out}: exists and is not a bundle directory; refusing to replace it")
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
