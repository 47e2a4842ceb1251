"""A client of ``dyc serve`` over ``tritonclient`` (HTTP or gRPC): what ``dyc query`` and the benchmark use.

>>> with Client("localhost:8000") as c:                                          # doctest: +SKIP
...     latents = c.generate([3, 7], seed=0, steps=50, sampler="ddim", cfg=4.0)   # [2, C, S, S] float32
...     pngs = c.generate([3], format="png")                                       # [PNG file bytes]

One client per thread: tritonclient's clients are not thread-safe.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import numpy as np

from ..errors import DycError
from .request import MODEL_NAME, STATS_MODEL_NAME

_REFUSED = re.compile(r"BadRequest: (.+)")


def split_url(url: str) -> tuple[str, str]:
    """``grpc://host:port`` / ``http://host:port`` / ``host:port`` (HTTP) -> (protocol, host:port)."""
    m = re.fullmatch(r"(?:(http|grpc)://)?([^/\s]+?)/?", url.strip())
    if not m:
        raise DycError(f"--url {url!r}: give host:port, http://host:port or grpc://host:port")
    return m.group(1) or "http", m.group(2)


def server_message(e: Exception) -> str:
    """One line from a Triton error: the server's BadRequest message when it refused the request."""
    text = e.message() if hasattr(e, "message") and callable(e.message) else str(e)
    text = text or str(e)
    m = _REFUSED.search(text)
    if m:
        return f"the server refused the request: {m.group(1).strip()}"
    return next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)


class Client:
    """``Client(url, timeout_s=600)``: ``url`` as ``split_url`` takes it; ``timeout_s`` per request."""

    def __init__(self, url: str, timeout_s: float = 600.0):
        self.protocol, self.address = split_url(url)
        self.timeout_s = float(timeout_s)
        try:
            if self.protocol == "grpc":
                import tritonclient.grpc as tc
            else:
                import tritonclient.http as tc
        except ImportError:
            raise DycError(f"querying over {self.protocol} needs tritonclient: pip install "
                           f"'tritonclient[{self.protocol}]' (or 'dyc[serve]')") from None
        self._tc = tc
        if self.protocol == "grpc":
            self._client = tc.InferenceServerClient(self.address)
        else:
            self._client = tc.InferenceServerClient(self.address, connection_timeout=self.timeout_s,
                                                    network_timeout=self.timeout_s)

    def _input(self, name: str, value: np.ndarray, dtype: str):
        i = self._tc.InferInput(name, list(value.shape), dtype)
        i.set_data_from_numpy(value)
        return i

    def _infer(self, model: str, inputs: list, outputs: Sequence[str]):
        from tritonclient.utils import InferenceServerException

        requested = [self._tc.InferRequestedOutput(n) for n in outputs]
        kw = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            return self._client.infer(model, inputs, outputs=requested, **kw)
        except InferenceServerException as e:
            raise DycError(server_message(e)) from None
        except (ConnectionError, OSError) as e:  # HTTP: refused, reset, timed out
            raise DycError(f"cannot reach dyc serve at {self.address} ({self.protocol}): {e}") from None

    def generate(self, classes: Sequence[int], *, seed: int = 0, steps: int | None = None, sampler: str = "ddim",
                 cfg: float = 4.0, format: str = "latents") -> np.ndarray | list[bytes]:
        """One sample per class id: latents [n, C, S, S] float32, or (format "png") n PNG files' bytes."""
        inputs = [self._input("class_ids", np.asarray(list(classes), dtype=np.int64), "INT64"),
                  self._input("seed", np.array([seed], dtype=np.int64), "INT64"),
                  self._input("sampler", np.array([sampler.encode()], dtype=object), "BYTES"),
                  self._input("cfg", np.array([cfg], dtype=np.float32), "FP32"),
                  self._input("format", np.array([format.encode()], dtype=object), "BYTES")]
        if steps is not None:
            inputs.append(self._input("steps", np.array([steps], dtype=np.int32), "INT32"))
        name = "png" if format == "png" else "latents"
        res = self._infer(MODEL_NAME, inputs, [name])
        out = res.as_numpy(name)
        if out is None:
            raise DycError(f"the server's response has no {name!r} output")
        return [bytes(b) for b in out.reshape(-1)] if name == "png" else out

    def stats(self) -> dict:
        """The server batcher's counters (engine calls, rows, requests per call)."""
        res = self._infer(STATS_MODEL_NAME, [], ["stats"])
        return json.loads(bytes(res.as_numpy("stats").reshape(-1)[0]))

    def ready(self) -> bool:
        """Whether the server is up and its models loaded (False while it starts or when unreachable)."""
        try:
            return bool(self._client.is_server_ready() and self._client.is_model_ready(MODEL_NAME)
                        and self._client.is_model_ready(STATS_MODEL_NAME))
        except Exception:  # noqa: BLE001 - any failure to answer means "not ready yet"
            return False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
