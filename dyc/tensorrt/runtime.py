"""Run a bundle's TensorRT engines: the ``tensorrt`` backend of ``dyc run``, ``dyc bench`` and ``dyc.Pipeline``.

* One execution context per engine. The scheduler runs one engine per sampling step, never two at
  once, so all contexts share **one activation buffer**, sized for the largest engine: contexts are
  created with user-managed device memory and each is pointed at the same torch allocation.
* Inputs and outputs are bound to torch CUDA tensors (``data_ptr``): one set of static buffers per
  (engine, batch). A call copies the step's inputs into them on the current stream.
* After ``warmup`` eager runs of an (engine, batch), the next run executes once more (it is the
  pre-capture run TensorRT asks for after shapes change, and this call's result) and then captures
  ``execute_async_v3`` into a CUDA graph; later calls replay the graph. Engines that TensorRT says are
  not stream-capturable (data-dependent shapes: the ``gather`` SDT form) stay eager.
* Loading refuses, with a ``DycError`` that names the rebuild command, plans that were built by another
  TensorRT flavour or version, for another compute capability, for another compile of the bundle, or
  that were altered; TensorRT-RTX's header check (``get_engine_validity``) runs before deserialising.

The single place where an engine is executed is ``TensorRTBackend._execute``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from ..backends.base import Backend
from ..errors import DycError
from ..fileio import read_bytes, sha256_bytes
from .common import (
    FLAVORS,
    PIP_HINT,
    import_trt,
    read_trt_manifest,
    rebuild_hint,
    trt_version,
)

if TYPE_CHECKING:
    from ..bundle import Bundle

_TORCH_OF_TRT = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                 "INT32": torch.int32, "BOOL": torch.bool, "UINT8": torch.uint8, "INT8": torch.int8}
# TensorRT-RTX without explicit targets: what its documentation says its default AOT plans run on
_RTX_DEFAULT_CCS = ("8.0", "8.6", "8.9")
_RTX_DEFAULT_MIN_NEWER = (12, 0)


def rtx_runs_on(cc: str, targets: list[str] | None) -> bool:
    """Whether a TensorRT-RTX plan built for ``targets`` (None: its default) can run on compute capability ``cc``."""
    if targets:
        return cc in targets
    major, minor = (int(v) for v in cc.split("."))
    return cc in _RTX_DEFAULT_CCS or (major, minor) >= _RTX_DEFAULT_MIN_NEWER


def _validity_reasons(trt: ModuleType, diagnostics: int) -> list[str]:
    enum = getattr(trt, "EngineInvalidityDiagnostics", None)
    if enum is None:
        return []
    return [name for name, v in enum.__members__.items() if int(diagnostics) & int(v)]


@dataclass
class _Slot:
    """Static IO buffers (and, once captured, the CUDA graph) of one (engine, batch)."""

    batch: int
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    runs: int = 0
    graph: Any = None  # torch.cuda.CUDAGraph after capture


@dataclass
class _Engine:
    index: int
    engine: Any
    context: Any
    inputs: dict[str, torch.dtype]
    outputs: dict[str, torch.dtype]
    input_dims: dict[str, list[int]]  # non-batch dims of each input, from the profile
    batch_range: tuple[int, int]
    memory_bytes: int
    capturable: bool | None = None  # None: not asked yet
    graph_note: str = ""
    slots: dict[int, _Slot] = field(default_factory=dict)


class TensorRTBackend(Backend):
    """``TensorRTBackend(bundle, device="cuda", ...)``: loads ``engines/group{i}.plan`` of every group.

    ``flavor``: which TensorRT to load the plans with (default: the one that built them).
    ``plugin_lib``: the ``SdtMlp`` plugin library for plugin-form engines (default: the one recorded at
    build, ``$DYC_TRT_PLUGIN`` or a build under ``plugins/``). ``cuda_graphs``: capture a graph per
    (engine, batch) after ``warmup`` eager runs. ``trt``: a TensorRT module to use instead of importing
    one (the tests pass a stand-in whose engines execute without a GPU; it sets ``DYC_EXECUTES_ON_HOST``).
    """

    name = "tensorrt"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import_trt("auto")
        except DycError as e:
            return False, str(e)
        if not torch.cuda.is_available():
            return False, "TensorRT engines run on NVIDIA GPUs and this torch sees no CUDA device"
        return True, ""

    def __init__(self, bundle: Bundle, *, device: str | torch.device = "cuda", flavor: str | None = None,
                 plugin_lib: str | os.PathLike | None = None, cuda_graphs: bool = True, warmup: int = 1,
                 trt: ModuleType | None = None, verify_plans: bool = True):
        self.bundle = bundle
        self.manifest = read_trt_manifest(bundle.path)
        m = self.manifest
        hint = rebuild_hint(bundle.path, m)
        if m.get("bundle_manifest_sha256") != bundle.manifest.get("manifest_sha256"):
            raise DycError(f"{bundle.path}: its TensorRT engines were built for an earlier compile of this bundle; "
                           f"rebuild them: {hint}")
        built_flavor = m.get("flavor")
        if built_flavor not in FLAVORS:
            raise DycError(f"{bundle.path}: engine manifest names an unknown TensorRT flavour {built_flavor!r}; {hint}")
        if flavor is not None and flavor not in ("auto", built_flavor):
            raise DycError(f"{bundle.path}: its engines were built with {built_flavor}, not {flavor}; rebuild them "
                           f"with --trt-flavor {flavor}: {hint}")
        if trt is None:
            try:
                trt, _ = import_trt(built_flavor)
            except DycError:
                raise DycError(f"{bundle.path}: its engines were built with {built_flavor} "
                               f"{m.get('tensorrt_version')}, which is not installed here ({PIP_HINT[built_flavor]}); "
                               f"or rebuild them with the TensorRT you have: {hint}") from None
        self.trt = trt
        have = trt_version(trt)
        if have != m.get("tensorrt_version"):
            raise DycError(f"{bundle.path}: its engines were built with {built_flavor} {m.get('tensorrt_version')} "
                           f"but this is {built_flavor} {have}; TensorRT plans load only in the version that built "
                           f"them: {hint}")
        self._device = torch.device(device)
        self._host_exec = bool(getattr(trt, "DYC_EXECUTES_ON_HOST", False))
        if self._device.type != "cuda" and not self._host_exec:
            raise DycError(f"TensorRT engines run on CUDA devices, not {self._device}")
        if self._device.type == "cuda":
            if not torch.cuda.is_available():
                raise DycError("TensorRT engines run on NVIDIA GPUs and this torch sees no CUDA device")
            if self._device.index is None:
                self._device = torch.device("cuda", torch.cuda.current_device())
            self._check_compute_capability(hint)
        self.use_graphs = bool(cuda_graphs) and self._device.type == "cuda"
        self.warmup = max(0, int(warmup))
        self.stats = {"executes": 0, "replays": 0, "captures": 0}
        self._load_plugin(plugin_lib)
        self._logger_errors: list[str] = []
        self._runtime = trt.Runtime(self._make_logger())
        self.engines: list[_Engine] = []
        entries = {int(e["group"]): e for e in m.get("engines", [])}
        missing = [g.index for g in bundle.groups if g.index not in entries]
        if missing:
            raise DycError(f"{bundle.path}: no TensorRT engine for group(s) {missing}; {hint}")
        with torch.cuda.device(self._device) if self._device.type == "cuda" else contextlib.nullcontext():
            for g in bundle.groups:
                self.engines.append(self._load_engine(g.index, entries[g.index], hint, verify_plans))
            # one activation buffer for all engines: they never run at the same time
            self.activation_bytes = max(e.memory_bytes for e in self.engines)
            self.activations = torch.empty(max(self.activation_bytes, 1), dtype=torch.uint8, device=self._device)
            for e in self.engines:
                self._set_device_memory(e.context, self.activations.data_ptr(), self.activation_bytes)

    # ---- loading -------------------------------------------------------------------------
    def _check_compute_capability(self, hint: str) -> None:
        major, minor = torch.cuda.get_device_capability(self._device)
        cc = f"{major}.{minor}"
        m = self.manifest
        targets = m.get("target_compute_capabilities")
        name = torch.cuda.get_device_name(self._device)
        if m["flavor"] == "tensorrt_rtx":
            if not rtx_runs_on(cc, targets):
                what = ", ".join(targets) if targets else m.get("target_note", "its default targets")
                raise DycError(
                    f"{self.bundle.path}: its TensorRT-RTX engines target compute capability {what}, and this GPU "
                    f"({name}) is {cc}" + (": TensorRT-RTX does not run on it at all (use datacenter TensorRT: "
                                           "--trt-flavor tensorrt)" if cc == "9.0" else "")
                    + f"; rebuild: {hint}")
        elif targets and cc not in targets:
            raise DycError(f"{self.bundle.path}: its TensorRT engines were built on a GPU of compute capability "
                           f"{', '.join(targets)}; this GPU ({name}) is {cc}; rebuild here: {hint}")
        self.compute_capability = cc

    def _load_plugin(self, plugin_lib: str | os.PathLike | None) -> None:
        if self.manifest.get("sdt_form") != "plugin":
            return
        from .build import find_plugin_library, load_plugin_library

        recorded = (self.manifest.get("plugin") or {}).get("library")
        lib = plugin_lib or (recorded if recorded and Path(recorded).is_file() else None) or find_plugin_library()
        if lib is None:
            raise DycError(f"{self.bundle.path}: its engines use the SdtMlp TensorRT plugin, built at {recorded}, "
                           "which is not here: pass plugin_lib= (or set $DYC_TRT_PLUGIN), or rebuild with --sdt dense")
        load_plugin_library(self.trt, lib)

    def _make_logger(self) -> Any:
        trt = self.trt
        sev = trt.ILogger.Severity
        errors = (sev.INTERNAL_ERROR, sev.ERROR)
        sink = self._logger_errors

        class L(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                if severity in errors:
                    sink.append(msg)

        self._logger = L()  # TensorRT keeps a pointer: the logger must outlive the runtime
        return self._logger

    def _load_engine(self, index: int, entry: dict, hint: str, verify: bool) -> _Engine:
        trt = self.trt
        path = self.bundle.path / entry["plan"]
        if not path.exists():
            raise DycError(f"{self.bundle.path}: TensorRT plan {entry['plan']} is missing; {hint}")
        # read once; the checksum is checked on these bytes and the engine deserialised from them
        plan = read_bytes(path, "TensorRT plan")
        if verify and sha256_bytes(plan) != entry.get("sha256"):
            raise DycError(f"{self.bundle.path}: TensorRT plan {entry['plan']} does not match its engine manifest "
                           f"(altered, or an interrupted or concurrent rebuild); {hint}")
        if hasattr(self._runtime, "get_engine_validity"):  # TensorRT-RTX: header check, before deserialising
            validity, diag = self._runtime.get_engine_validity(plan)
            if validity == trt.EngineValidity.INVALID:
                reasons = _validity_reasons(trt, diag) or ["no usable CUDA GPU or driver (TensorRT could not read "
                                                           "the GPU's properties)"]
                raise DycError(f"{self.bundle.path}: TensorRT-RTX says plan {entry['plan']} cannot run here: "
                               f"{', '.join(reasons)}; {hint}")
        self._logger_errors.clear()
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            why = self._logger_errors[-1] if self._logger_errors else "no message"
            raise DycError(f"{self.bundle.path}: {self.manifest['flavor']} {trt_version(trt)} could not load plan "
                           f"{entry['plan']} ({why}); it must be rebuilt for this TensorRT and GPU: {hint}")
        if hasattr(trt, "ExecutionContextAllocationStrategy"):
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        else:  # TensorRT < 10
            context = engine.create_execution_context_without_device_memory()
        if context is None:
            raise DycError(f"TensorRT could not create an execution context for group {index}")
        mem = int(engine.device_memory_size_v2 if hasattr(engine, "device_memory_size_v2")
                  else engine.device_memory_size)
        ins, outs, dims = {}, {}, {}
        lo, hi = 1, 1 << 30
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dt = _TORCH_OF_TRT.get(engine.get_tensor_dtype(name).name)
            if dt is None:
                raise DycError(f"group {index}: tensor {name} has an unsupported dtype {engine.get_tensor_dtype(name)}")
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                ins[name] = dt
                mn, _, mx = engine.get_tensor_profile_shape(name, 0)
                dims[name] = [int(d) for d in mx][1:]
                lo, hi = max(lo, int(mn[0])), min(hi, int(mx[0]))
            else:
                outs[name] = dt
        return _Engine(index, engine, context, ins, outs, dims, (lo, hi), mem)

    @staticmethod
    def _set_device_memory(context: Any, ptr: int, size: int) -> None:
        if hasattr(context, "set_device_memory"):
            context.set_device_memory(ptr, size)
        else:  # TensorRT < 10.1
            context.device_memory = ptr

    # ---- running -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    def _stream(self) -> int:
        return torch.cuda.current_stream(self._device).cuda_stream if self._device.type == "cuda" else 0

    def _slot(self, e: _Engine, batch: int) -> _Slot:
        slot = e.slots.get(batch)
        if slot is not None:
            return slot
        lo, hi = e.batch_range
        if not lo <= batch <= hi:
            raise DycError(f"batch {batch} is outside the TensorRT engines' profile ({lo}..{hi}, CFG included); "
                           f"rebuild with larger --batch-sizes: {rebuild_hint(self.bundle.path, self.manifest)}")
        ins = {n: torch.zeros((batch, *e.input_dims[n]), dtype=dt, device=self._device) for n, dt in e.inputs.items()}
        for n, t in ins.items():
            e.context.set_input_shape(n, tuple(t.shape))
        outs = {}
        for n, dt in e.outputs.items():
            shape = tuple(int(d) for d in e.context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise DycError(f"group {e.index}: output {n} has no static shape for batch {batch}: {shape}")
            outs[n] = torch.empty(shape, dtype=dt, device=self._device)
        slot = _Slot(batch, ins, outs)
        e.slots[batch] = slot
        return slot

    def _bind(self, e: _Engine, slot: _Slot) -> None:
        """Point the engine's one context at this batch's buffers (host-side calls only)."""
        ctx = e.context
        for n, t in slot.inputs.items():
            ctx.set_input_shape(n, tuple(t.shape))
            ctx.set_tensor_address(n, t.data_ptr())
        for n, t in slot.outputs.items():
            ctx.set_tensor_address(n, t.data_ptr())

    def _execute(self, e: _Engine, stream: int) -> None:
        """The one call that runs an engine: enqueue it on ``stream`` (asynchronous)."""
        self.stats["executes"] += 1
        if not e.context.execute_async_v3(stream):
            raise DycError(f"TensorRT failed to execute the engine of group {e.index}")

    def _capture(self, e: _Engine, slot: _Slot) -> None:
        if e.capturable is None:
            probe = getattr(e.context, "is_stream_capturable", None)
            e.capturable = bool(probe(self._stream())) if probe is not None else True
            if not e.capturable:
                e.graph_note = "TensorRT reports the engine is not stream-capturable (data-dependent shapes)"
        if not e.capturable:
            return
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        try:
            with torch.cuda.graph(graph, stream=side):
                self._execute(e, side.cuda_stream)
        except Exception as exc:  # capture is an optimisation: stay eager, say why in graph_note
            e.capturable = False
            e.graph_note = f"CUDA graph capture failed: {exc}"
            return
        torch.cuda.current_stream(self._device).wait_stream(side)
        slot.graph = graph
        self.stats["captures"] += 1

    @torch.no_grad()
    def run_group(self, group: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        e = self.engines[group]
        missing = [n for n in e.inputs if n not in inputs]
        if missing:
            raise DycError(f"group {group} engine needs inputs {missing} that the scheduler did not give")
        slot = self._slot(e, int(inputs["x"].shape[0]))
        for n, buf in slot.inputs.items():
            buf.copy_(inputs[n], non_blocking=True)
        if slot.graph is not None:
            slot.graph.replay()
            self.stats["replays"] += 1
        else:
            self._bind(e, slot)
            self._execute(e, self._stream())
            slot.runs += 1
            if self.use_graphs and slot.runs > self.warmup:
                self._capture(e, slot)
        # the static buffer is overwritten by the next call of this (engine, batch): hand out a copy
        return slot.outputs["out"].clone()

    def graph_status(self) -> dict[tuple[int, int], bool]:
        """(group, batch) -> whether a CUDA graph replays it."""
        return {(e.index, b): s.graph is not None for e in self.engines for b, s in e.slots.items()}

    def close(self) -> None:
        for e in self.engines:
            for s in e.slots.values():
                s.graph = None
            e.slots.clear()
        self.engines.clear()
        self.activations = None


def inspect_plan(bundle_path: str | os.PathLike, group: int, trt: ModuleType | None = None) -> dict[str, Any]:
    """What the engine inspector shows of a built plan: layers (JSON), IO tensors with shapes, profiles.

    Needs a GPU that the plan runs on (TensorRT deserialises plans only with a CUDA device present).
    """
    m = read_trt_manifest(bundle_path)
    entry = next((e for e in m["engines"] if int(e["group"]) == int(group)), None)
    if entry is None:
        raise DycError(f"{bundle_path}: no TensorRT engine for group {group}")
    if trt is None:
        trt, _ = import_trt(m["flavor"])
    if m.get("sdt_form") == "plugin":
        from .build import find_plugin_library, load_plugin_library

        lib = (m.get("plugin") or {}).get("library") or find_plugin_library()
        load_plugin_library(trt, lib)
    logger = trt.Logger(trt.Logger.ERROR)
    runtime = trt.Runtime(logger)
    plan = read_bytes(Path(bundle_path) / entry["plan"], "TensorRT plan")
    if sha256_bytes(plan) != entry.get("sha256"):
        raise DycError(f"{bundle_path}: TensorRT plan {entry['plan']} does not match its engine manifest; "
                       f"{rebuild_hint(bundle_path, m)}")
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise DycError(f"{bundle_path}: {entry['plan']} cannot be deserialised here (TensorRT needs a GPU that the "
                       f"plan targets); {rebuild_hint(bundle_path, m)}")
    import json

    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        d = {"name": name, "mode": engine.get_tensor_mode(name).name, "dtype": engine.get_tensor_dtype(name).name,
             "shape": [int(v) for v in engine.get_tensor_shape(name)]}
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            d["profiles"] = [[[int(v) for v in s] for s in engine.get_tensor_profile_shape(name, p)]
                             for p in range(engine.num_optimization_profiles)]
        io.append(d)
    return {"layers": info.get("Layers", []), "io": io, "num_optimization_profiles": engine.num_optimization_profiles,
            "device_memory_bytes": int(getattr(engine, "device_memory_size_v2", 0))}
