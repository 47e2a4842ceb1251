"""What the TensorRT builder and runtime share: which TensorRT is used, and the engines' sidecar manifest.

Two flavours expose the same Python API (``Builder``, ``OnnxParser``, ``Runtime``, ``ICudaEngine``):

* ``tensorrt``: datacenter TensorRT (import ``tensorrt``); builds for the GPU it runs on.
* ``tensorrt_rtx``: TensorRT for RTX (import ``tensorrt_rtx``, or ``tensorrt_rtx_bindings`` when only the
  ``tensorrt-rtx-cu13-libs``/``-bindings`` wheels are installed). It builds ahead of time on a machine
  without a GPU, for compute capabilities chosen at build time, and specialises kernels on the target
  GPU at run time (JIT).

The bundle's ``manifest.json`` is checksummed by the compiler and has no hook for backend build
results, so the engines are described by a sidecar, ``engines/trt_manifest.json`` inside the bundle,
written atomically after every plan it names.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import DycError
from ..fileio import atomic_write_bytes as _atomic_write_bytes
from ..fileio import make_output_dir, read_text
from ..fileio import sha256_file as _sha256_file

FLAVORS = ("tensorrt", "tensorrt_rtx")
SDT_FORMS = ("plugin", "gather", "dense")  # see sdt.py
PLUGIN_OP = "SdtMlp"  # TensorRT plugin name (version "1", empty namespace) the ONNX parser looks up
ENGINES_DIR = "engines"
TRT_MANIFEST = "trt_manifest.json"
TRT_MANIFEST_SCHEMA = 1
# pip packages that bring each flavour (told to the user when it is missing)
PIP_HINT = {
    "tensorrt": "pip install tensorrt (datacenter GPUs; needs an NVIDIA GPU to build)",
    "tensorrt_rtx": "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings "
                    "(or: pip install 'dyc[tensorrt-rtx]')",
}
# import names per flavour, in the order tried: the metapackage's name first, then the bindings
# wheel's own name (what `pip install tensorrt-rtx-cu13-bindings` alone provides)
_IMPORTS = {"tensorrt": ("tensorrt",), "tensorrt_rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings")}


def check_flavor(flavor: str) -> str:
    if flavor not in ("auto", *FLAVORS):
        raise DycError(f"unknown TensorRT flavour {flavor!r}: choose auto, {', '.join(FLAVORS)}")
    return flavor


def import_trt(flavor: str = "auto") -> tuple[ModuleType, str]:
    """The TensorRT module of ``flavor`` and the flavour it is; ``auto`` prefers datacenter TensorRT."""
    check_flavor(flavor)
    wanted = FLAVORS if flavor == "auto" else (flavor,)
    for fl in wanted:
        for name in _IMPORTS[fl]:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            # a partial install (bindings without libs) imports but has no Builder
            if hasattr(mod, "Builder") and hasattr(mod, "Runtime"):
                return mod, fl
    if flavor == "auto":
        raise DycError("no TensorRT is installed: " + "; or ".join(PIP_HINT[f] for f in FLAVORS))
    raise DycError(f"TensorRT flavour {flavor!r} is not installed: {PIP_HINT[flavor]}")


def trt_version(trt: ModuleType) -> str:
    return str(getattr(trt, "__version__", "unknown"))


sha256_file = _sha256_file  # the project's one checksum helper (dyc.fileio), for bundles and plans


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    make_output_dir(path.parent)
    _atomic_write_bytes(path, data, "engine file")


def trt_manifest_path(bundle_path: str | os.PathLike) -> Path:
    return Path(bundle_path) / ENGINES_DIR / TRT_MANIFEST


def write_trt_manifest(bundle_path: str | os.PathLike, manifest: dict) -> Path:
    path = trt_manifest_path(bundle_path)
    atomic_write_bytes(path, (json.dumps(manifest, indent=1) + "\n").encode())
    return path


def read_trt_manifest(bundle_path: str | os.PathLike) -> dict[str, Any]:
    path = trt_manifest_path(bundle_path)
    if not path.exists():
        raise DycError(f"{bundle_path}: has no TensorRT engines ({ENGINES_DIR}/{TRT_MANIFEST} is missing); "
                       f"build them with: dyc build-engines {bundle_path}")
    try:
        m = json.loads(read_text(path, "engine manifest"))
    except json.JSONDecodeError as e:
        raise DycError(f"{path}: not valid JSON ({e}); rebuild with: dyc build-engines {bundle_path}") from None
    if not isinstance(m, dict) or m.get("schema_version") != TRT_MANIFEST_SCHEMA:
        got = m.get("schema_version") if isinstance(m, dict) else m
        raise DycError(f"{path}: unknown engine manifest schema {got!r}"
                       f" (this dyc reads {TRT_MANIFEST_SCHEMA}); rebuild with: dyc build-engines {bundle_path}")
    engines = m.get("engines")
    if not isinstance(engines, list) or not all(
            isinstance(e, dict) and isinstance(e.get("group"), int) and not isinstance(e.get("group"), bool)
            and isinstance(e.get("plan"), str) and isinstance(e.get("sha256"), str) for e in engines):
        raise DycError(f"{path}: malformed engine manifest ('engines' must list {{group, plan, sha256}}); "
                       f"rebuild with: dyc build-engines {bundle_path}")
    return m


def rebuild_hint(bundle_path: str | os.PathLike, manifest: dict | None = None) -> str:
    """The command that rebuilds the engines of a bundle with the same options."""
    cmd = f"dyc build-engines {bundle_path}"
    if manifest:
        opts = manifest.get("options", {})
        if opts.get("batch_sizes"):
            cmd += " --batch-sizes " + ",".join(str(b) for b in opts["batch_sizes"])
        if not opts.get("cfg_batch", True):
            cmd += " --no-cfg-batch"
    return cmd + " (on the machine and TensorRT that will run them; --trt-flavor picks tensorrt or tensorrt_rtx)"
