"""The ONNX Runtime backend: one InferenceSession per group, all over one copy of the weights.

Graphs: ``std`` (SDT in standard ops, stock ONNX Runtime) on the CPU; on CUDA the bundle's
``cuda`` graphs (``dyc::SdtMlp`` from ``libdyc_ort_ops.so``, fused multi-head attention) where the
bundle has them and the custom-op library is found, else ``std``. ``variant=`` picks one.

Weights (``share_weights=True``, the default): every group graph is read once, checked against
the manifest's sha256 and rewritten in memory so that its weights are graph inputs
(``ort_weights``), and all sessions are bound to views into one copy of the parts of ``weights.bin``
they reference (host memory, or one device allocation on CUDA): K groups cost one copy of the
weights, not K, and the other variants' tensors cost nothing. On the CPU this forgoes ONNX
Runtime's pre-packed GEMM weights (one copy per session each); with ``share_weights=False``
sessions own their weights (from the same checked bytes, the whole file), K copies.

CUDA: inputs and output are bound in place (IO binding) to static per-(group, batch) buffers,
every session runs on one side stream ordered with torch's current stream, and with
``cuda_graphs=True`` ONNX Runtime captures one CUDA graph per (group, batch) (``gpu_graph_id``)
and replays it. Nothing crosses to the host per step.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import DycError
from .base import Backend
from .ort_weights import WeightRef, device_weights, host_weights, remap, spans_of, weights_as_inputs

if TYPE_CHECKING:
    from ..bundle import Bundle

_TORCH_OF_ORT = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
                 "tensor(bfloat16)": torch.bfloat16}
_ONNX_OF_TORCH = {torch.float32: 1, torch.float16: 10, torch.int64: 7, torch.bfloat16: 16}  # onnx.TensorProto
_NP_OF_ONNX = {1: np.float32, 10: np.float16, 7: np.int64}
_WEIGHTS = "weights.bin"
_shared_arenas: set[int | None] = set()  # None: the CPU; else a CUDA device index


def _share_arena(ort, opts, cuda_index: int | None) -> None:
    """Let every session draw on one process-wide arena (the CPU's, or CUDA device ``cuda_index``'s)
    instead of one arena each.

    Groups run one after another, so their activations never coexist: one arena sized for the
    largest group serves them all (DESIGN.md §5), instead of K arenas that each grow to its own peak
    (DiT-XL/2 fp16 on an H200: 1.54x the weights after a call per group, against 3.45x).
    """
    if cuda_index not in _shared_arenas:
        if cuda_index is None:
            mem = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(mem, ort.OrtArenaCfg(0, -1, -1, -1))
        else:  # kSameAsRequested (1), as the sessions' own CUDA arenas
            mem = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, cuda_index,
                                    ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator_v2("CUDAExecutionProvider", mem, {"device_id": str(cuda_index)},
                                                 ort.OrtArenaCfg(0, 1, -1, -1))
        _shared_arenas.add(cuda_index)
    opts.add_session_config_entry("session.use_env_allocators", "1")


# cuBLAS gives every handle a default workspace sized by CUBLAS_WORKSPACE_CONFIG (~60 MB each on the
# H200), and each CUDA session creates its own handle: 8 sessions held ~0.5 GB of workspaces, a fifth
# of DiT-XL/2's fp16 weights (bench/RESULTS.md). The groups run one at a time on one stream, so one
# 4 MiB pool each is enough (same speed there). cuBLAS reads the variable when the process's first
# handle is created: it applies where the sessions are created before any other cuBLAS use (the
# backend is built before sampling starts), not after torch has run a GEMM (dyc bench's eager rows
# run first: set it at the process's start there).
CUBLAS_WORKSPACE = ":4096:1"


@contextmanager
def _cublas_workspace(config: str | None):
    """CUBLAS_WORKSPACE_CONFIG=``config`` while the sessions create their cuBLAS handles, unless the
    user set it (theirs wins) or ``config`` is None (cuBLAS's default)."""
    if config is None or "CUBLAS_WORKSPACE_CONFIG" in os.environ:
        yield
        return
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = config
    try:
        yield
    finally:
        del os.environ["CUBLAS_WORKSPACE_CONFIG"]


def ops_library() -> Path | None:
    """``libdyc_ort_ops.so`` (custom ops ``dyc::SdtMlp``, ``dyc::LnModulate``, ``dyc::GatedResidual``,
    ``dyc::TokenKeep``):
    ``$DYC_ORT_OPS_LIB``, else beside ``$DYC_PLUGIN_LIB``, else a CMake build folder of this checkout
    (``build/lib``, ``build/*/lib``)."""
    env = os.environ.get("DYC_ORT_OPS_LIB")
    if env:
        p = Path(env)
        if not p.is_file():
            raise DycError(f"DYC_ORT_OPS_LIB={env}: no such file")
        return p
    cands = []
    if os.environ.get("DYC_PLUGIN_LIB"):
        cands.append(Path(os.environ["DYC_PLUGIN_LIB"]).parent / "libdyc_ort_ops.so")
    root = Path(__file__).resolve().parents[2]
    cands += [root / "build" / "lib" / "libdyc_ort_ops.so", *sorted(root.glob("build/*/lib/libdyc_ort_ops.so"))]
    return next((p for p in cands if p.is_file()), None)


def ops_library_abi(lib: str | os.PathLike) -> int:
    """``dyc_ort_ops_abi()`` of a ``libdyc_ort_ops.so`` (1 for libraries from before the symbol)."""
    import ctypes

    try:
        so = ctypes.CDLL(str(lib))
    except OSError as e:
        raise DycError(f"{lib}: cannot load the custom-op library ({e})") from None
    fn = getattr(so, "dyc_ort_ops_abi", None)
    return int(fn()) if fn is not None else 1


def _bind_device_input(binding, name: str, index: int, onnx_type: int, shape: list[int], ptr: int) -> None:
    try:  # onnx element types (bf16 included) where this onnxruntime takes them, else numpy's
        binding.bind_input(name, "cuda", index, onnx_type, shape, ptr)
    except TypeError:
        if onnx_type not in _NP_OF_ONNX:
            raise DycError("this onnxruntime cannot bind bfloat16 inputs (upgrade onnxruntime-gpu)") from None
        binding.bind_input(name, "cuda", index, _NP_OF_ONNX[onnx_type], shape, ptr)


@dataclass
class _Bound:
    """A (group, batch) on CUDA: static input/output buffers bound once, and its CUDA graph's id."""

    binding: Any
    run_options: Any
    inputs: dict[str, torch.Tensor]
    out: torch.Tensor


@dataclass
class _Group:
    sess: Any
    inputs: dict[str, torch.dtype]  # the graph's own inputs (weights excluded) and their dtypes
    weights: list[WeightRef] = field(default_factory=list)
    cpu_binding: Any = None  # CPU: one IO binding with the weights bound once
    bound: dict[int, _Bound] = field(default_factory=dict)  # CUDA: per batch size


class OnnxRuntimeBackend(Backend):
    """``OnnxRuntimeBackend(bundle, device="cpu", threads=None)``: sessions for every group, built at load.

    ``variant``: ``std`` | ``trt`` | ``cuda`` (default: ``cuda`` on CUDA where possible, else ``std``).
    ``share_weights``: one copy of the weights for all sessions. ``share_arena``: all sessions
    allocate activations from one arena. ``cuda_graphs`` (CUDA): capture and replay CUDA graphs.
    ``custom_ops``: path of ``libdyc_ort_ops.so`` (default: ``ops_library()``).
    ``cublas_workspace`` (CUDA): the CUBLAS_WORKSPACE_CONFIG the sessions' cuBLAS handles are created
    with (default ``CUBLAS_WORKSPACE``, one 4 MiB pool; None: cuBLAS's default; a CUBLAS_WORKSPACE_CONFIG
    already in the environment wins).
    """

    name = "onnxruntime"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False, "needs the onnxruntime package (pip install onnxruntime, or onnxruntime-gpu for CUDA)"
        return True, ""

    def __init__(self, bundle: Bundle, *, device: str | torch.device = "cpu", threads: int | None = None,
                 variant: str | None = None, share_arena: bool = True, share_weights: bool = True,
                 cuda_graphs: bool = True, custom_ops: str | os.PathLike | None = None,
                 cublas_workspace: str | None = CUBLAS_WORKSPACE):
        import onnxruntime as ort

        self._ort = ort
        self._device = torch.device(device)
        self.bundle = bundle
        cuda = self._device.type == "cuda"
        if self._device.type not in ("cpu", "cuda"):
            raise DycError(f"the onnxruntime backend runs on cpu or cuda, not {self._device}")
        if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DycError("the onnxruntime backend on CUDA needs onnxruntime-gpu (this onnxruntime has "
                           f"only {', '.join(ort.get_available_providers())})")
        lib = Path(custom_ops) if custom_ops else ops_library()
        if variant is None:
            variant = "cuda" if cuda and bundle.has_variant("cuda") and lib else "std"
        if variant not in ("std", "trt", "cuda"):
            raise DycError(f"unknown ONNX variant {variant!r}: choose std, trt or cuda")
        needs_ops = variant in ("trt", "cuda")
        if needs_ops and lib is None:
            raise DycError(f"the {variant!r} graphs need libdyc_ort_ops.so (build plugins/ with CMake, or set "
                           "DYC_ORT_OPS_LIB)")
        if bundle.dtype == "bf16" and not (cuda and variant == "cuda"):
            raise DycError(f"{bundle.path.name} is a bf16 bundle, which the onnxruntime backend does not run "
                           f"{'with the ' + variant + ' graphs' if cuda else 'on the CPU'} (bf16 needs CUDA and "
                           "the cuda graphs); compile with --dtype fp32 or fp16, or use the torch or tensorrt backend")
        self.variant = variant
        # the cuda graphs read the head/channel masks of row 0: every row of a call must share its t
        self.mixed_timesteps = variant != "cuda"
        self.share_weights = share_weights
        self.cuda_graphs = cuda and cuda_graphs
        self._index = self._device.index if self._device.index is not None else (
            torch.cuda.current_device() if cuda else 0)
        self._stream = torch.cuda.Stream(self._device) if cuda else None

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
        if needs_ops:
            opts.register_custom_ops_library(str(lib))
        if share_arena:
            _share_arena(ort, opts, self._index if cuda else None)
        if share_weights and not cuda:
            # pre-packing would give every session its own packed copy of every GEMM weight
            opts.add_session_config_entry("session.disable_prepacking", "1")

        wbytes = bundle.manifest["files"][_WEIGHTS]["bytes"]
        graphs = [bundle.graph_bytes(g, variant) for g in bundle.groups]
        if variant == "cuda":
            from ..compiler.export_cuda import required_ops_abi

            need, have = max(required_ops_abi(b) for b in graphs), ops_library_abi(lib)
            if have < need:  # an older library would fail at run time, or ignore ones_column silently
                raise DycError(f"{lib} is older than {bundle.path.name}'s cuda graphs (op library ABI {have}, the "
                               f"graphs need {need}: dyc::TokenKeep, LnModulate's ones_column): rebuild it "
                               "(cmake --build <build dir> --target dyc_ort_ops)")
        if variant == "cuda" and not cuda:  # ORT's CPU attention kernel takes Q, K, V apart: same maths
            import onnx

            from ..compiler.export_cuda import cpu_form

            graphs = [cpu_form(onnx.ModelProto.FromString(b)).SerializeToString() for b in graphs]
        if share_weights:
            rewritten = [weights_as_inputs(b, _WEIGHTS, wbytes, str(bundle.onnx_path(g, variant)))
                         for b, g in zip(graphs, bundle.groups, strict=True)]
            # one copy of the checked bytes these graphs reference (not the other variants' tensors):
            # host memory, or streamed straight into one device allocation
            spans = spans_of(r for _, refs in rewritten for r in refs)
            self._weights = device_weights(bundle, self._device, spans) if cuda else host_weights(bundle, spans)
            rewritten = [(model, remap(refs, spans)) for model, refs in rewritten]
        else:
            host = host_weights(bundle)  # ORT copies what it needs from these checked bytes, per session
            opts.add_external_initializers_from_files_in_memory([_WEIGHTS], [host], [len(host)])
            self._weights = None
            rewritten = [(b, []) for b in graphs]

        self.groups: list[_Group] = []
        for g, (model, refs) in zip(bundle.groups, rewritten, strict=True):
            with _cublas_workspace(cublas_workspace if cuda else None):
                sess = self._session(ort, model, opts, bundle.onnx_path(g, variant))
            names = {r.name for r in refs}
            ins = {i.name: _TORCH_OF_ORT.get(i.type) for i in sess.get_inputs() if i.name not in names}
            grp = _Group(sess, ins, refs)
            if not cuda:
                grp.cpu_binding = sess.io_binding()
                for r in refs:  # views into the one host copy; ORT reads them in place
                    view = self._weights[r.offset: r.offset + r.length].view(_NP_OF_ONNX[r.onnx_type]).reshape(r.shape)
                    grp.cpu_binding.bind_cpu_input(r.name, view)
            self.groups.append(grp)
        if not share_weights:
            del host
        cfg = bundle.config
        self._out_shape = (cfg.out_channels, cfg.input_size, cfg.input_size)
        self.output_type = _TORCH_OF_ORT.get(self.groups[0].sess.get_outputs()[0].type, torch.float32)

    def _providers(self, cuda_graphs: bool) -> list:
        if self._device.type == "cpu":
            return ["CPUExecutionProvider"]
        opts = {"device_id": str(self._index), "user_compute_stream": str(self._stream.cuda_stream),
                "arena_extend_strategy": "kSameAsRequested"}
        if cuda_graphs:
            opts["enable_cuda_graph"] = "1"
        return [("CUDAExecutionProvider", opts)]

    def _session(self, ort, model: bytes, opts, path: Path):
        try:
            return ort.InferenceSession(model, sess_options=opts, providers=self._providers(self.cuda_graphs))
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            first = str(e).splitlines()[0]
            if self.cuda_graphs:  # e.g. a node ORT placed on the CPU: run without graphs, and say so
                print(f"warning: {path.name}: no CUDA graphs ({first}); running without", file=sys.stderr)
                self.cuda_graphs = False
                return self._session(ort, model, opts, path)
            raise DycError(f"{path}: ONNX Runtime cannot load it ({first})") from None

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def providers(self) -> list[str]:
        return self.groups[0].sess.get_providers()

    @property
    def input_types(self) -> list[dict[str, torch.dtype]]:
        return [g.inputs for g in self.groups]

    def weight_bytes(self) -> int:
        """Bytes of weights this backend holds when shared: one copy of the parts of weights.bin its
        graphs reference (0 when each session owns its weights)."""
        return 0 if self._weights is None else int(self._weights.nbytes)  # uint8: numpy (CPU) or torch (CUDA)

    def _feeds(self, group: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        want = self.groups[group].inputs
        missing = [n for n in want if n not in inputs]
        if missing:
            raise DycError(f"group {group} engine needs inputs {missing} that the scheduler did not give")
        return {n: inputs[n].to(device=self._device, dtype=dt).contiguous() for n, dt in want.items()}

    @torch.no_grad()
    def run_group(self, group: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = self._feeds(group, inputs)
        grp = self.groups[group]
        if self._device.type == "cpu":
            if grp.cpu_binding is None:
                out = grp.sess.run(["out"], {n: v.numpy() for n, v in feeds.items()})[0]
                return torch.from_numpy(out)
            b = grp.cpu_binding
            for n, v in feeds.items():
                b.bind_cpu_input(n, v.numpy())
            b.bind_output("out")
            grp.sess.run_with_iobinding(b)
            return torch.from_numpy(b.copy_outputs_to_cpu()[0])
        batch = feeds["x"].shape[0]
        bound = grp.bound.get(batch) or self._bind(grp, feeds)
        cur = torch.cuda.current_stream(self._device)
        self._stream.wait_stream(cur)
        with torch.cuda.stream(self._stream):
            for n, buf in bound.inputs.items():
                buf.copy_(feeds[n], non_blocking=True)
            grp.sess.run_with_iobinding(bound.binding, bound.run_options)
        cur.wait_stream(self._stream)
        return bound.out.clone()

    def _bind(self, grp: _Group, feeds: dict[str, torch.Tensor]) -> _Bound:
        """Static buffers for this batch size, bound once with the weights (fixed addresses for the graph)."""
        ort = self._ort
        batch = feeds["x"].shape[0]
        b = grp.sess.io_binding()
        dev, idx = "cuda", self._index
        if self._weights is not None:
            base = self._weights.data_ptr()
            for r in grp.weights:
                _bind_device_input(b, r.name, idx, r.onnx_type, list(r.shape), base + r.offset)
        bufs = {}
        with torch.cuda.stream(self._stream):
            for n, v in feeds.items():
                bufs[n] = torch.empty_like(v)
                _bind_device_input(b, n, idx, _ONNX_OF_TORCH[v.dtype], list(v.shape), bufs[n].data_ptr())
            out = torch.empty((batch, *self._out_shape), dtype=self.output_type, device=self._device)
        try:
            b.bind_output("out", dev, idx, _ONNX_OF_TORCH[out.dtype], list(out.shape), out.data_ptr())
        except TypeError:
            b.bind_output("out", dev, idx, _NP_OF_ONNX[_ONNX_OF_TORCH[out.dtype]], list(out.shape), out.data_ptr())
        ro = ort.RunOptions()
        ro.add_run_config_entry("disable_synchronize_execution_providers", "1")  # ordered by streams instead
        if self.cuda_graphs:
            ro.add_run_config_entry("gpu_graph_id", str(len(grp.bound)))  # one graph per batch size
        bound = _Bound(b, ro, bufs, out)
        grp.bound[batch] = bound
        return bound

    def close(self) -> None:
        self.groups.clear()
        self._weights = None
