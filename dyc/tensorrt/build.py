"""Build one TensorRT engine per group of a bundle, from the group's ONNX graph.

``build_engines(bundle)`` parses each group's graph with TensorRT's ``OnnxParser`` into a *strongly
typed* network (precision is the bundle's dtype, exactly as the graph states it: no fp16/int8 builder
flags, which TensorRT-RTX does not have anyway), gives it one optimisation profile over the batch
dimension, builds a serialized plan and writes ``engines/group{i}.plan`` plus the sidecar manifest
``engines/trt_manifest.json`` (flavour, version, target compute capabilities, options, per-plan
sha256 and IO/profile description). Plans are written to temporary files first and moved into
place together, the sidecar last: a failed or killed build leaves the previous engines usable.

Batch sizes: ``batch_sizes`` are images per sampler call. With ``cfg_batch`` (the default) the
runtime may run classifier-free guidance, which doubles the engine batch (conditional + null-class
halves), so the profile covers b and 2b for every requested b: ``--batch-sizes 1,16,32`` gives
engine batches 1..64 with the kernels tuned (``opt``) for the largest, 64.

SDT form (see ``dyc/tensorrt/sdt.py``): ``plugin`` when the ``SdtMlp`` plugin library is given or
found (the bundle's ``trt`` graphs), else ``gather`` with datacenter TensorRT and ``dense`` with
TensorRT-RTX (which has no NonZero).
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import DycError
from ..fileio import sha256_bytes
from .common import (
    ENGINES_DIR,
    PLUGIN_OP,
    SDT_FORMS,
    TRT_MANIFEST_SCHEMA,
    atomic_write_bytes,
    check_flavor,
    import_trt,
    sha256_file,
    trt_version,
    write_trt_manifest,
)

Progress = Callable[[str], None]
DEFAULT_BATCH_SIZES = (1, 16, 32)
PLUGIN_ENV = "DYC_TRT_PLUGIN"
# TensorRT-RTX target compute capabilities (ComputeCapability members), by "major.minor"
_RTX_CC = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120", "12.1": "SM121"}
RTX_DEFAULT_TARGETS = "TensorRT-RTX default: portable to compute capability 8.0, 8.6, 8.9 and 12.x (not 7.5, not 9.0)"


# ---------------------------------------------------------------------------------------------
# small helpers
def parse_batch_sizes(text: str | Sequence[int]) -> tuple[int, ...]:
    """'1,16,32' (or a sequence) -> sorted distinct positive ints."""
    try:
        vals = [int(v) for v in (text.split(",") if isinstance(text, str) else text) if str(v).strip()]
    except ValueError:
        raise DycError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise DycError(f"--batch-sizes must be positive integers, got {text!r}")
    return tuple(sorted(set(vals)))


def engine_batches(batch_sizes: Sequence[int], cfg_batch: bool = True) -> tuple[int, ...]:
    """Batch sizes the engines see: with CFG every sampler batch b also runs as 2b."""
    b = set(batch_sizes)
    if cfg_batch:
        b |= {2 * v for v in batch_sizes}
    return tuple(sorted(b))


def normalize_cc(cc: str) -> str:
    """'86', '8.6', 'sm86', 'sm_86' -> '8.6'."""
    s = str(cc).strip().lower().removeprefix("sm").lstrip("_")
    if "." not in s:
        if not s.isdigit() or len(s) < 2:
            raise DycError(f"bad compute capability {cc!r}: write it as 8.6, 86 or sm86")
        s = f"{s[:-1]}.{s[-1]}"
    major, _, minor = s.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise DycError(f"bad compute capability {cc!r}: write it as 8.6, 86 or sm86")
    return f"{int(major)}.{int(minor)}"


def find_plugin_library(repo_root: str | os.PathLike | None = None) -> Path | None:
    """The built ``SdtMlp`` TensorRT plugin library: ``$DYC_TRT_PLUGIN``, else a CMake build of ``plugins/``."""
    env = os.environ.get(PLUGIN_ENV)
    if env:
        p = Path(env)
        if not p.is_file():
            raise DycError(f"${PLUGIN_ENV}={env}: no such file")
        return p
    root = Path(repo_root) if repo_root else Path(__file__).resolve().parents[2]
    pats = ("*dyc*trt*.so", "*dyc*tensorrt*.so", "*sdt*trt*.so", "*sdt*tensorrt*.so")
    dirs = (root / "plugins" / "build", root / "build", root / "plugins", Path(__file__).resolve().parents[1] / "lib")
    for d in dirs:
        if d.is_dir():
            hits = sorted({h for pat in pats for h in d.rglob(pat) if h.is_file()})
            if hits:
                return hits[0]
    return None


def load_plugin_library(trt: ModuleType, path: str | os.PathLike) -> None:
    """Register the plugins of a shared library with TensorRT and check that ``SdtMlp`` is among them."""
    path = Path(path)
    if not path.is_file():
        raise DycError(f"TensorRT plugin library {path}: no such file")
    registry = trt.get_plugin_registry()
    if not _find_creator(registry, PLUGIN_OP):
        try:
            handle = registry.load_library(str(path))
        except Exception as e:  # the bindings raise their own types for dlopen failures
            raise DycError(f"TensorRT could not load plugin library {path}: {e}") from None
        if handle is None and not _find_creator(registry, PLUGIN_OP):
            raise DycError(f"TensorRT could not load plugin library {path} (see the TensorRT log above)")
    if not _find_creator(registry, PLUGIN_OP):
        raise DycError(f"{path} registers no '{PLUGIN_OP}' TensorRT plugin")


def _find_creator(registry: Any, name: str) -> Any:
    for c in registry.all_creators:
        if c.name == name:
            return c
    return None


# ---------------------------------------------------------------------------------------------
# network parsing and description
class _Logger:
    """A TensorRT logger that keeps errors for the DycError and prints warnings only when asked."""

    def __init__(self, trt: ModuleType, verbose: bool = False):
        sev = trt.ILogger.Severity
        errors = (sev.INTERNAL_ERROR, sev.ERROR)
        shown = (*errors, sev.WARNING) if verbose else ()
        self.errors: list[str] = []
        outer = self

        class L(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                if severity in errors:
                    outer.errors.append(msg)
                if severity in shown:
                    print(f"[TensorRT] {msg}", file=sys.stderr)

        self.logger = L()


@dataclass
class ParsedGroup:
    """A group's parsed network. The parser owns (or points into) the weight memory: keep it alive until
    the build ends (``weights``: the checked bytes TensorRT reads the initializers from)."""

    index: int
    onnx_path: Path
    sdt_form: str
    builder: Any
    network: Any
    parser: Any
    logger: _Logger = field(repr=False)
    weights: Any = field(default=None, repr=False)


def group_graph(bundle: Any, index: int, sdt_form: str) -> tuple[Path, bytes]:
    """The ONNX bytes TensorRT parses for a group (checked against the manifest) and the graph's path."""
    if sdt_form not in (*SDT_FORMS, "none"):
        raise DycError(f"unknown SDT form {sdt_form!r}: choose one of {', '.join(SDT_FORMS)}")
    variant = "trt" if sdt_form == "plugin" else "std"
    path = bundle.onnx_path(index, variant)
    data = bundle.graph_bytes(index, variant)
    if sdt_form != "dense" or not bundle.dynamic:
        return path, data
    import onnx  # only the dense rewrite needs it (the runtime never does)

    from .sdt import densify_sdt

    model = onnx.load_model_from_string(data)
    return path, densify_sdt(model, bundle.config.num_tokens).SerializeToString()


