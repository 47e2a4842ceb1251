"""One copy of a bundle's weights for all of its ONNX Runtime sessions, from checked bytes.

ONNX Runtime keeps its own copy of every initializer per session (on the CPU also pre-packed
copies of the GEMM weights), so K group sessions hold about K copies of ``weights.bin``. Here
the weights are graph inputs instead: each group's graph is rewritten in memory so that every
initializer stored in ``weights.bin`` becomes a graph input of the same name and shape, and every
session is bound to views (offset, length) into one buffer, host memory on the CPU or one
device allocation on CUDA. ONNX Runtime never sees the weight bytes, so it cannot copy them.

Every file is read once through ``Bundle.read_file``/``stream_file``, its sha256 checked against the
manifest on the bytes read, and only those bytes are used: nothing is opened again by path after the check.

The buffer holds only the bytes the loaded graphs reference (``spans_of``): ``weights.bin`` also holds
the tensors of the other graph variants, which would otherwise take memory for nothing. The whole
file is still streamed and hashed; bytes outside the spans are dropped as they pass.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..errors import DycError

if TYPE_CHECKING:
    import torch

    from ..bundle import Bundle

CHUNK = 1 << 26  # 64 MiB reads: hashed as they arrive
SPAN_ALIGN = 64  # a compacted span keeps its start's offset modulo this (cache lines, vector loads)


@dataclass(frozen=True)
class WeightRef:
    """A graph input that is a tensor of ``weights.bin``."""

    name: str
    onnx_type: int  # onnx.TensorProto data type
    shape: tuple[int, ...]
    offset: int
    length: int


class Span(NamedTuple):
    """Bytes [src, src + length) of the weights file, held at [dst, dst + length) of the compacted buffer."""

    src: int
    dst: int
    length: int


def _size(bundle: Bundle, name: str) -> int:
    info = bundle.manifest.get("files", {}).get(name)
    if not info:
        raise DycError(f"{bundle.path}: {name} is not in the manifest's file table")
    return int(info["bytes"])


def spans_of(refs: Iterable[WeightRef]) -> list[Span]:
    """The byte ranges of the weights file that ``refs`` use, sorted, merged where they overlap or touch,
    and laid out back to back in a compacted buffer.

    Loading only these leaves out what no loaded graph reads (another variant's tensors). Each span
    lands at a destination congruent to its source modulo ``SPAN_ALIGN`` (a multiple of it, as the
    store aligns every tensor), so every view keeps the alignment it has in the file.
    """
    merged: list[list[int]] = []
    for lo, hi in sorted((r.offset, r.offset + r.length) for r in refs if r.length):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    spans, end = [], 0
    for lo, hi in merged:
        dst = -(-end // SPAN_ALIGN) * SPAN_ALIGN + lo % SPAN_ALIGN
        spans.append(Span(lo, dst, hi - lo))
        end = dst + hi - lo
    return spans


def spans_size(spans: list[Span]) -> int:
    """Bytes of the compacted buffer that ``spans`` lay out."""
    return spans[-1].dst + spans[-1].length if spans else 0


def remap(refs: list[WeightRef], spans: list[Span]) -> list[WeightRef]:
    """``refs`` with offsets into the compacted buffer of ``spans`` (which must cover them)."""
    starts = [s.src for s in spans]
    out = []
    for r in refs:
        if not r.length:  # an empty tensor reads nothing
            out.append(replace(r, offset=0))
            continue
        i = bisect.bisect_right(starts, r.offset) - 1
        s = spans[i] if i >= 0 else None
        if s is None or r.offset + r.length > s.src + s.length:
            raise DycError(f"weight {r.name} (offset {r.offset}, length {r.length}) is outside the loaded spans")
        out.append(replace(r, offset=s.dst + r.offset - s.src))
    return out


def _sink(spans: list[Span] | None, put: Callable[[int, memoryview], None]) -> Callable[[int, memoryview], None]:
    """A ``stream_file`` sink that hands ``put(dst, piece)`` the parts of each chunk inside ``spans``
    at their compacted offsets (``None``: every chunk, as it is). A chunk may cross span boundaries."""
    if spans is None:
        return put
    starts = [s.src for s in spans]

    def sink(off: int, chunk: memoryview) -> None:
        end = off + len(chunk)
        i = max(bisect.bisect_right(starts, off) - 1, 0)  # the span holding `off`, or the one before it
        for s in spans[i:]:
            if s.src >= end:
                break
            lo, hi = max(off, s.src), min(end, s.src + s.length)
            if lo < hi:
                put(s.dst + lo - s.src, chunk[lo - off: hi - off])

    return sink


def host_weights(bundle: Bundle, spans: list[Span] | None = None, name: str = "weights.bin") -> np.ndarray:
    """The weights file in host memory (uint8), read once and checked on every byte read; only the
    bytes of ``spans``, compacted, when given."""
    out = np.empty(_size(bundle, name) if spans is None else spans_size(spans), dtype=np.uint8)

    def put(dst: int, piece: memoryview) -> None:
        out[dst: dst + len(piece)] = np.frombuffer(piece, dtype=np.uint8)

    bundle.stream_file(name, _sink(spans, put), CHUNK)
    return out


def device_weights(bundle: Bundle, device: torch.device, spans: list[Span] | None = None,
                   name: str = "weights.bin") -> torch.Tensor:
    """The weights file in one device allocation (uint8), streamed through a pinned chunk and checked
    on every byte read; only the bytes of ``spans``, compacted, when given. The host never holds the
    whole file."""
    import torch

    size = _size(bundle, name) if spans is None else spans_size(spans)
    out = torch.empty(size, dtype=torch.uint8, device=device)
    staging = torch.empty(min(CHUNK, max(size, 1)), dtype=torch.uint8, pin_memory=True)
    stage = staging.numpy()

    def put(dst: int, piece: memoryview) -> None:
        k = len(piece)
        stage[:k] = np.frombuffer(piece, dtype=np.uint8)
        out[dst: dst + k].copy_(staging[:k], non_blocking=False)  # synchronous: staging is reused

    bundle.stream_file(name, _sink(spans, put), CHUNK)
    return out


def weights_as_inputs(model_bytes: bytes, weights_file: str, weights_size: int, what: str
                      ) -> tuple[bytes, list[WeightRef]]:
    """Rewrite a graph so that its initializers stored in ``weights_file`` are graph inputs.

    Returns the new serialized model and, per such input, where its bytes are. Other initializers
    (small constants inside the graph) stay. ``what`` names the graph in errors.
    """
    import onnx
    from onnx import helper

    try:
        model = onnx.ModelProto.FromString(model_bytes)
    except Exception as e:  # protobuf's DecodeError
        raise DycError(f"{what}: not a valid ONNX model ({e})") from None
    keep, refs = [], []
    for init in model.graph.initializer:
        ext = {e.key: e.value for e in init.external_data} if init.data_location == onnx.TensorProto.EXTERNAL else {}
        if ext.get("location") != weights_file:
            if ext:
                raise DycError(f"{what}: initializer {init.name} refers to {ext.get('location')!r}, "
                               f"not the bundle's {weights_file}")
            keep.append(init)
            continue
        offset, length = int(ext.get("offset", 0)), int(ext["length"])
        itemsize = helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        if offset < 0 or offset + length > weights_size or length != int(np.prod(init.dims, dtype=np.int64)) * itemsize:
            raise DycError(f"{what}: initializer {init.name} does not fit {weights_file} "
                           f"(offset {offset}, length {length})")
        refs.append(WeightRef(init.name, init.data_type, tuple(int(d) for d in init.dims), offset, length))
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model.SerializeToString(), refs
