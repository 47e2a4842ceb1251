"""Pass 6, bundle: write ``NAME.dyc/`` (graphs, weights, manifest) atomically, never losing anything.

Output policy (``-o NAME.dyc``):

* ``NAME.dyc`` does not exist: the bundle is built in a hidden sibling directory
  ``.NAME.dyc.partial-<pid>-<rand>`` (the manifest, which the loader requires, written last) and
  renamed into place in one step.
* ``NAME.dyc`` is a dyc bundle (a ``manifest.json`` and only the names a bundle holds: graphs,
  ``weights.bin``, ``engines/``): it is replaced by one atomic exchange of the two directories
  (Linux ``renameat2(RENAME_EXCHANGE)``), then the old one is deleted. At every instant either the
  old or the new complete bundle is at ``NAME.dyc``. Where the exchange is not available (other
  systems, some network file systems) the old bundle is first renamed to ``.NAME.dyc.old-<pid>-<rand>``;
  if the compile dies right then, the next compile into ``NAME.dyc`` renames it back, and
  ``Bundle.load`` names it.
* anything else (a file, a symlink, a directory that is not a bundle or holds other files, e.g.
  the input checkpoint) is refused with a clear error before any work: nothing that is not a
  bundle is ever deleted.

Leftovers of dead compiles (``.partial-``/``.old-`` of a process that is gone) are removed by the next
compile into the same name.
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

from ..bundle import FORMAT, MANIFEST, SCHEMA_VERSION, TEMP_DIR, manifest_checksum
from ..config import ModelConfig
from ..errors import DycError, UsageError, os_error_reason
from ..fileio import exchange_paths, make_output_dir, rename_noreplace, sha256_file
from .export import VARIANTS, WEIGHTS_FILE, WeightStore, build_graph, save_model
from .onnx_flops import count_macs_by_layer
from .plan import Plan
from .slice import unit_orders

Progress = Callable[[str], None]
# what a bundle directory may hold: anything else in it makes it "not a bundle" (never deleted)
_BUNDLE_ENTRY = re.compile(r"^(manifest\.json|weights\.bin|null_text\.npy|group\d+(\.trt|\.cuda)?\.onnx|engines)$")
_ENGINES_ENTRY = re.compile(r"^(group\d+\.plan|trt_manifest\.json|timing\.cache|\..+\.tmp(-\d+)?)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> None:
    """Tidy up after compiles into ``out`` whose process is gone (a kill -9 leaves their temp dirs).

    A previous bundle that such a compile had moved aside (``.old-``, only where no atomic exchange
    exists) is renamed back when ``out`` is missing; partial bundles are removed.
    """
    if not out.parent.is_dir():
        return
    for p in sorted(out.parent.iterdir()):
        m = TEMP_DIR.match(p.name)
        if not (m and m.group("name") == out.name and p.is_dir() and not _pid_alive(int(m.group("pid")))):
            continue
        if m.group("kind") == "old" and not (out.exists() or out.is_symlink()):
            os.rename(p, out)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _foreign_entries(out: Path) -> list[str]:
    found = []
    for p in sorted(out.iterdir()):
        if not _BUNDLE_ENTRY.match(p.name) or p.is_symlink() or (p.is_dir() != (p.name == "engines")):
            found.append(p.name)
        elif p.name == "engines":
            found += [f"engines/{q.name}" for q in sorted(p.iterdir()) if not _ENGINES_ENTRY.match(q.name)
                      or not q.is_file() or q.is_symlink()]
    return found


def check_output(out: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse an output path whose replacement could delete anything but a dyc bundle (module doc)."""
    out = Path(out)
    if out.suffix != ".dyc":
        raise UsageError(f"{out}: a bundle's name must end in .dyc")
    for inp in inputs:
        src = Path(inp).resolve()
        if src == out.resolve() or out.resolve() in src.parents:
            raise DycError(f"{out}: the output bundle would replace its own input {inp}; choose another -o")
    if out.is_symlink():
        raise DycError(f"{out}: is a symbolic link; refusing to replace it (give the real path with -o)")
    for parent in out.parents:  # the first existing ancestor must be a directory to create out in
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise DycError(f"{out}: {parent} is not a directory")
            break
    if not out.exists():
        return out
    if not out.is_dir():
        raise DycError(f"{out}: exists and is not a bundle directory; refusing to replace it")
    if not (out / MANIFEST).is_file():
        raise DycError(f"{out}: exists and is not a dyc bundle (no {MANIFEST}); refusing to replace it "
                       "(move it away, or choose another -o)")
    foreign = _foreign_entries(out)
    if foreign:
        more = f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else ""
        raise DycError(f"{out}: exists and holds {', '.join(foreign[:3])}{more}, which a dyc bundle does not; "
                       "refusing to replace it (move those away, or choose another -o)")
    return out


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
    # a plain DiT has no SDT: std and trt would be identical graphs, so both name one file
    if variant == "std" or (variant == "trt" and not dynamic):
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
            "trt": "SDT as custom op dyc::SdtMlp (TensorRT plugin)",
            "cuda": "ONNX Runtime CUDA EP: dyc::SdtMlp (libdyc_ort_ops), com.microsoft MultiHeadAttention"},
            "weights_file": WEIGHTS_FILE},
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
    """Export every group (every variant), write weights + manifest, move into place atomically."""
    out = Path(out)
    inputs = (source["path"],) if source.get("path") else ()
    check_output(out, inputs)
    make_output_dir(out.parent, "bundle's parent directory")
    clean_stale(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
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
                files[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        lam_onnx = _onnx_ratio(cfg, plan, group_macs, keep)
        manifest = build_manifest(plan, cfg, files, group_macs, source, lam_onnx)
        _write_manifest(tmp, manifest)
        check_output(out, inputs)  # again: the compile took a while, and out may have changed meanwhile
        _swap_in(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DycError(f"{out}: cannot write the bundle ({os_error_reason(e)}); "
                       f"{'the previous bundle there is unchanged' if out.exists() else 'nothing was written'}"
                       ) from None
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
    """Put the complete bundle ``tmp`` at ``out`` so that ``out`` is always a complete bundle (module doc)."""
    if not (out.exists() or out.is_symlink()):
        # RENAME_NOREPLACE: a bundle that another compile put there meanwhile is not clobbered
        if not rename_noreplace(tmp, out):
            os.rename(tmp, out)  # fails on a non-empty directory: never replaces a bundle silently
        return
    if exchange_paths(tmp, out):  # one atomic step: out is the new bundle, tmp now holds the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out, old)  # a kill right here leaves the old bundle at `old`: clean_stale renames it back
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
