"""ONNX Runtime sessions built from a bundle's checked bytes, never by reopening its files.

The graph and ``weights.bin`` come from ``Bundle.graph_bytes`` / ``Bundle.weights_bytes``: each
read once, size and sha256 checked on those bytes. ONNX Runtime gets the graph as bytes and its
external data from memory: ``add_external_initializers_from_files_in_memory`` (the Python API of
onnxruntime ≥ 1.23), else ``add_external_initializers`` with OrtValues over the same bytes (older
onnxruntime; needs the onnx package to read the graph's table of external tensors). ONNX Runtime
copies what it needs while the session is created, so the bytes may be dropped afterwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DycError

if TYPE_CHECKING:
    from .bundle import Bundle
    from .compiler.plan import GroupPlan


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise DycError("this needs onnxruntime, which is not installed: pip install 'dyc[onnx]' "
                       "(or onnxruntime-gpu for CUDA)") from None
    return ort


def external_arrays(graph: bytes, weights: bytes, weights_file: str) -> dict[str, np.ndarray]:
    """The graph's external initializers as numpy views into ``weights`` (no copy)."""
    try:
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype
    except ImportError:
        raise DycError("this onnxruntime cannot take external data from memory, so dyc reads the graph with "
                       "the onnx package, which is not installed: pip install 'dyc[onnx]' "
                       "(or a newer onnxruntime)") from None
    model = onnx.load_model_from_string(graph)
    out = {}
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        ext = {e.key: e.value for e in init.external_data}
        if ext.get("location") != weights_file:
            raise DycError(f"initializer {init.name} points into {ext.get('location')!r}, not {weights_file}")
        dtype = np.dtype(tensor_dtype_to_np_dtype(init.data_type))
        offset, length = int(ext.get("offset", 0)), int(ext["length"])
        if offset + length > len(weights) or length != dtype.itemsize * int(np.prod(init.dims, dtype=np.int64)):
            raise DycError(f"initializer {init.name}: bytes {offset}..{offset + length} do not fit {weights_file}")
        out[init.name] = np.frombuffer(weights, dtype=dtype, count=length // dtype.itemsize,
                                       offset=offset).reshape(tuple(init.dims))
    return out


def session_from_bytes(graph: bytes, weights: bytes, weights_file: str, *, options: Any = None,
                       providers: list | None = None, what: str = "graph") -> Any:
    """An InferenceSession of ``graph`` whose external data (``weights_file``) is ``weights``, all in memory.

    ``options``: a SessionOptions for this one session (the external data is attached to it).
    """
    ort = _import_ort()
    opts = options if options is not None else ort.SessionOptions()
    keep: list[Any] = []  # what ORT reads during session creation must outlive it
    if hasattr(opts, "add_external_initializers_from_files_in_memory"):
        buf = np.frombuffer(weights, dtype=np.uint8)
        keep.append(buf)
        opts.add_external_initializers_from_files_in_memory([weights_file], [buf], [len(weights)])
    else:
        arrays = external_arrays(graph, weights, weights_file)
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]
        keep += values
        opts.add_external_initializers(list(arrays), values)
    try:
        return ort.InferenceSession(graph, sess_options=opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/RuntimeException types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DycError(f"{what}: ONNX Runtime cannot load it ({first})") from None
    finally:
        keep.clear()


def bundle_session(bundle: Bundle, group: GroupPlan | int, variant: str = "std", *, weights: bytes | None = None,
                   options: Any = None, providers: list | None = None) -> Any:
    """The session of one group of a bundle, from its checked bytes.

    ``weights``: ``bundle.weights_bytes()`` read once for several sessions (else read and checked here).
    """
    graph = bundle.graph_bytes(group, variant)
    if weights is None:
        weights = bundle.weights_bytes()
    return session_from_bytes(graph, weights, bundle.weights_file, options=options, providers=providers,
                              what=str(bundle.onnx_path(group, variant)))
