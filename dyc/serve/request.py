"""What a client sends ``dyc serve`` and what it gets back: the Triton tensors and their validation.

One request samples one image (latent) per class id with its own sampler, step count, CFG scale
and seed, exactly as ``dyc.Pipeline(classes, sampler=..., steps=..., cfg=..., seed=...)``.

inputs (Triton name, type, shape; all but ``class_ids`` optional):
  ``class_ids`` INT64 [n]   ``seed`` INT64 [1] (0)   ``steps`` INT32 [1] (the sampler's default)
  ``sampler`` BYTES [1] ("ddim")   ``cfg`` FP32 [1] (4.0; 1 = off)   ``format`` BYTES [1] ("latents" | "png")
outputs: ``latents`` FP32 [n, C, S, S] for "latents"; ``png`` BYTES [n] (one PNG file each) for "png".

Anything wrong is a ``BadRequest`` whose message says what and why; the server sends it back
as the request's Triton error and goes on serving the others.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from ..errors import DycError
from ..runtime.samplers import make_sampler
from ..runtime.scheduler import Scheduler

MODEL_NAME = "dyc"  # the Triton model that samples
STATS_MODEL_NAME = "dyc_stats"  # the Triton model that reports the batcher's counters (JSON)
FORMATS = ("latents", "png")
DEFAULT_SAMPLER = "ddim"
DEFAULT_CFG = 4.0  # as `dyc run`


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton's type name
    shape: tuple[int, ...]  # -1: any length
    optional: bool = False


INPUTS = (
    TensorSpec("class_ids", "INT64", (-1,)),
    TensorSpec("seed", "INT64", (1,), optional=True),
    TensorSpec("steps", "INT32", (1,), optional=True),
    TensorSpec("sampler", "BYTES", (1,), optional=True),
    TensorSpec("cfg", "FP32", (1,), optional=True),
    TensorSpec("format", "BYTES", (1,), optional=True),
)
OUTPUTS = (
    TensorSpec("latents", "FP32", (-1, -1, -1, -1)),
    TensorSpec("png", "BYTES", (-1,)),
)
NUMPY_DTYPES = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "BYTES": np.bytes_}


class BadRequest(DycError):
    """A request the server refuses; its message goes back to the client."""


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: one sample per class id of ``classes``."""

    classes: tuple[int, ...]
    seed: int
    sampler: str
    steps: int
    cfg: float
    format: str = "latents"

    @property
    def rows(self) -> int:
        """Engine rows per step: CFG runs each sample twice (conditional and null class)."""
        return len(self.classes) * (1 if self.cfg == 1.0 else 2)


def _scalar(inputs: Mapping[str, np.ndarray], name: str):
    v = np.asarray(inputs[name])
    if v.size != 1:
        raise BadRequest(f"{name} must hold exactly one value, got {v.size} (shape {list(v.shape)})")
    return v.reshape(-1)[0]


def _text(inputs: Mapping[str, np.ndarray], name: str) -> str:
    v = _scalar(inputs, name)
    if isinstance(v, bytes | np.bytes_):
        try:
            return bytes(v).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadRequest(f"{name} is not UTF-8 text") from None
    if isinstance(v, str):
        return v.strip()
    raise BadRequest(f"{name} must be text (BYTES), got {type(v).__name__}")


def _integer(inputs: Mapping[str, np.ndarray], name: str) -> int:
    v = _scalar(inputs, name)
    if not isinstance(v, np.integer | int) or isinstance(v, bool | np.bool_):
        raise BadRequest(f"{name} must be an integer, got {v!r}")
    return int(v)


def parse_request(inputs: Mapping[str, np.ndarray], config: ModelConfig, scheduler: Scheduler,
                  max_rows: int) -> GenerationRequest:
    """The request's tensors -> a ``GenerationRequest``, or a ``BadRequest`` naming what is wrong.

    ``max_rows``: the server's cap on rows per engine call; a request must fit in one call.
    """
    unknown = sorted(set(inputs) - {s.name for s in INPUTS})
    if unknown:
        raise BadRequest(f"unknown inputs {unknown}: this model takes {[s.name for s in INPUTS]}")
    if "class_ids" not in inputs:
        raise BadRequest("class_ids is missing: give one class id per image, INT64 [n]")
    ids = np.asarray(inputs["class_ids"])
    if ids.dtype.kind not in "iu":
        raise BadRequest(f"class_ids must be integers, got {ids.dtype}")
    if ids.ndim != 1 or ids.size == 0:
        raise BadRequest(f"class_ids must be a non-empty 1-D list, got shape {list(ids.shape)}")
    n = config.num_classes
    bad = [int(c) for c in ids.tolist() if not 0 <= int(c) < n]
    if bad:
        raise BadRequest(f"class id {bad[0]} is out of range: this model has classes 0..{n - 1}")
    seed = _integer(inputs, "seed") if "seed" in inputs else 0
    if seed < 0:
        raise BadRequest(f"seed must be a non-negative integer, got {seed}")
    sampler = _text(inputs, "sampler") if "sampler" in inputs else DEFAULT_SAMPLER
    steps = _integer(inputs, "steps") if "steps" in inputs else None
    try:
        s = make_sampler(sampler, steps)
    except DycError as e:
        raise BadRequest(str(e)) from None
    try:
        scheduler.check_schedule(s.timesteps)
    except DycError as e:
        raise BadRequest(str(e)) from None
    cfg = float(_scalar(inputs, "cfg")) if "cfg" in inputs else DEFAULT_CFG
    if not math.isfinite(cfg) or cfg < 0:
        raise BadRequest(f"cfg must be a finite number ≥ 0, got {cfg}")
    fmt = _text(inputs, "format").lower() if "format" in inputs else "latents"
    if fmt not in FORMATS:
        raise BadRequest(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "png" and config.vae_scale != 1:
        raise BadRequest("this model samples VAE latents, not pixels: ask for format 'latents' and decode them "
                         "with the VAE")
    req = GenerationRequest(tuple(int(c) for c in ids.tolist()), seed, s.name, len(s), cfg, fmt)
    if req.rows > max_rows:
        per = 2 if cfg != 1.0 else 1
        raise BadRequest(f"{len(req.classes)} images{' with CFG' if per == 2 else ''} need {req.rows} rows per "
                         f"step, more than this server's --max-batch {max_rows}: send at most "
                         f"{max_rows // per} class ids per request")
    return req


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, C] (C = 1 or 3) -> the bytes of a PNG file."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(image[..., 0] if image.shape[-1] == 1 else image))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
