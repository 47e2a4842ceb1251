"""ONNX Runtime backend: every group session over one copy of the weights, from checked bytes.

The memory test loads a bundle of 8 groups (random DyDiT, hidden 512: a ~350 MB weights.bin) in a
fresh process and measures its resident set before and after building the sessions: with shared
weights the growth stays within 1.2x the weights file; with each session owning its weights
(ONNX Runtime's default) it is several copies, which shows the measurement can tell them apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_model

from dyc.checkpoint import save_checkpoint
from dyc.config import ModelConfig
from dyc.errors import DycError

pytest.importorskip("onnxruntime")
ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, torch
from dyc.bundle import Bundle
from dyc.backends.onnxruntime import OnnxRuntimeBackend

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

torch.set_num_threads(1)
b = Bundle.load(sys.argv[1], verify_checksums=False)
before = rss()
be = OnnxRuntimeBackend(b, share_weights=sys.argv[2] == "1", threads=1)
loaded = rss()
cfg = b.config
x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
for g in b.groups:  # one call per group: activations on top
    feeds = {"x": x, "t": torch.full((2,), g.t_lo), "y": torch.tensor([1, cfg.num_classes])}
    feeds.update({k: torch.from_numpy(v) for k, v in b.mask_inputs(g.t_lo, 2).items()})
    be.run_group(g.index, feeds)
wbytes = b.manifest["files"]["weights.bin"]["bytes"]
print(json.dumps({"load": loaded - before, "run": rss() - before, "weights": wbytes}))
"""


@pytest.fixture(scope="module")
def big_bundle(tmp_path_factory) -> Path:
    """8 groups over a ~350 MB weights file (random routers: every t its own architecture)."""
    from dyc.compiler.compile import compile_checkpoint

    d = tmp_path_factory.mktemp("big")
    torch.set_num_threads(1)
    cfg = ModelConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=512, depth=8, num_heads=8, num_classes=10)
    ck = save_checkpoint(random_model(cfg, seed=0, router_scale=3.0), d / "m.safetensors")
    r = compile_checkpoint(ck, d / "m.dyc", groups=8, calib=1, calib_steps=2)
    assert len(r.plan.groups) == 8
    return r.path


def _measure(bundle: Path, shared: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(bundle), "1" if shared else "0"], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_group_sessions_share_one_copy_of_the_weights(big_bundle):
    m = _measure(big_bundle, shared=True)
    assert m["weights"] > 300e6
    assert m["load"] <= 1.2 * m["weights"], m  # 8 sessions, one copy of weights.bin
    own = _measure(big_bundle, shared=False)
    assert own["load"] > 2.0 * m["weights"], own  # ONNX Runtime's own copies: the test tells them apart


def test_shared_and_owned_weights_give_the_same_output(big_bundle):
    from dyc.backends.onnxruntime import OnnxRuntimeBackend
    from dyc.bundle import Bundle

    b = Bundle.load(big_bundle, verify_checksums=False)
    shared, owned = OnnxRuntimeBackend(b, threads=1), OnnxRuntimeBackend(b, share_weights=False, threads=1)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for g in (b.groups[0], b.groups[-1]):
        feeds = {"x": x, "t": torch.full((2,), g.t_hi), "y": torch.tensor([3, 10])}
        feeds.update({k: torch.from_numpy(v) for k, v in b.mask_inputs(g.t_hi, 2).items()})
        a, o = shared.run_group(g.index, feeds), owned.run_group(g.index, feeds)
        # fp32, different GEMM kernels (pre-packed or not) through a deep random model: relative 1e-5
        assert ((a - o).abs().max() / o.abs().max()).item() < 1e-5


def test_altered_weights_are_refused_on_the_bytes_read(tmp_path, big_bundle):
    """The backend checks sha256 on the bytes it uses (a bundle loaded without checksums included)."""
    import shutil

    from dyc.backends.onnxruntime import OnnxRuntimeBackend
    from dyc.bundle import Bundle

    copy = tmp_path / "c.dyc"
    shutil.copytree(big_bundle, copy)
    b = Bundle.load(copy, verify_checksums=False)
    with open(copy / "weights.bin", "r+b") as f:  # same size, one flipped bit
        f.seek(12345)
        v = f.read(1)[0]
        f.seek(12345)
        f.write(bytes([v ^ 1]))
    for share in (True, False):
        with pytest.raises(DycError, match="weights.bin was altered"):
            OnnxRuntimeBackend(b, share_weights=share)
    graph = copy / b.manifest["groups"][0]["files"]["std"]
    data = graph.read_bytes()
    graph.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(DycError, match="group0.onnx was altered"):
        OnnxRuntimeBackend(Bundle.load(copy, verify_checksums=False))


def test_cublas_workspace_setting_is_scoped_and_yields_to_the_users(monkeypatch):
    """The sessions' cuBLAS handles are created under CUBLAS_WORKSPACE_CONFIG=:4096:1 (one 4 MiB pool
    each; cuBLAS's default is ~60 MB per handle on Hopper, bench/RESULTS.md), the variable is gone
    afterwards, and a value the user set is left as it is."""
    import os

    from dyc.backends.onnxruntime import CUBLAS_WORKSPACE, _cublas_workspace

    assert CUBLAS_WORKSPACE == ":4096:1"
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with _cublas_workspace(CUBLAS_WORKSPACE):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:1"
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with _cublas_workspace(None):  # cuBLAS's default
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with _cublas_workspace(CUBLAS_WORKSPACE):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