def _parse(parser: Any, bundle: Any, path: Path, data: bytes, weights: bytes | None) -> tuple[bool, Any]:
    """Parse from the checked bytes: the graph, and its initializers handed over from ``weights`` in memory.

    A TensorRT without ``load_initializer`` (before 10.x) reads ``weights.bin`` by path itself.
    """
    if not (hasattr(parser, "load_model_proto") and hasattr(parser, "load_initializer")):
        return parser.parse(data, str(path)), None  # the path locates weights.bin next to the graph
    from ..ort_session import external_arrays

    if weights is None:
        weights = bundle.weights_bytes()
    arrays = external_arrays(data, weights, bundle.weights_file)
    if not parser.load_model_proto(data, str(path)):
        return False, None
    for name, a in arrays.items():
        if a.nbytes and not parser.load_initializer(name, a.ctypes.data, a.nbytes):
            return False, None
    return parser.parse_model_proto(), (weights, arrays)


def parse_group(trt: ModuleType, bundle: Any, index: int, sdt_form: str, verbose: bool = False,
                weights: bytes | None = None) -> ParsedGroup:
    """Parse a group's graph into a strongly typed TensorRT network (no build).

    ``weights``: ``bundle.weights_bytes()`` read once for several groups (else read and checked here).
    """
    log = _Logger(trt, verbose)
    builder = trt.Builder(log.logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        # precision comes from the graph's own types (the bundle dtype), never from builder heuristics
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log.logger)
    path, data = group_graph(bundle, index, sdt_form)
    ok, keep = _parse(parser, bundle, path, data, weights)
    if not ok:
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)] or log.errors
        hint = ""
        if any("NonZero" in e for e in errs):
            hint = " (this TensorRT has no NonZero: use --sdt dense or --sdt plugin)"
        elif any(PLUGIN_OP in e for e in errs):
            hint = f" (the {PLUGIN_OP} plugin is not registered: pass --plugin LIB or use --sdt dense)"
        raise DycError(f"{path}: TensorRT's ONNX parser failed{hint}: {errs[0] if errs else 'no message'}")
    return ParsedGroup(index, path, sdt_form, builder, network, parser, log, keep)


