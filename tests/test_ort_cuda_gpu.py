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
    """Against the fp32 eager model, pooled over every group's first and last timestep (as ``dyc
    verify``): fp32 within TF32's error; fp16/bf16 within twice the error of the eager model itself
    run in that dtype on the GPU (this small model's own fp16/bf16 error is 1e-2 to 1e-1: a token
    whose router score is near 0.5 flips its SDT decision, which moves its whole MLP output)."""
    import copy

    from dyc.backends.onnxruntime import OnnxRuntimeBackend
    from dyc.bundle import Bundle

    model, bundles = tame
    b = Bundle.load(bundles[dtype])
    be = OnnxRuntimeBackend(b, device="cuda")
    assert be.variant == "cuda" and be.cuda_graphs, (be.variant, be.cuda_graphs)
    tdt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    eager_dt = copy.deepcopy(model).to("cuda", tdt)
    gen = torch.Generator().manual_seed(0)
    cfg = b.config
    x = torch.randn(4, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    y = torch.tensor([1, 5, cfg.num_classes, cfg.num_classes])
    num = {"ort": 0.0, "eager": 0.0}
    den = 0.0
    for g in b.groups:
        for t in (g.t_lo, g.t_hi):
            tt = torch.full((4,), t)
            with torch.no_grad():
                ref = model(x, tt, y, threshold_offset=b.threshold_offset)
                e = eager_dt(x.to("cuda", tdt), tt.cuda(), y.cuda(), threshold_offset=b.threshold_offset)
            outs = [be.run_group(g.index, _feeds(b, t, x, y)).float().cpu() for _ in range(3)]  # capture, replays
            for o in outs[1:]:
                torch.testing.assert_close(o, outs[0], rtol=0, atol=1e-3 * float(outs[0].abs().max()))
            num["ort"] += float((outs[-1] - ref).norm() ** 2)
            num["eager"] += float((e.float().cpu() - ref).norm() ** 2)
            den += float(ref.norm() ** 2)
    err, own = (num["ort"] / den) ** 0.5, (num["eager"] / den) ** 0.5
    bound = 5e-3 if dtype == "fp32" else 2 * own + 5e-3
    assert err <= bound, (dtype, err, own)


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
    """8 group sessions over one device copy: their load costs the groups' own slices of the weights
    less one copy, against 8 sessions that each own theirs (what is left is ONNX Runtime's fixed
    per-session CUDA state, measured on the H200 by bench/profile_ort.py)."""
    from dyc.backends.onnxruntime import OnnxRuntimeBackend
    from dyc.bundle import Bundle
    from dyc.compiler.compile import compile_checkpoint

    cfg = ModelConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=512, depth=8, num_heads=8, num_classes=10)
    ck = save_checkpoint(random_model(cfg, seed=0, router_scale=3.0), tmp_path / "m.safetensors")
    b = Bundle.load(compile_checkpoint(ck, tmp_path / "m.dyc", groups=8, calib=1, calib_steps=2, dtype="fp16").path)
    weights = b.manifest["files"]["weights.bin"]["bytes"]

    def load_bytes(**kw) -> tuple[int, OnnxRuntimeBackend]:
        torch.cuda.synchronize()
        free0, _ = torch.cuda.mem_get_info()
        be = OnnxRuntimeBackend(b, device="cuda", **kw)
        torch.cuda.synchronize()
        return free0 - torch.cuda.mem_get_info()[0], be

    shared, be = load_bytes()
    held = be.weight_bytes()  # the parts of weights.bin the cuda graphs reference (not std's own tensors)
    assert 0 < held <= weights
    # what sessions that own their weights hold: each group's own slices (narrower groups, fewer bytes)
    per_group = sum(r.length for g in be.groups for r in g.weights)
    assert per_group > 2 * held
    own, _ = load_bytes(share_weights=False)
    assert own - shared >= 0.9 * (per_group - held), (shared, own, per_group, held, weights)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_glue_ops_cuda_kernels_match_torch(dtype):
    """dyc::LnModulate (also with the ones column), dyc::GatedResidual and dyc::TokenKeep on the CUDA
    EP against torch's maths in float32, at DiT-XL/2's width (1152: the vector kernels), a narrower one
    (512), a wide one (8192: several vectors per thread) and an odd one (45: the scalar kernels)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from dyc.backends.onnxruntime import ops_library

    tdt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    et = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[dtype]
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(ops_library()))
    g = torch.Generator().manual_seed(0)
    for b, n, c in ((4, 256, 1152), (5, 33, 512), (2, 16, 8192), (3, 7, 45)):
        x, y = (torch.randn(b, n, c, generator=g) * 2 + 0.5).to(tdt), torch.randn(b, n, c, generator=g).to(tdt)
        shift, scale, gate = (torch.randn(b, c, generator=g).to(tdt) for _ in range(3))
        bias = torch.randn(c, generator=g).to(tdt)
        f = {k: v.float() for k, v in dict(x=x, y=y, shift=shift, scale=scale, gate=gate, bias=bias).items()}
        ln = torch.nn.functional.layer_norm(f["x"], (c,), eps=1e-6) * (1 + f["scale"][:, None]) + f["shift"][:, None]
        pad = (c + 8) // 8 * 8 - c - 1
        cases = [
            ("LnModulate", dict(x=x, shift=shift, scale=scale), {"eps": 1e-6}, ln),
            ("LnModulate", dict(x=x, shift=shift, scale=scale), {"eps": 1e-6, "ones_column": 8},
             torch.cat([ln, torch.ones(b, n, 1), torch.zeros(b, n, pad)], dim=2)),
            ("GatedResidual", dict(x=x, gate=gate, y=y, bias=bias), {},
             f["x"] + f["gate"][:, None] * (f["y"] + f["bias"])),
            ("GatedResidual", dict(x=x, gate=gate, y=y), {}, f["x"] + f["gate"][:, None] * f["y"]),
        ]
        # TokenKeep over [b, n, c // 16 + 1] router activations (XL: 72 per token)
        th = c // 16 + 1
        h, b1, w2, b2 = (torch.randn(*s, generator=g).to(tdt) for s in ((b, n, th), (th,), (1, th), (1,)))
        z = torch.relu(h.float() + b1.float()) @ w2.float()[0] + b2.float()
        near = z.abs() < 1e-2  # float sums in another order may flip these tokens only
        cases.append(("TokenKeep", dict(h=h, b1=b1, w2=w2, b2=b2), {}, (torch.sigmoid(z) > 0.5).float()))
        for op, feeds, attrs, want in cases:
            node = helper.make_node(op, list(feeds), ["out"], domain="dyc", **attrs)
            graph = helper.make_graph(
                [node], op, [helper.make_tensor_value_info(k, et, list(v.shape)) for k, v in feeds.items()],
                [helper.make_tensor_value_info("out", et, list(want.shape))])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("dyc", 1)])
            model.ir_version = 8  # onnx's newest IR can be ahead of onnxruntime's
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])
            io = sess.io_binding()
            dev = {k: v.cuda().contiguous() for k, v in feeds.items()}
            out = torch.empty(want.shape, dtype=tdt, device="cuda")
            for k, v in dev.items():
                io.bind_input(k, "cuda", 0, et, list(v.shape), v.data_ptr())
            io.bind_output("out", "cuda", 0, et, list(out.shape), out.data_ptr())
            sess.run_with_iobinding(io)
            torch.cuda.synchronize()
            if op == "TokenKeep":
                assert 0 < want.sum() < want.numel()
                torch.testing.assert_close(out.float().cpu()[~near], want[~near], rtol=0, atol=0)
                continue
            tol = {"fp32": 1e-5, "fp16": 4e-3, "bf16": 3e-2}[dtype]  # one rounding of the result
            torch.testing.assert_close(out.float().cpu(), want, rtol=tol, atol=tol * float(want.abs().max()))
