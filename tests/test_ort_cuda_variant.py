"""The bundle's ``cuda`` graphs (ONNX Runtime CUDA EP), checked on the CPU: their structure, the
tensors they add to weights.bin, and the plain DiT's against the eager model where the op library is
built (the graphs run in tests/test_plugins_build.py, which builds it)."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from conftest import random_model, tiny_config
from runtime_fixtures import tame_config, tame_model

from dyc.bundle import Bundle, manifest_checksum
from dyc.checkpoint import save_checkpoint
from dyc.compiler.compile import compile_checkpoint
from dyc.compiler.export_cuda import cpu_form
from dyc.errors import DycError

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("cudavar")
    torch.set_num_threads(1)
    out = {}
    for dynamic in (True, False):
        # the tame DyDiT (bounded outputs); a plain DiT has no routers to tame
        model = tame_model(tame_config(), seed=2) if dynamic else random_model(tiny_config(dynamic=False), seed=1)
        ck = save_checkpoint(model, d / f"m{int(dynamic)}.safetensors")
        out[dynamic] = (model, compile_checkpoint(ck, d / f"m{int(dynamic)}.dyc", groups=3, calib=1, calib_steps=2,
                                                  dtype="fp16" if dynamic else "fp32").path)
    return out


def _ranges(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    out = {}
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            e = {k.key: k.value for k in init.external_data}
            out[init.name] = (int(e["offset"]), int(e["length"]))
    return out


def test_cuda_graphs_reuse_the_stored_weights(bundles):
    """Every weight of a cuda graph is a byte range the std/trt graphs already reference, except the
    q, k, v weights in the augmented layout ([heads·Dh, C'], each row followed by its bias and zeros),
    whose bytes must be the model's qkv weight and bias for the group's heads in the graph's head order."""
    from dyc.compiler.export_cuda import augmented_width

    model, path = bundles[True]
    b = Bundle.load(path)
    assert b.has_variant("cuda")
    cfg, c, d = b.config, b.config.hidden_size, b.config.head_dim
    ca = augmented_width(c)
    assert ca % 8 == 0 and ca > c
    raw = (b.path / "weights.bin").read_bytes()
    for g in b.groups:
        used = set()
        for v in ("std", "trt"):
            used |= set(_ranges(onnx.load(b.onnx_path(g, v), load_external_data=False)).values())
        cuda = _ranges(onnx.load(b.onnx_path(g, "cuda"), load_external_data=False))
        new = {k: r for k, r in cuda.items() if r not in used}
        assert cuda and set(new) == {f"blocks.{layer}.{p}_w_aug" for layer in range(cfg.depth) for p in "qkv"}
        for layer in range(cfg.depth):
            heads = g.heads[layer]
            w = model.blocks[layer].attn.qkv.weight.detach().view(3, cfg.num_heads, d, c)[:, heads]
            bias = model.blocks[layer].attn.qkv.bias.detach().view(3, cfg.num_heads, d)[:, heads]
            for part, p in enumerate("qkv"):
                off, n = new[f"blocks.{layer}.{p}_w_aug"]
                got = torch.frombuffer(bytearray(raw[off:off + n]), dtype=torch.float16).float().view(-1, ca)
                assert got.shape[0] == len(heads) * d
                torch.testing.assert_close(got[:, :c], w[part].reshape(-1, c).half().float(), rtol=0, atol=0)
                torch.testing.assert_close(got[:, c], bias[part].reshape(-1).half().float(), rtol=0, atol=0)
                assert not got[:, c + 1:].any()


def test_cuda_graph_operators(bundles):
    _, path = bundles[True]
    b = Bundle.load(path)
    g = next(g for g in b.groups if g.needs_channel_mask)
    m = onnx.load(b.onnx_path(g, "cuda"), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    assert not {"NonZero", "GatherND", "ScatterND", "Conv", "Softmax"} & set(ops)  # no host sync, no cuDNN
    sdt = [n for n in m.graph.node if n.op_type == "SdtMlp"]
    assert len(sdt) == b.config.depth and all(n.domain == "dyc" for n in sdt)
    assert all(next(a.i for a in n.attribute if a.name == "shared_channel_mask") == 1 for n in sdt)
    assert any(len(n.input) == 10 for n in sdt)  # the varying layers take their channel mask
    mha = [n for n in m.graph.node if n.op_type == "MultiHeadAttention"]
    # Q, K, V apart and no bias input: flash attention reads the GEMMs' outputs with no pass before it
    assert len(mha) == b.config.depth and all(len(n.input) == 3 and all(n.input) for n in mha)
    assert cpu_form(m) == m  # nothing packed left for the CPU form to split
    # the glue is one custom kernel each: no LayerNormalization chain, no biased GEMM over the tokens
    assert "LayerNormalization" not in ops
    assert ops.count("LnModulate") == b.config.depth + 1 and ops.count("GatedResidual") == b.config.depth
    # the token router: one bias-free GEMM, then TokenKeep (no Relu/Sigmoid/Greater chain, no broadcast bias)
    router = [n.op_type for n in m.graph.node if "token_selection" in n.name]
    assert ops.count("TokenKeep") == b.config.depth and not {"Relu", "Sigmoid", "Greater"} & set(router), router
    ones = [next((a.i for a in n.attribute if a.name == "ones_column"), 0) for n in m.graph.node
            if n.op_type == "LnModulate"]
    assert ones.count(8) == b.config.depth and ones.count(0) == 1  # before qkv, not before the final linear
    tokens_gemms = [n for n in m.graph.node
                    if n.op_type == "Gemm" and ("attn" in n.name or n.input[1] == "x_embedder.proj.weight")]
    assert tokens_gemms and all(len(n.input) == 2 for n in tokens_gemms)


def test_plain_dit_cuda_graphs_match_eager_on_the_cpu(bundles):
    from dyc.backends.onnxruntime import OnnxRuntimeBackend, ops_library

    if ops_library() is None:
        pytest.skip("needs libdyc_ort_ops.so (dyc::LnModulate, dyc::GatedResidual): CI's plugin step runs this "
                    "graph with it (tests/test_plugins_build.py::test_cuda_graphs_run_on_the_cpu)")
    model, path = bundles[False]
    b = Bundle.load(path)
    be = OnnxRuntimeBackend(b, variant="cuda")  # FastGelu with fc1's bias, MultiHeadAttention with qkv's
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([2, 7, 10])
    for t in (0, 500, 999):
        out = be.run_group(0, {"x": x, "t": torch.full((3,), t), "y": y})
        with torch.no_grad():
            ref = model(x, torch.full((3,), t), y)
        # ORT's CPU FastGelu evaluates tanh by a polynomial (~1e-6), which this random DiT amplifies
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 5e-4


def test_bundles_without_cuda_graphs_still_load(tmp_path, bundles):
    import shutil

    from dyc.backends.onnxruntime import OnnxRuntimeBackend

    _, path = bundles[True]
    old = tmp_path / "old.dyc"
    shutil.copytree(path, old)
    m = json.loads((old / "manifest.json").read_text())
    for g in m["groups"]:
        (old / g["files"].pop("cuda")).unlink()
        m["files"].pop(f"group{g['index']}.cuda.onnx")
    m["manifest_sha256"] = manifest_checksum(m)
    (old / "manifest.json").write_text(json.dumps(m))
    b = Bundle.load(old)
    assert not b.has_variant("cuda")
    with pytest.raises(DycError, match="no 'cuda' graphs"):
        b.onnx_path(0, "cuda")
    be = OnnxRuntimeBackend(b)
    assert be.variant == "std" and be.mixed_timesteps  # per-row masks: rows may be at different t
