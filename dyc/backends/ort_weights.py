"""One copy of a bundle's weights for all of its ONNX Runtime sessions, from checked bytes.

ONNX Runtime keeps its own copy of every initializer per session (on the CPU also pre-packed
copies of the GEMM weights), so K group sessions hold about K copies of ``weights.bin``. Here
the weights are graph inputs instead: each group's graph is rewritten in memory so that every
initializer stored in ``weights.bin`` becomes a graph input of the same name and shape, and every
session is bound to views (offset, length) into one buffer, host memory on the CPU or one
device allocation on CUDA. ONNX Runtime never sees the weight bytes, so it cannot copy them.

Every file is read once through ``Bundle.read_file``/``stream_file``, its sha256 checked against the
manifest on the bytes read, and only those bytes are used: nothing is opened again by path after the check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DycError

if TYPE_CHECKING:
    import torch

    from ..bundle import Bundle

CHUNK = 1 << 26  # 64 MiB reads: hashed as they arrive


@dataclass(frozen=True)
class WeightRef:
    """A graph input that is a tensor of ``weights.bin``."""

    name: str
    onnx_type: int  # onnx.TensorProto data type
    shape: tuple[int, ...]
    offset: int
    length: int


def _size(bundle: Bundle, name: str) -> int:
    info = bundle.manifest.get("files", {}).get(name)
    if not info:
        raise DycError(f"{bundle.path}: {name} is not in the manifest's file table")
    return int(info["bytes"])


def host_weights(bundle: Bundle, name: str = "weights.bin") -> np.ndarray:
    """The weights file in host memory (uint8), read once and checked."""
    out = np.empty(_size(bundle, name), dtype=np.uint8)

    def sink(off: int, chunk: memoryview) -> None:
        out[off: off + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)

    bundle.stream_file(name, sink, CHUNK)
    return out


def device_weights(bundle: Bundle, device: torch.device, name: str = "weights.bin") -> torch.Tensor:
    """The weights file in one device allocation (uint8), streamed through a pinned chunk and checked;
    the host never holds the whole file."""
    import torch

    size = _size(bundle, name)
    out = torch.empty(size, dtype=torch.uint8, device=device)
    staging = torch.empty(min(CHUNK, max(size, 1)), dtype=torch.uint8, pin_memory=True)
    stage = staging.numpy()

    def sink(off: int, chunk: memoryview) -> None:
        k = len(chunk)
        stage[:k] = np.frombuffer(chunk, dtype=np.uint8)
        out[off: off + k].copy_(staging[:k], non_blocking=False)  # synchronous: staging is reused

    bundle.stream_file(name, sink, CHUNK)
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
