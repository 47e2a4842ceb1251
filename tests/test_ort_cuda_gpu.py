"""The onnxruntime backend on CUDA (onnxruntime-gpu, libdyc_ort_ops.so): the ``cuda`` graphs against the
eager model, CUDA-graph replays, one device copy of the weights. Runs on a GPU machine only
(bench/gpu_ort.sh runs it first); skipped elsewhere with the reason."""

from __future__ import annotations

import pytest
import torch
from conftest import random_model
from runtime_fixtures import tame_config, tame_model

from dyc.checkpoint import save_checkpoint
from dyc.config import ModelConfig


def _why_not() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    try:
        import onnxruntime as ort
    except ImportError:
        return "needs onnxruntime-gpu"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "needs onnxruntime-gpu (this onnxruntime has no CUDA EP)"
    from dyc.backends.onnxruntime import ops_library

    if ops_library() is None:
        return "needs libdyc_ort_ops.so (cmake build of plugins/, or DYC_ORT_OPS_LIB)"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")
TOL = {"fp32": 5e-3, "fp16": 2e-2, "bf16": 4e-2}  # relative L2 against the fp32 eager model (fp32: TF32 GEMMs)


@pytest.fixture(scope="module")
def tame(tmp_path_factory):
    """A tame DyDiT (bounded outputs) with 64 tokens, compiled to 3 groups in each dtype."""
    from dyc.compiler.compile import compile_checkpoint

    d = tmp_path_factory.mktemp("ortgpu")
    cfg = tame_config(input_size=16, hidden_size=128, depth=4, num_heads=4)
    model = tame_model(cfg, seed=5)
    ck = save_checkpoint(model, d / "m.safetensors")
    bundles = {dt: compile_checkpoint(ck, d / f"m_{dt}.dyc", groups=3, calib=1, calib_steps=3, dtype=dt).path
               for dt in ("fp32", "fp16", "bf16")}
    return model, bundles


def _feeds(b, t: int, x: torch.Tensor, y: torch.Tensor) -> dict:
    f = {"x": x, "t": torch.full((x.shape[0],), t), "y": y}
    f.update({k: torch.from_numpy(v) for k, v in b.mask_inputs(t, x.shape[0]).items()})
    return f


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cuda_graphs_of_every_group_match_eager(tame, dtype):
    from dyc.backends.onnxruntime import OnnxRuntimeBackend
    from dyc.bundle import Bundle

    model, bundles = tame
    b = Bundle.load(bundles[dtype])
    be = OnnxRuntimeBackend(b, device="cuda")
    assert be.variant == "cuda" and be.cuda_graphs, (be.variant, be.cuda_graphs)
    gen = torch.Generator().manual_seed(0)
    cfg = b.config
    x = torch.randn(4, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    y = torch.tensor([1, 5, cfg.num_classes, cfg.num_classes])
    for g in b.groups:
        for t in (g.t_lo, g.t_hi):
            with torch.no_grad():
                ref = model(x, torch.full((4,), t), y, threshold_offset=b.threshold_offset)
            for _ in range(3):  # capture, then replays
                out = be.run_group(g.index, _feeds(b, t, x, y)).float().cpu()
                err = float((out - ref).norm() / ref.norm())
                assert err < TOL[dtype], (g.index, t, err)


def test_replays_follow_new_inputs_and_batch_sizes(tame):
    """A captured graph reads the bound buffers afresh each replay; each batch size has its own graph."""
    from dyc.backends.onnxruntime import OnnxRuntimeBackend
    from dyc.bundle import Bundle

    _, bundles = tame
    b = Bundle.load(bundles["fp16"])
    graphs, plain = OnnxRuntimeBackend(b, device="cuda"), OnnxRuntimeBackend(b, device="cuda", cuda_graphs=False)
    assert not plain.cuda_graphs
    cfg, g = b.config, b.groups[-1]
    gen = torch.Generator().manual_seed(1)
    for batch in (2, 6, 2):
        for _ in range(4):
            x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
            y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=gen)
            a, p = graphs.run_group(g.index, _feeds(b, g.t_lo, x, y)), plain.run_group(g.index, _feeds(b, g.t_lo, x, y))
            assert a.shape == (batch, cfg.out_channels, cfg.input_size, cfg.input_size)
            torch.testing.assert_close(a, p, rtol=2e-3, atol=2e-3)


def test_group_sessions_share_one_device_copy_of_the_weights(tmp_path):
    from dyc.backends.onnxruntime import OnnxRuntimeBackend
    from dyc.bundle import Bundle
    from dyc.compiler.compile import compile_checkpoint

    cfg = ModelConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=512, depth=8, num_heads=8, num_classes=10)
    ck = save_checkpoint(random_model(cfg, seed=0, router_scale=3.0), tmp_path / "m.safetensors")
    b = Bundle.load(compile_checkpoint(ck, tmp_path / "m.dyc", groups=8, calib=1, calib_steps=2, dtype="fp16").path)
    weights = b.manifest["files"]["weights.bin"]["bytes"]
    torch.cuda.synchronize()
    free0, _ = torch.cuda.mem_get_info()
    be = OnnxRuntimeBackend(b, device="cuda")
    torch.cuda.synchronize()
    free1, _ = torch.cuda.mem_get_info()
    assert be.weight_bytes() == weights
    assert free0 - free1 <= 1.2 * weights + (64 << 20), (free0 - free1, weights)  # 8 sessions, one device copy
