"""TensorRT backend of dyc: per-group engines built from a bundle's ONNX graphs, and their runtime.

``build.py`` builds (works with datacenter TensorRT and with TensorRT-RTX, which builds ahead of time
without a GPU); ``runtime.py`` runs the engines with one execution context per engine, one shared
activation buffer and a CUDA graph per (engine, batch). See docs/tensorrt.md.
"""

from .build import build_engines, describe_network, parse_group
from .common import import_trt, read_trt_manifest

__all__ = ["build_engines", "describe_network", "import_trt", "parse_group", "read_trt_manifest"]