def _dims(shape: Any) -> list[int]:
    return [int(d) for d in shape]


def describe_network(trt: ModuleType, network: Any) -> dict[str, Any]:
    """Inputs, outputs and layers of a parsed network, with shapes as TensorRT infers them (batch = -1).

    Constant inputs of a layer (the weights) are listed with their shapes too, which is what shows a
    sliced matrix multiply: ``blocks.3.attn/Gemm_*`` multiplies by a [3·h·Dh, C] qkv weight.
    """
    producers: dict[str, Any] = {}
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producers[layer.get_output(j).name] = layer
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        ins = []
        for j in range(layer.num_inputs):
            t = layer.get_input(j)
            if t is None:
                continue
            src = producers.get(t.name)
            ins.append({"name": t.name, "shape": _dims(t.shape), "dtype": t.dtype.name,
                        "constant": bool(src is not None and src.type == trt.LayerType.CONSTANT)})
        outs = [{"name": layer.get_output(j).name, "shape": _dims(layer.get_output(j).shape),
                 "dtype": layer.get_output(j).dtype.name} for j in range(layer.num_outputs)]
        layers.append({"name": layer.name, "type": layer.type.name, "inputs": ins, "outputs": outs})
    io = {
        "inputs": [{"name": network.get_input(i).name, "shape": _dims(network.get_input(i).shape),
                    "dtype": network.get_input(i).dtype.name} for i in range(network.num_inputs)],
        "outputs": [{"name": network.get_output(i).name, "shape": _dims(network.get_output(i).shape),
                     "dtype": network.get_output(i).dtype.name} for i in range(network.num_outputs)],
    }
    return {**io, "layers": layers}


