"""Compile small checkpoints end to end: ONNX vs eager, group bound, FLOPs counted from the graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_config

from dyc.bundle import Bundle
from dyc.checkpoint import save_checkpoint
from dyc.compiler.analyse import keep_rates_per_t, tdw_masks
from dyc.compiler.compile import compile_checkpoint
from dyc.compiler.onnx_flops import count_macs
from dyc.compiler.verify import verify_bundle
from dyc.flops import static_breakdown
from dyc.model import DyDiT


def _model(depth: int, router_scale: float, seed: int = 0, dynamic: bool = True, **kw) -> DyDiT:
    torch.manual_seed(seed)
    m = DyDiT(tiny_config(depth=depth, dynamic=dynamic, **kw)).eval()
    if dynamic:
        with torch.no_grad():
            for b in m.blocks:  # weights only: the bias keeps the masks from flipping all together
                b.attn_rate.router.weight.mul_(router_scale)
                b.mlp_rate.router.weight.mul_(router_scale)
    return m


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """Random routers: hundreds of distinct architectures over t; K = 4 engines."""
    d = tmp_path_factory.mktemp("many")
    m = _model(depth=3, router_scale=30.0)
    ckpt = save_checkpoint(m, d / "many.safetensors")
    r = compile_checkpoint(ckpt, d / "many.dyc", groups=4, calib=1, calib_steps=10)
    return m, ckpt, r


def test_group_bound_and_tiling(many):
    m, _, r = many
    head, _ = tdw_masks(m)
    assert len(r.manifest["masks"]["architectures"]) > 100
    b = Bundle.load(r.path)
    assert 1 <= len(b.groups) <= 4
    assert b.groups[0].t_lo == 0 and b.groups[-1].t_hi == 999
    for t in (0, 1, 499, 998, 999):
        assert b.group_for_t(t).contains(t)
        h, _ = b.masks_for_t(t)
        assert (h == head[t]).all()


def test_fp32_onnx_matches_eager_at_every_schedule_t(many):
    _, _, r = many
    rep = verify_bundle(r.path)
    assert rep.ok, rep.format()
    assert sum(g.timesteps for g in rep.groups) >= 50  # every DDIM-50 step was checked
    assert max(g.max_rel for g in rep.groups) <= 1e-4


def test_realized_ratio_equals_onnx_counted(many):
    """λ the engines realise == MACs counted from the exported graphs (both variants) at the keep rates."""
    m, _, r = many
    b = Bundle.load(r.path)
    cal = b.manifest["calibration"]
    keep = keep_rates_per_t(cal["timesteps"], np.array(cal["keep_rates"]))
    static = static_breakdown(b.config).blocks
    for variant in ("std", "trt"):
        graphs = [onnx.load(str(b.onnx_path(g, variant)), load_external_data=False) for g in b.groups]
        vals = [count_macs(graphs[b.group_for_t(t).index], keep[t])["blocks"] / static for t in b.schedule]
        assert np.mean(vals) == pytest.approx(b.manifest["lambda"]["realized"], rel=1e-9)
    assert b.manifest["lambda"]["onnx_counted"] == pytest.approx(b.manifest["lambda"]["realized"], rel=1e-9)
    assert b.manifest["lambda"]["realized"] >= b.manifest["lambda"]["model"] - 1e-12


def test_graph_structure(many):
    _, _, r = many
    b = Bundle.load(r.path)
    for g in b.groups:
        std = onnx.load(str(b.onnx_path(g, "std")), load_external_data=False)
        trt = onnx.load(str(b.onnx_path(g, "trt")), load_external_data=False)
        for model in (std, trt):
            assert model.opset_import[0].version >= 17
            assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
            big = [i for i in model.graph.initializer if int(np.prod(i.dims)) > 1024]
            assert big and all(i.data_location == onnx.TensorProto.EXTERNAL for i in big)
            # no weight stored twice within a graph: distinct initializers point at distinct bytes
            spans = [tuple(e.value for e in i.external_data if e.key in ("location", "offset"))
                     for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
            assert len(spans) == len(set(spans))
            names = [i.name for i in model.graph.input]
            assert ("head_mask" in names) == g.needs_head_mask and ("channel_mask" in names) == g.needs_channel_mask
        std_ops = {n.op_type for n in std.graph.node}
        assert {"NonZero", "GatherND", "ScatterND"} <= std_ops and "SdtMlp" not in std_ops
        sdt = [n for n in trt.graph.node if n.op_type == "SdtMlp"]
        assert len(sdt) == b.config.depth and all(n.domain == "dyc" for n in sdt)
        assert "NonZero" not in {n.op_type for n in trt.graph.node}
        assert {o.domain for o in trt.opset_import} == {"", "dyc"}
        # sliced: every qkv has exactly the union heads' rows
        for l in range(b.config.depth):
            w = next(i for i in std.graph.initializer if i.name == f"blocks.{l}.attn.qkv.weight")
            assert w.dims[0] == 3 * len(g.heads[l]) * b.config.head_dim


def test_dynamic_batch(many):
    m, _, r = many
    b = Bundle.load(r.path)
    g = b.groups[-1]
    sess = ort.InferenceSession(str(b.onnx_path(g, "std")), providers=["CPUExecutionProvider"])
    t = g.t_hi
    for batch in (1, 3):
        x = torch.randn(batch, 4, 8, 8)
        y = torch.randint(0, 11, (batch,))
        tt = torch.full((batch,), t)
        ref = m(x, tt, y).detach().numpy()
        out = sess.run(None, {"x": x.numpy(), "t": tt.numpy(), "y": y.numpy(), **b.mask_inputs(t, batch)})[0]
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_trained_like_routers_default_k(tmp_path):
    """Few architectures: default K stays small and engines realise the model's own λ."""
    m = _model(depth=2, router_scale=0.1, seed=4)
    ckpt = save_checkpoint(m, tmp_path / "few.safetensors")
    r = compile_checkpoint(ckpt, tmp_path / "few.dyc", calib=1, calib_steps=5)
    n_arch = len(r.manifest["masks"]["architectures"])
    assert n_arch < 10
    assert len(r.plan.groups) <= min(8, n_arch + 30)
    assert r.plan.lambda_realized <= r.plan.lambda_model * 1.02 + 1e-12 or len(r.plan.groups) == 8
    assert verify_bundle(r.path).ok


