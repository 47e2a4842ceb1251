"""``dyc serve``: a bundle behind NVIDIA Triton Inference Server (HTTP and gRPC), through PyTriton.

PyTriton starts the ``tritonserver`` binary its wheel ships and a Python-backend proxy model per
instance; each request reaches ``TritonBinding.infer`` here, which validates it, hands it to the
``StepBatcher`` and waits for its chain to finish. Triton runs one request at a time per model
instance, so the model gets ``max_inflight`` instances: that many requests share the batcher's
engine calls, later ones wait in Triton's queue.

Models: ``dyc`` (request.py's tensors) and ``dyc_stats`` (the batcher's counters as one JSON
string: engine calls, rows, requests per call).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import DycError, UsageError
from .batcher import StepBatcher
from .request import (
    INPUTS,
    MODEL_NAME,
    NUMPY_DTYPES,
    OUTPUTS,
    STATS_MODEL_NAME,
    encode_png,
    parse_request,
)

EXIT_TIMEOUT_S = 5  # on SIGINT/SIGTERM, Triton waits this long for requests in flight


class TritonBinding:
    """The inference callables PyTriton runs: one request per call (Triton's batching is off)."""

    def __init__(self, batcher: StepBatcher):
        self.batcher = batcher
        self.config = batcher.config

    async def infer(self, requests) -> list[dict[str, np.ndarray]]:
        out = []
        for r in requests:
            # BadRequest goes back as the request's Triton error, one line at its end
            req = parse_request(dict(r.items()), self.config, self.batcher.scheduler, self.batcher.max_rows)
            latents = await asyncio.wrap_future(self.batcher.submit(req))
            if req.format == "png":
                from ..runtime.pipeline import to_images

                pngs = [encode_png(im) for im in to_images(latents)]
                out.append({"png": np.array(pngs, dtype=object)})
            else:
                out.append({"latents": latents.numpy()})
        return out

    def stats(self, requests) -> list[dict[str, np.ndarray]]:
        text = json.dumps(self.batcher.snapshot()).encode()
        return [{"stats": np.array([text], dtype=object)} for _ in requests]


def _become_subreaper() -> bool:
    """Adopt our descendants that lose their parent (Linux): a Python-backend stub whose tritonserver
    exits before it does would otherwise live on under init after we stop."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _end_orphaned_stubs() -> int:
    """SIGKILL our child processes that are Triton Python-backend stubs (adopted after tritonserver exited)."""
    me, ended = str(os.getpid()), 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
            cmd = (proc / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if ppid == me and b"triton_python_backend_stub" in cmd:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                os.waitpid(int(proc.name), 0)
                ended += 1
            except (ProcessLookupError, ChildProcessError):
                pass
    return ended


def _check_port_free(option: str, host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise DycError(f"{option} {port}: cannot listen on {host}:{port} ({e.strerror}); "
                           "is another server running there?") from None


def _stop_on_sigterm(signum, frame):  # a service manager's stop: shut down as on Ctrl-C
    raise KeyboardInterrupt


def _tensor(spec):
    from pytriton.model_config import Tensor

    return Tensor(name=spec.name, dtype=NUMPY_DTYPES[spec.dtype], shape=spec.shape, optional=spec.optional)


def _handshake_race(e: Exception) -> bool:
    """PyTriton 0.7's stubs of one model start at once; all but the first connect to the first one's
    handshake socket as soon as its file exists, which can be before it listens ("Connection refused"
    in get_config_from_handshake_server; seen on a loaded 2-core machine, about 1 start in 10)."""
    text = str(e)
    return "get_config_from_handshake_server" in text and "Connection refused" in text


def start_triton(make: Callable[[], object], log: Callable[[str], None], attempts: int = 3):
    """``make()``'s Triton (bound, not yet running), running. A start lost to the stubs' handshake race
    is stopped and made again, up to ``attempts`` starts; any other failure to load is a clear error."""
    from pytriton.client.exceptions import PyTritonClientTimeoutError
    from tritonclient.utils import InferenceServerException

    attempt = 1
    while True:
        triton = make()
        try:
            triton.run()
            return triton
        except PyTritonClientTimeoutError:
            triton.stop()
            raise DycError("Triton Inference Server did not start (its log above says why)") from None
        except InferenceServerException as e:
            triton.stop()
            if not (_handshake_race(e) and attempt < attempts):
                raise DycError("Triton Inference Server could not load the model: "
                               f"{' '.join(str(e).split())[:400]}") from None
            attempt += 1
            log(f"Triton's model stubs lost PyTriton's handshake race; starting again ({attempt}/{attempts})")


def serve(bundle: str | os.PathLike | None, *, backend: str = "onnxruntime", device: str | None = None,
          http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002, host: str = "0.0.0.0",
          max_batch: int = 64, deadline_ms: float = 50.0, max_inflight: int = 16, pad_batches: bool | None = None,
          warm_up: bool = False, one_t_per_call: bool = False, stub_numpy: str | os.PathLike | None = None,
          log: Callable[[str], None] = print, ready: Callable[[], None] | None = None) -> None:
    """Serve ``bundle`` (a bundle, a checkpoint, or None: the embedded default model) until SIGINT/SIGTERM.

    ``pad_batches`` None: pad engine calls to powers of two when the backend replays CUDA graphs
    (the torch backend on CUDA), so few graphs are captured. ``one_t_per_call``: the torch backend's
    faster shared-mask engines, batching only requests at the same t. ``stub_numpy``: a directory
    with numpy < 2 for Triton's Python-backend stub, needed where this Python has numpy 2 (stub_env.py).
    """
    try:
        from pytriton.model_config import ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        raise DycError("dyc serve needs NVIDIA PyTriton: pip install 'dyc[serve]' (nvidia-pytriton)") from None
    from ..runtime.pipeline import Pipeline
    from . import stub_env
    from .batcher import row_buckets

    if max_inflight < 1:
        raise DycError(f"--max-inflight must be at least 1, got {max_inflight}")
    for name, port in (("--http-port", http_port), ("--grpc-port", grpc_port), ("--metrics-port", metrics_port)):
        if not 0 < port < 65536:
            raise DycError(f"{name} {port} is not a TCP port")
    if len({http_port, grpc_port, metrics_port}) < 3:
        raise UsageError("--http-port, --grpc-port and --metrics-port must differ")
    for name, port in (("--http-port", http_port), ("--grpc-port", grpc_port), ("--metrics-port", metrics_port)):
        _check_port_free(name, host, port)  # Triton would otherwise fail late and unclearly
    subreaper = _become_subreaper()
    stub_venv = stub_env.prepare(stub_numpy)  # fails before the slow part when the stub cannot work
    pipe = batcher = triton = None
    try:
        options = {"per_row_masks": not one_t_per_call} if backend == "torch" else {}
        pipe = Pipeline.load(bundle, backend=backend, device=device, progress=log, **options)
        dev = pipe.backend.device
        if pad_batches is None:
            pad_batches = backend == "torch" and dev.type == "cuda"
        batcher = StepBatcher(pipe.backend, pipe.scheduler, pipe.config, dtype=pipe.dtype, max_rows=max_batch,
                              deadline_s=deadline_ms / 1e3, buckets=row_buckets(max_batch) if pad_batches else None)
        if warm_up:
            t0 = time.perf_counter()
            n = batcher.warm_up(progress=log)
            log(f"warm-up: {n} engine calls in {time.perf_counter() - t0:.1f} s")
        binding = TritonBinding(batcher)
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
        batcher.start()
        def make_triton():
            t = Triton(config=TritonConfig(http_address=host, http_port=http_port, grpc_address=host,
                                           grpc_port=grpc_port, metrics_port=metrics_port,
                                           exit_timeout_secs=EXIT_TIMEOUT_S, log_verbose=0))
            t.bind(model_name=MODEL_NAME, infer_func=[binding.infer] * max_inflight,
                   inputs=[_tensor(s) for s in INPUTS], outputs=[_tensor(s) for s in OUTPUTS],
                   config=ModelConfig(batching=False), strict=False)
            t.bind(model_name=STATS_MODEL_NAME, infer_func=binding.stats, inputs=[],
                   outputs=[Tensor(name="stats", dtype=np.bytes_, shape=(1,))], config=ModelConfig(batching=False))
            return t

        triton = start_triton(make_triton, log)
        log(f"serving {pipe.source} ({backend} on {dev}, max batch {max_batch} rows, deadline {deadline_ms:g} ms, "
            f"{max_inflight} requests in flight) as model '{MODEL_NAME}': HTTP {host}:{http_port}, "
            f"gRPC {host}:{grpc_port}; Ctrl-C stops")
        if ready:
            ready()
        while triton.is_alive() and batcher.alive:
            time.sleep(0.5)
        if not batcher.alive:
            raise DycError("the step batcher stopped unexpectedly")
        raise DycError("Triton Inference Server stopped unexpectedly (its log above says why)")
    except KeyboardInterrupt:
        log(f"stopping: Triton waits up to {EXIT_TIMEOUT_S} s for requests in flight")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        t0 = time.perf_counter()
        if triton is not None:
            # past Triton's wait, fail what is left (e.g. requests whose clients have gone): PyTriton's
            # handlers would otherwise wait for them another 20 s before giving up
            late = threading.Timer(EXIT_TIMEOUT_S + 1.0, batcher.stop)
            late.start()
            triton.stop()
            late.cancel()
            if subreaper:
                _end_orphaned_stubs()
        if batcher is not None:
            batcher.stop()
        if pipe is not None:
            pipe.close()
        if stub_venv is not None:
            shutil.rmtree(stub_venv, ignore_errors=True)
        if triton is not None:
            log(f"stopped in {time.perf_counter() - t0:.1f} s")
