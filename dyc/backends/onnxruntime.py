"""The ONNX Runtime backend: one InferenceSession per group, from the bundle's standard-op graphs.

The ``std`` variant decomposes SDT into standard ops, so stock ONNX Runtime runs it. CPU EP by
default; ``device="cuda[:i]"`` asks for the CUDA EP (the ``onnxruntime-gpu`` wheel). On CUDA the
inputs and the output are bound in place from/to torch tensors (IO binding): the latents never
leave the GPU between steps. On the CPU plain ``run`` on numpy views costs no copy either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import DycError
from .base import Backend

if TYPE_CHECKING:
    from ..bundle import Bundle

_TORCH_OF_ORT = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
                 "tensor(bfloat16)": torch.bfloat16}
_NP_OF_TORCH = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
_shared_cpu_arena = False


def _share_cpu_arena(ort, opts) -> None:
    """Let every session draw on one process-wide CPU arena instead of one arena each.

    Groups run one after another, so their activations never coexist: one arena sized for the
    largest group serves them all (DESIGN.md §5), instead of K arenas that each grow to its own peak.
    """
    global _shared_cpu_arena
    if not _shared_cpu_arena:
        mem = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(mem, ort.OrtArenaCfg(0, -1, -1, -1))
        _shared_cpu_arena = True
    opts.add_session_config_entry("session.use_env_allocators", "1")


class OnnxRuntimeBackend(Backend):
    """``OnnxRuntimeBackend(bundle, device="cpu", threads=None)``: sessions for every group, built at load.

    ``share_arena`` (CPU): all sessions allocate activations from one shared arena.
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
                 variant: str = "std", share_arena: bool = True):
        import onnxruntime as ort

        self._device = torch.device(device)
        self.bundle = bundle
        if bundle.dtype == "bf16":  # CPU EP: no bf16 kernels; CUDA: numpy (ORT's binding types) has no bf16
            raise DycError(f"{bundle.path.name} is a bf16 bundle, which the onnxruntime backend does not run; "
                           "compile with --dtype fp32 or fp16, or use the torch or tensorrt backend")
        if self._device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise DycError("the onnxruntime backend on CUDA needs onnxruntime-gpu (this onnxruntime has "
                               f"only {', '.join(ort.get_available_providers())})")
            providers = [("CUDAExecutionProvider", {"device_id": self._device.index or 0}), "CPUExecutionProvider"]
        elif self._device.type == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise DycError(f"the onnxruntime backend runs on cpu or cuda, not {self._device}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        if self._device.type == "cpu" and share_arena:
            _share_cpu_arena(ort, opts)
        self.sessions = []
        for g in bundle.groups:
            path = bundle.onnx_path(g, variant)
            try:
                sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as e:  # ORT raises its own Fail/InvalidGraph types
                raise DycError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
            self.sessions.append(sess)
        self.input_types = [{i.name: _TORCH_OF_ORT.get(i.type) for i in s.get_inputs()} for s in self.sessions]
        self.output_type = _TORCH_OF_ORT.get(self.sessions[0].get_outputs()[0].type, torch.float32)
        cfg = bundle.config
        self._out_shape = (cfg.out_channels, cfg.input_size, cfg.input_size)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def providers(self) -> list[str]:
        return self.sessions[0].get_providers()

    def _feeds(self, group: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        want = self.input_types[group]
        missing = [n for n in want if n not in inputs]
        if missing:
            raise DycError(f"group {group} engine needs inputs {missing} that the scheduler did not give")
        return {n: inputs[n].to(device=self._device, dtype=dt).contiguous() for n, dt in want.items()}

    @torch.no_grad()
    def run_group(self, group: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = self._feeds(group, inputs)
        sess = self.sessions[group]
        if self._device.type == "cpu":
            out = sess.run(["out"], {n: v.numpy() for n, v in feeds.items()})[0]
            return torch.from_numpy(out)
        # CUDA: bind torch memory directly; ORT runs on its own stream, so let torch's work finish first
        idx = self._device.index or 0
        binding = sess.io_binding()
        for n, v in feeds.items():
            binding.bind_input(n, "cuda", idx, _NP_OF_TORCH[v.dtype], tuple(v.shape), v.data_ptr())
        out = torch.empty((feeds["x"].shape[0], *self._out_shape), dtype=self.output_type, device=self._device)
        binding.bind_output("out", "cuda", idx, _NP_OF_TORCH[out.dtype], tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self._device).synchronize()
        sess.run_with_iobinding(binding)
        return out

    def close(self) -> None:
        self.sessions.clear()
