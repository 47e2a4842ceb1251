"""Shared set-up of the serving tests: the default model's bundle (compiled once), free ports, a server process."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
_BUNDLE: Path | None = None
_REFERENCES: dict = {}

# fp32 on both sides; a batched engine call runs its GEMMs over more rows than a one-request call,
# which may block (and so round) them differently: ONNX Runtime's CPU rows come out bit-identical
# here, but other CPUs/libraries need not, so results are compared at fp32's tolerance
TOL = 1e-5  # relative, and of the latents' largest magnitude


def digits_bundle() -> Path:
    """The embedded default model compiled with the compiler's defaults, once per test process."""
    global _BUNDLE
    if _BUNDLE is None:
        from dyc.compiler.compile import compile_checkpoint
        from dyc.models import default_checkpoint

        d = Path(tempfile.mkdtemp(prefix="dyc-serve-test-"))
        atexit.register(shutil.rmtree, d, ignore_errors=True)
        _BUNDLE = compile_checkpoint(default_checkpoint(), d / "digits.dyc").path
    return _BUNDLE


def reference(classes, *, seed: int, steps: int, sampler: str = "ddim", cfg: float = 4.0) -> torch.Tensor:
    """``dyc.Pipeline`` on this one request alone (ONNX Runtime, CPU): what the server must return."""
    import dyc

    key = (tuple(classes), seed, steps, sampler, cfg)
    if key not in _REFERENCES:
        if "pipe" not in _REFERENCES:
            _REFERENCES["pipe"] = dyc.Pipeline.load(digits_bundle(), backend="onnxruntime")
        out = _REFERENCES["pipe"](list(classes), sampler=sampler, steps=steps, cfg=cfg, seed=seed)
        _REFERENCES[key] = out.latents
    return _REFERENCES[key]


def assert_matches(got: np.ndarray | torch.Tensor, want: torch.Tensor, tol: float = TOL) -> None:
    got = torch.as_tensor(np.array(got))  # a copy: tritonclient's arrays are read-only
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


def numpy_dir(d: Path) -> Path:
    """A folder holding (links to) this environment's numpy, as ``dyc serve --stub-numpy`` takes one."""
    import numpy

    def link(src, dst):  # hard links where possible: the stub's memory maps then show this folder's paths
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    site = Path(numpy.__file__).resolve().parent.parent
    d.mkdir(parents=True, exist_ok=True)
    for entry in site.glob("numpy*"):  # numpy, numpy-X.dist-info, numpy.libs
        shutil.copytree(entry, d / entry.name, copy_function=link, ignore=shutil.ignore_patterns("__pycache__"))
    return d


def stub_processes(pgid: int) -> list[int]:
    """The Triton Python-backend stubs in a process group."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.getpgid(int(proc.name)) == pgid and \
                    b"triton_python_backend_stub" in (proc / "cmdline").read_bytes():
                out.append(int(proc.name))
        except (OSError, ProcessLookupError):
            continue
    return out


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class ServerProcess:
    """``dyc serve`` in its own process group, so that stopping it also ends tritonserver and its stubs."""

    def __init__(self, bundle: Path, log: Path, *args: str):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log = log
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        cmd = [sys.executable, "-m", "dyc.cli", "serve", str(bundle), "--host", "127.0.0.1",
               "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
               *args]
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc}"

    def log_tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        from dyc.serve.client import Client

        deadline = time.monotonic() + timeout_s
        with Client(self.http_url, timeout_s=5) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"dyc serve exited with {self.proc.returncode}:\n{self.log_tail()}")
                if c.ready():
                    return
                time.sleep(0.3)
        raise RuntimeError(f"dyc serve not ready after {timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM (a clean shutdown), then SIGKILL to whatever of the group is left."""
        rc = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        else:
            rc = self.proc.returncode
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group: tritonserver, python-backend stubs
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self._log_file.close()
        return rc