def test_lambda_target_forces_offset(tmp_path):
    m = _model(depth=2, router_scale=30.0, seed=2)
    ckpt = save_checkpoint(m, tmp_path / "m.safetensors")
    r = compile_checkpoint(ckpt, tmp_path / "m.dyc", lambda_target=0.3, groups=3, calib=1, calib_steps=5)
    lam = r.manifest["lambda"]
    assert r.manifest["offset_forced"] and r.manifest["threshold_offset"] > 0
    assert lam["trained"] > 0.3 >= lam["model"]
    assert "not trained" in r.manifest["notes"][0]
    if lam["realized"] > 0.3:  # unions of 3 groups of many architectures: said, not hidden
        assert "engines realize" in r.manifest["notes"][1]
    rep = verify_bundle(r.path)  # the eager reference runs with the same offset
    assert rep.ok, rep.format()


def test_plain_dit_compiles_to_one_group(tmp_path):
    m = _model(depth=2, router_scale=1.0, dynamic=False)
    ckpt = save_checkpoint(m, tmp_path / "dit.safetensors")
    r = compile_checkpoint(ckpt, tmp_path / "dit.dyc", calib=1, calib_steps=3)
    b = Bundle.load(r.path)
    assert len(b.groups) == 1 and not b.groups[0].needs_head_mask and not b.groups[0].needs_channel_mask
    assert b.manifest["lambda"]["realized"] == pytest.approx(1.0)
    assert b.onnx_path(0, "std") == b.onnx_path(0, "trt")
    ops = {n.op_type for n in onnx.load(str(b.onnx_path(0, "std")), load_external_data=False).graph.node}
    assert not ops & {"NonZero", "SdtMlp", "ScatterND"}
    assert verify_bundle(r.path).ok


def test_fp16_bundle(tmp_path):
    m = _model(depth=2, router_scale=0.1, seed=4)
    ckpt = save_checkpoint(m, tmp_path / "h.safetensors")
    r = compile_checkpoint(ckpt, tmp_path / "h.dyc", dtype="fp16", groups=2, calib=1, calib_steps=3)
    rep = verify_bundle(r.path)
    assert rep.tolerance is None and all(g.tolerance >= 1e-2 for g in rep.groups)  # the fp16 floor at least
    assert rep.ok, rep.format()


def test_groups_share_prefix_weights(many):
    """Units are ordered per layer so that nested unions are prefixes of one stored copy."""
    from dyc.compiler.slice import is_prefix, unit_orders

    _, _, r = many
    b = Bundle.load(r.path)
    ho, co = unit_orders(b.groups, b.config.depth)
    for l in range(b.config.depth):
        offsets = {}
        for g in b.groups:
            model = onnx.load(str(b.onnx_path(g, "std")), load_external_data=False)
            init = {i.name: i for i in model.graph.initializer}
            ext = {e.key: e.value for e in init[f"blocks.{l}.attn.qkv.weight"].external_data}
            offsets[g.index] = ext["offset"]
            assert g.heads[l] == [u for u in ho[l] if u in g.heads[l]]  # slot order = shared order
        prefix = [g.index for g in b.groups if is_prefix(g.heads[l], ho[l])]
        assert len({offsets[i] for i in prefix}) <= 1
    total = sum(f["bytes"] for n, f in b.manifest["files"].items() if n == "weights.bin")
    assert total < 4 * sum(p.numel() * 4 for p in _model(3, 30.0).state_dict().values())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_graphs_pass_the_onnx_checker(tmp_path, dtype):
    """Type-valid ONNX (opset-17 schemas, strict shape inference); bf16 verify fails clearly on ORT CPU."""
    from dyc.errors import DycError

    m = _model(depth=2, router_scale=30.0, seed=5)
    ckpt = save_checkpoint(m, tmp_path / "m.safetensors")
    r = compile_checkpoint(ckpt, tmp_path / "m.dyc", dtype=dtype, groups=2, calib=1, calib_steps=2)
    b = Bundle.load(r.path)
    for g in b.groups:
        onnx.checker.check_model(str(b.onnx_path(g, "std")), full_check=True)
        onnx.checker.check_model(str(b.onnx_path(g, "trt")))
    if dtype == "bf16":
        with pytest.raises(DycError, match="no bf16 kernels"):
            verify_bundle(r.path)
