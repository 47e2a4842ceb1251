"""Backends run a bundle's per-group engines; the runtime scheduler picks the group per step.

``get_backend(name)`` returns the backend class, or raises a DycError that names the package
that brings it when it is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import DycError, UsageError

if TYPE_CHECKING:
    from .base import Backend

# name -> (module, class, pip package that brings its runtime)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "eager": ("dyc.backends.eager", "EagerBackend", "torch"),
    "onnxruntime": ("dyc.backends.onnxruntime", "OnnxRuntimeBackend", "onnxruntime (or onnxruntime-gpu)"),
    "torch": ("dyc.backends.torch_sliced", "TorchBackend", "torch with CUDA"),
    "tensorrt": ("dyc.backends.tensorrt", "TensorRTBackend", "tensorrt or tensorrt-rtx"),
}


def backend_names() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str) -> type[Backend]:
    if name not in _REGISTRY:
        raise UsageError(f"unknown backend {name!r}: choose one of {', '.join(_REGISTRY)}")
    module, cls, package = _REGISTRY[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("dyc"):
            raise DycError(f"backend {name!r} is not part of this dyc build") from None
        raise DycError(f"backend {name!r} needs {package}: it is not installed ({e.name} missing)") from None
    backend: type[Backend] = getattr(mod, cls)
    ok, why = backend.available()
    if not ok:
        raise DycError(f"backend {name!r} cannot run here: {why}")
    return backend


def __getattr__(name: str):
    if name == "Backend":  # base imports torch: loaded on use, so `dyc --help` can list the backends without it
        from .base import Backend

        return Backend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Backend", "backend_names", "get_backend"]
