"""Shared by the tests/test_tensorrt_*.py files: a small compiled bundle and the TensorRT module.

The bundle comes from the compiler's own Python API (``compile_checkpoint``) on a tiny DyDiT whose
random routers give several groups, one of them narrowed (fewer heads and channel groups than the
full model), so the parsed networks can show sliced widths.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import random_model, tiny_config

from dyc.checkpoint import save_checkpoint
from dyc.compiler.compile import compile_checkpoint
from dyc.errors import DycError
from dyc.tensorrt.common import import_trt


def rtx_module():
    """TensorRT-RTX, or skip: the only TensorRT that installs (and builds without a GPU) in this workplace."""
    try:
        trt, _ = import_trt("tensorrt_rtx")
    except DycError as e:
        pytest.skip(f"TensorRT-RTX is not installed ({e})")
    return trt


def compile_tiny(out_dir: Path, dtype: str = "fp16", groups: int = 3) -> Path:
    cfg = tiny_config()  # C=64, L=2, H=4, 8x8 latents, patch 2: N=16 tokens
    model = random_model(cfg, seed=0, router_scale=3.0)
    ckpt = out_dir / "tiny.safetensors"
    save_checkpoint(model, ckpt)
    res = compile_checkpoint(ckpt, out_dir / f"tiny-{dtype}.dyc", groups=groups, dtype=dtype, calib=1, calib_steps=3)
    return res.path


def copy_bundle(src: Path, dst_dir: Path) -> Path:
    dst = dst_dir / src.name
    shutil.copytree(src, dst)
    return dst
