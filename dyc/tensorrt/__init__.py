"""TensorRT backend of dyc: per-group engines built from a bundle's ONNX graphs, and their runtime.

``build.py`` builds (works with datacenter TensorRT and with TensorRT-RTX, which builds ahead of time
without a GPU); ``runtime.py`` runs the engines with one execution context per engine, one shared
activation buffer and a CUDA graph per (engine, batch). See docs/tensorrt.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# loaded on first use (PEP 562): `dyc --help` registers `dyc build-engines` without numpy or TensorRT
_LAZY = {"build_engines": ".build", "describe_network": ".build", "parse_group": ".build",
         "import_trt": ".common", "read_trt_manifest": ".common"}

if TYPE_CHECKING:
    from .build import build_engines, describe_network, parse_group
    from .common import import_trt, read_trt_manifest


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["build_engines", "describe_network", "import_trt", "parse_group", "read_trt_manifest"]