def layer_type_counts(desc: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for layer in desc["layers"]:
        out[layer["type"]] = out.get(layer["type"], 0) + 1
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# building
def _profile_shapes(network: Any, batches: Sequence[int]) -> dict[str, tuple[list[int], list[int], list[int]]]:
    lo, hi = min(batches), max(batches)
    shapes = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = _dims(t.shape)
        if not dims or dims[0] != -1 or any(d < 0 for d in dims[1:]):
            raise DycError(f"graph input {t.name} has shape {dims}: expected a dynamic batch dimension only")
        shapes[t.name] = ([lo, *dims[1:]], [hi, *dims[1:]], [hi, *dims[1:]])
    return shapes


def _set_rtx_targets(trt: ModuleType, config: Any, targets: Sequence[str]) -> None:
    enums = []
    for cc in targets:
        name = _RTX_CC.get(cc)
        if name is None or not hasattr(trt.ComputeCapability, name):
            raise DycError(f"TensorRT-RTX cannot target compute capability {cc}: it supports "
                           f"{', '.join(k for k, v in _RTX_CC.items() if hasattr(trt.ComputeCapability, v))}")
        enums.append(getattr(trt.ComputeCapability, name))
    config.num_compute_capabilities = len(enums)
    for i, e in enumerate(enums):
        if not config.set_compute_capability(e, i):
            raise DycError(f"TensorRT-RTX refused target compute capability {targets[i]}")


def _build_gpu_cc() -> str | None:
    """Compute capability of the GPU that datacenter TensorRT builds for (device 0), if torch sees one."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{major}.{minor}"
    except Exception:  # no CUDA runtime at all: the build itself will say so
        return None
    return None


def choose_sdt_form(flavor: str, sdt: str, plugin_lib: Path | None, dynamic: bool) -> str:
    if not dynamic:
        return "none"  # a plain DiT has no SDT: its std graph is the whole model
    if sdt == "auto":
        if plugin_lib is not None:
            return "plugin"
        return "dense" if flavor == "tensorrt_rtx" else "gather"
    if sdt not in SDT_FORMS:
        raise DycError(f"unknown SDT form {sdt!r}: choose auto, {', '.join(SDT_FORMS)}")
    if sdt == "plugin" and plugin_lib is None:
        raise DycError(f"--sdt plugin needs the {PLUGIN_OP} TensorRT plugin library: build plugins/ with TensorRT "
                       f"headers and pass --plugin LIB (or set ${PLUGIN_ENV})")
    if sdt == "gather" and flavor == "tensorrt_rtx":
        raise DycError("TensorRT-RTX has no NonZero, so it cannot build --sdt gather: use --sdt dense or plugin")
    return sdt


def build_engines(
    bundle_path: str | os.PathLike,
    batch_sizes: Sequence[int] | str = DEFAULT_BATCH_SIZES,
    flavor: str = "auto",
    plugin_lib: str | os.PathLike | None = None,
    *,
    sdt: str = "auto",
    cfg_batch: bool = True,
    compute_capabilities: Sequence[str] | None = None,
    groups: Sequence[int] | None = None,
    verbose: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Build ``engines/group{i}.plan`` for every group of the bundle; returns the sidecar manifest.

    ``flavor``: ``auto`` (datacenter TensorRT if installed, else TensorRT-RTX), ``tensorrt`` or
    ``tensorrt_rtx``. ``plugin_lib``: the ``SdtMlp`` plugin library (default: ``$DYC_TRT_PLUGIN`` or a
    CMake build under ``plugins/``). ``compute_capabilities``: TensorRT-RTX targets (e.g. ``["8.6",
    "8.9"]``; default: its portable set); datacenter TensorRT builds for the GPU it runs on.
    ``groups``: build only these groups (tests); the manifest then lists only them.
    """
    from ..bundle import Bundle

    say = progress or (lambda _m: None)
    check_flavor(flavor)
    bsizes = parse_batch_sizes(batch_sizes)
    batches = engine_batches(bsizes, cfg_batch)
    bundle = Bundle.load(bundle_path)
    trt, flavor = import_trt(flavor)
    version = trt_version(trt)

    plugin = Path(plugin_lib) if plugin_lib is not None else (find_plugin_library() if sdt in ("auto", "plugin")
                                                               else None)
    if plugin is not None and bundle.dynamic and sdt in ("auto", "plugin"):
        load_plugin_library(trt, plugin)
    form = choose_sdt_form(flavor, sdt, plugin if sdt in ("auto", "plugin") else None, bundle.dynamic)
    if form != "plugin":
        plugin = None

    targets: list[str] | None
    if flavor == "tensorrt_rtx":
        targets = [normalize_cc(c) for c in compute_capabilities] if compute_capabilities else None
    else:
        if compute_capabilities:
            raise DycError("datacenter TensorRT builds for the GPU it runs on: --compute-capability is for "
                           "TensorRT-RTX only")
        cc = _build_gpu_cc()
        targets = [cc] if cc else None

    out_dir = bundle.path / ENGINES_DIR
    out_dir.mkdir(exist_ok=True)
    # datacenter TensorRT: one timing cache for all groups (their layers repeat), kept for rebuilds.
    # TensorRT-RTX: none; its timing cache forces a GPU query (no CPU-only AOT build) and has no effect.
    cache_path = out_dir / "timing.cache" if flavor == "tensorrt" else None
    timing_cache = None
    indices = list(range(len(bundle.groups))) if groups is None else sorted(set(int(g) for g in groups))
    tmp_plans: list[tuple[Path, Path]] = []
    entries: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    weights = bundle.weights_bytes()  # read and checked once; every group's initializers come from it
    try:
        for gi in indices:
            t0 = time.perf_counter()
            pg = parse_group(trt, bundle, gi, form, verbose, weights=weights)
            desc = describe_network(trt, pg.network)
            config = pg.builder.create_builder_config()
            if bundle.dtype == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
                config.clear_flag(trt.BuilderFlag.TF32)  # fp32 bundles promise fp32 maths (verify at 1e-4)
            if hasattr(trt, "ProfilingVerbosity"):
                # layer names and tactics stay in the plan, so the engine inspector can show them on the GPU
                config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
            if flavor == "tensorrt_rtx" and targets:
                _set_rtx_targets(trt, config, targets)
            if cache_path is not None:
                if timing_cache is None:
                    timing_cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
                config.set_timing_cache(timing_cache, ignore_mismatch=False)
            profile = pg.builder.create_optimization_profile()
            shapes = _profile_shapes(pg.network, batches)
            for name, (mn, opt, mx) in shapes.items():
                profile.set_shape(name, mn, opt, mx)
            config.add_optimization_profile(profile)
            plan = pg.builder.build_serialized_network(pg.network, config)
            if plan is None:
                msg = pg.logger.errors[-1] if pg.logger.errors else "no message"
                raise DycError(f"TensorRT ({flavor} {version}) failed to build group {gi}: {msg}")
            final = out_dir / f"group{gi}.plan"
            tmp = out_dir / f".group{gi}.plan.tmp-{os.getpid()}"
            tmp_plans.append((tmp, final))
            with open(tmp, "wb") as f:
                f.write(memoryview(plan))
                f.flush()
                os.fsync(f.fileno())
            seconds = time.perf_counter() - t0
            entries.append({
                "group": gi,
                "plan": f"{ENGINES_DIR}/{final.name}",
                "bytes": memoryview(plan).nbytes,
                "sha256": sha256_bytes(memoryview(plan)),  # of the bytes written, not reread
                "onnx": pg.onnx_path.name,
                "onnx_sha256": bundle.manifest["files"][pg.onnx_path.name]["sha256"],
                "sdt_form": form,
                "inputs": [{**i, "profile": {"min": shapes[i["name"]][0], "opt": shapes[i["name"]][1],
                                             "max": shapes[i["name"]][2]}} for i in desc["inputs"]],
                "outputs": desc["outputs"],
                "network_layers": len(desc["layers"]),
                "layer_types": layer_type_counts(desc),
                "build_seconds": round(seconds, 3),
            })
            say(f"build-engines: group {gi + 1}/{len(bundle.groups)} ({flavor} {version}, sdt {form}): "
                f"{len(desc['layers'])} layers, {entries[-1]['bytes'] / 2**20:.1f} MiB, {seconds:.1f} s")
            del pg, plan, config
        if timing_cache is not None and cache_path is not None:
            atomic_write_bytes(cache_path, bytes(memoryview(timing_cache.serialize())))
        for tmp, final in tmp_plans:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in tmp_plans:
            tmp.unlink(missing_ok=True)
        raise
    manifest = {
        "schema_version": TRT_MANIFEST_SCHEMA,
        "flavor": flavor,
        "tensorrt_version": version,
        "onnx_parser_version": str(trt.get_nv_onnx_parser_version()) if hasattr(trt, "get_nv_onnx_parser_version")
        else None,
        "target_compute_capabilities": targets,
        "target_note": (RTX_DEFAULT_TARGETS if flavor == "tensorrt_rtx" and not targets else
                        "TensorRT-RTX targets set at build" if flavor == "tensorrt_rtx" else
                        "datacenter TensorRT: plans run only on GPUs of the compute capability they were built on"),
        "built_on": {"host": platform.node(), "machine": platform.machine(), "gpu_compute_capability": _build_gpu_cc()},
        "bundle_manifest_sha256": bundle.manifest["manifest_sha256"],
        "dtype": bundle.dtype,
        "sdt_form": form,
        "plugin": None if plugin is None else {"library": str(plugin.resolve()), "sha256": sha256_file(plugin),
                                               "op": PLUGIN_OP},
        "options": {"batch_sizes": list(bsizes), "cfg_batch": cfg_batch, "engine_batches": list(batches),
                    "profile": {"min": min(batches), "opt": max(batches), "max": max(batches)},
                    "strongly_typed": hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"),
                    "timing_cache": None if cache_path is None else f"{ENGINES_DIR}/{cache_path.name}"},
        "engines": entries,
        "build_seconds": round(time.perf_counter() - t_all, 3),
    }
    write_trt_manifest(bundle.path, manifest)
    return manifest


def remove_engines(bundle_path: str | os.PathLike) -> None:
    """Delete a bundle's TensorRT engines (the sidecar first, so no half state is ever loadable)."""
    d = Path(bundle_path) / ENGINES_DIR
    if d.is_dir():
        (d / "trt_manifest.json").unlink(missing_ok=True)
        shutil.rmtree(d)
