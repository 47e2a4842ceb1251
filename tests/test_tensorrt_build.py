"""TensorRT engines of a bundle, built ahead of time on this CPU machine with TensorRT-RTX.

What is checked: the networks TensorRT's ONNX parser makes of the group graphs (layers and tensor
shapes before any build: sliced widths, the SDT form), the plans ``build_engines`` writes, and the
sidecar manifest that records flavour, version, targets and profiles. Nothing here runs an engine:
TensorRT-RTX builds without a GPU but loads plans only on one (compute capability 8.x/12.x).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from tensorrt_helpers import compile_tiny, copy_bundle, rtx_module

from dyc.bundle import Bundle
from dyc.errors import DycError
from dyc.tensorrt import build as trt_build
from dyc.tensorrt.build import (
    build_engines,
    choose_sdt_form,
    describe_network,
    engine_batches,
    find_plugin_library,
    load_plugin_library,
    normalize_cc,
    parse_batch_sizes,
    parse_group,
)
from dyc.tensorrt.common import read_trt_manifest, sha256_file
from dyc.tensorrt.sdt import count_sdt_ops, densify_sdt


@pytest.fixture(scope="module")
def trt():
    return rtx_module()


@pytest.fixture(scope="module")
def bundle16(tmp_path_factory) -> Path:
    return compile_tiny(tmp_path_factory.mktemp("trt16"), "fp16")


@pytest.fixture(scope="module")
def built(trt, bundle16, tmp_path_factory) -> tuple[Path, dict]:
    path = copy_bundle(bundle16, tmp_path_factory.mktemp("built"))
    return path, build_engines(path, flavor="tensorrt_rtx")


def _narrowed(b: Bundle):
    h = b.config.num_heads
    return [g for g in b.groups if any(len(x) < h for x in g.heads) or any(len(x) < h for x in g.channels)]


# ---- options -------------------------------------------------------------------------------
def test_batch_sizes_and_cfg_doubling():
    assert parse_batch_sizes("16,1,32,16") == (1, 16, 32)
    assert engine_batches((1, 16, 32)) == (1, 2, 16, 32, 64)
    assert engine_batches((1, 16, 32), cfg_batch=False) == (1, 16, 32)
    for bad in ("", "0", "a,b", "-2"):
        with pytest.raises(DycError):
            parse_batch_sizes(bad)
    assert [normalize_cc(c) for c in ("86", "8.6", "sm86", "sm_120", "12.0")] == ["8.6"] * 3 + ["12.0"] * 2
    with pytest.raises(DycError):
        normalize_cc("x")


def test_sdt_form_choice():
    assert choose_sdt_form("tensorrt_rtx", "auto", None, True) == "dense"
    assert choose_sdt_form("tensorrt", "auto", None, True) == "gather"
    assert choose_sdt_form("tensorrt", "auto", Path("/lib.so"), True) == "plugin"
    assert choose_sdt_form("tensorrt_rtx", "auto", None, False) == "none"  # plain DiT: no SDT at all
    with pytest.raises(DycError, match="NonZero"):
        choose_sdt_form("tensorrt_rtx", "gather", None, True)
    with pytest.raises(DycError, match="plugin"):
        choose_sdt_form("tensorrt", "plugin", None, True)


# ---- the dense SDT rewrite is exact ----------------------------------------------------------
def test_dense_sdt_rewrite_matches_std_graph(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = compile_tiny(tmp_path, "fp32")  # ORT's CPU ScatterND(add) has no fp16 kernel
    b = Bundle.load(path)
    rng = np.random.default_rng(0)
    for g in b.groups:
        std = onnx.load(str(b.onnx_path(g, "std")), load_external_data=False)
        dense = densify_sdt(std, b.config.num_tokens)
        assert count_sdt_ops(std)["nonzero"] == b.config.depth
        assert count_sdt_ops(dense) == {"nonzero": 0, "plugin": 0, "scatternd": 0}
        assert [n.op_type for n in dense.graph.node].count("Where") == b.config.depth
        dpath = path / f"_dense{g.index}.onnx"  # beside weights.bin, which it references
        dpath.write_bytes(dense.SerializeToString())
        s_std, s_dense = ort.InferenceSession(str(b.onnx_path(g, "std"))), ort.InferenceSession(str(dpath))
        for t in (g.t_lo, g.t_hi):
            feeds = {"x": rng.standard_normal((3, 4, 8, 8)).astype(np.float32), "t": np.full(3, t, np.int64),
                     "y": np.array([1, 5, b.config.num_classes]), **b.mask_inputs(t, 3)}
            feeds = {i.name: feeds[i.name] for i in s_std.get_inputs()}
            ref, got = s_std.run(None, feeds)[0], s_dense.run(None, feeds)[0]
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
        dpath.unlink()


# ---- parsed networks -------------------------------------------------------------------------
def _dims(*shape: int) -> tuple[int, ...]:
    """A weight's dims regardless of its stored orientation ([out, in] for Gemm transB, [in, out] otherwise)."""
    return tuple(sorted(shape))


def _const_matmul_shapes(desc: dict, scope: str) -> list[tuple[int, ...]]:
    out = []
    for layer in desc["layers"]:
        if layer["type"] == "MATRIX_MULTIPLY" and layer["name"].startswith(scope):
            out += [_dims(*i["shape"]) for i in layer["inputs"] if i["constant"]]
    return out


def test_parsed_networks_have_sliced_widths(trt, bundle16):
    b = Bundle.load(bundle16)
    cfg = b.config
    c, d, gs, h = cfg.hidden_size, cfg.head_dim, cfg.group_size, cfg.num_heads
    narrowed = _narrowed(b)
    assert narrowed, "the fixture must give a group narrower than the full model"
    full = {_dims(3 * c, c), _dims(c, c), _dims(4 * c, c)}
    for g in b.groups:
        desc = describe_network(trt, parse_group(trt, b, g.index, "dense").network)
        for l in range(cfg.depth):
            hn, gn = len(g.heads[l]), len(g.channels[l])
            assert sorted(_const_matmul_shapes(desc, f"blocks.{l}.attn/")) == sorted([_dims(3 * hn * d, c),
                                                                                      _dims(c, hn * d)])
            assert sorted(_const_matmul_shapes(desc, f"blocks.{l}.mlp/")) == [_dims(gn * gs, c)] * 2
            # the attention itself runs on hn heads: Q·Kᵀ and A·V are [B, hn, N, *]
            qk = [layer for layer in desc["layers"] if layer["type"] == "MATRIX_MULTIPLY"
                  and layer["name"].startswith(f"blocks.{l}.attn/") and not any(i["constant"] for i in layer["inputs"])]
            assert len(qk) == 2 and all(i["shape"][1] == hn for layer in qk for i in layer["inputs"])
        if g in narrowed:
            shapes = {s for l in range(cfg.depth) for sc in ("attn", "mlp")
                      for s in _const_matmul_shapes(desc, f"blocks.{l}.{sc}/")}
            widths = [(len(g.heads[l]), len(g.channels[l])) for l in range(cfg.depth)]
            assert any(hn < h or gn < h for hn, gn in widths)
            # no layer of a narrowed group multiplies by a full-width weight where it was narrowed
            for l, (hn, gn) in enumerate(widths):
                if hn < h:
                    assert not set(_const_matmul_shapes(desc, f"blocks.{l}.attn/")) & {_dims(3 * c, c), _dims(c, c)}
                if gn < h:
                    assert not set(_const_matmul_shapes(desc, f"blocks.{l}.mlp/")) & {_dims(4 * c, c)}
            assert shapes - full, "a narrowed group has sliced matrix multiplies"


def test_parsed_network_io_and_dtypes(trt, bundle16):
    b = Bundle.load(bundle16)
    for g in b.groups:
        desc = describe_network(trt, parse_group(trt, b, g.index, "dense").network)
        ins = {i["name"]: i for i in desc["inputs"]}
        assert ins["x"]["shape"] == [-1, 4, 8, 8] and ins["x"]["dtype"] == "HALF"
        assert ins["t"]["dtype"] == ins["y"]["dtype"] == "INT64"
        assert ("head_mask" in ins) == g.needs_head_mask and ("channel_mask" in ins) == g.needs_channel_mask
        if g.needs_head_mask:
            assert ins["head_mask"]["shape"] == [-1, b.config.depth, g.head_slots]
        assert desc["outputs"] == [{"name": "out", "shape": [-1, 8, 8, 8], "dtype": "HALF"}]


def test_dense_sdt_form_in_network(trt, bundle16):
    b = Bundle.load(bundle16)
    desc = describe_network(trt, parse_group(trt, b, 0, "dense").network)
    types = [layer["type"] for layer in desc["layers"]]
    assert "NON_ZERO" not in types and "SCATTER" not in types and "PLUGIN_V3" not in types
    selects = [layer for layer in desc["layers"] if layer["type"] == "SELECT"]
    assert len(selects) == b.config.depth
    assert all(s["outputs"][0]["shape"] == [-1, b.config.num_tokens, b.config.hidden_size] for s in selects)


def test_rtx_refuses_gather_form_and_unregistered_plugin(trt, bundle16):
    b = Bundle.load(bundle16)
    with pytest.raises(DycError, match="NonZero"):
        parse_group(trt, b, 0, "gather")
    if find_plugin_library() is None:
        with pytest.raises(DycError, match="SdtMlp plugin is not registered"):
            parse_group(trt, b, 0, "plugin")


def test_plugin_form_in_network(trt, bundle16):
    lib = find_plugin_library()
    if lib is None:
        pytest.skip("the SdtMlp TensorRT plugin library is not built here (plugins/ needs TensorRT headers)")
    load_plugin_library(trt, lib)
    b = Bundle.load(bundle16)
    cfg = b.config
    for g in b.groups:
        desc = describe_network(trt, parse_group(trt, b, g.index, "plugin").network)
        plugins = [layer for layer in desc["layers"] if layer["type"] in ("PLUGIN_V3", "PLUGIN_V2")]
        assert len(plugins) == cfg.depth
        for l, p in enumerate(plugins):
            assert p["outputs"][0]["shape"] == [-1, cfg.num_tokens, cfg.hidden_size]
            fc = _dims(len(g.channels[l]) * cfg.group_size, cfg.hidden_size)
            assert fc in [_dims(*i["shape"]) for i in p["inputs"]]
            assert not _const_matmul_shapes(desc, f"blocks.{l}.mlp/")  # the MLP is inside the plugin


# ---- building --------------------------------------------------------------------------------
def test_build_engines_writes_plans_and_manifest(trt, built):
    path, m = built
    b = Bundle.load(path)
    assert m == read_trt_manifest(path)
    assert m["flavor"] == "tensorrt_rtx" and m["tensorrt_version"] == trt.__version__
    assert m["target_compute_capabilities"] is None and "8.6" in m["target_note"]
    assert m["bundle_manifest_sha256"] == b.manifest["manifest_sha256"]
    assert m["dtype"] == "fp16" and m["sdt_form"] == "dense" and m["plugin"] is None
    assert m["options"]["engine_batches"] == [1, 2, 16, 32, 64]
    assert m["options"]["profile"] == {"min": 1, "opt": 64, "max": 64}
    assert m["options"]["timing_cache"] is None  # RTX: a timing cache would need a GPU at build
    assert [e["group"] for e in m["engines"]] == [g.index for g in b.groups]
    for e, g in zip(m["engines"], b.groups, strict=True):
        plan = path / e["plan"]
        assert plan.is_file() and plan.stat().st_size == e["bytes"] > 100_000
        assert sha256_file(plan) == e["sha256"]
        assert plan.read_bytes()[:4] != b"\0\0\0\0"
        ins = {i["name"]: i for i in e["inputs"]}
        assert ins["x"]["profile"] == {"min": [1, 4, 8, 8], "opt": [64, 4, 8, 8], "max": [64, 4, 8, 8]}
        assert ins["x"]["dtype"] == "HALF"
        assert ("head_mask" in ins) == g.needs_head_mask
        assert e["onnx"] == b.onnx_path(g, "std").name
        assert e["layer_types"].get("SELECT") == b.config.depth and "NON_ZERO" not in e["layer_types"]
    assert not list((path / "engines").glob(".*tmp*"))


def test_plans_carry_the_groups_layers(built):
    """The plan of each group names that group's own ONNX layers (profiling verbosity DETAILED).

    The engine inspector needs a GPU to deserialise a plan; this checks the plan bytes instead.
    """
    path, m = built
    b = Bundle.load(path)
    for e in m["engines"]:
        data = (path / e["plan"]).read_bytes()
        assert b"blocks.0.attn/" in data and b"final/" in data
        assert f"blocks.{b.config.depth - 1}.mlp/dense_select".encode() in data


def test_build_for_explicit_targets(trt, bundle16, tmp_path):
    path = copy_bundle(bundle16, tmp_path)
    m = build_engines(path, batch_sizes="2", flavor="tensorrt_rtx", compute_capabilities=["86", "sm_89"],
                      groups=[0], cfg_batch=False)
    assert m["target_compute_capabilities"] == ["8.6", "8.9"]
    assert m["options"]["profile"] == {"min": 2, "opt": 2, "max": 2}
    assert [e["group"] for e in m["engines"]] == [0]
    with pytest.raises(DycError, match="cannot target compute capability 9.0"):
        build_engines(path, flavor="tensorrt_rtx", compute_capabilities=["9.0"], groups=[0])


def test_failed_build_keeps_previous_engines(trt, built, tmp_path, monkeypatch):
    src, _ = built
    path = copy_bundle(src, tmp_path)
    before = {p.name: p.read_bytes() for p in (path / "engines").iterdir()}
    real = trt_build.parse_group
    calls = []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise DycError("simulated failure in group 1")
        return real(*args, **kw)

    monkeypatch.setattr(trt_build, "parse_group", failing)
    with pytest.raises(DycError, match="simulated"):
        build_engines(path, batch_sizes="4", flavor="tensorrt_rtx")
    after = {p.name: p.read_bytes() for p in (path / "engines").iterdir()}
    assert after == before  # old plans and manifest untouched, no temporary files left


def test_build_engines_cli(trt, bundle16, tmp_path):
    from click.testing import CliRunner

    from dyc.tensorrt.cli import build_engines_cmd

    path = copy_bundle(bundle16, tmp_path)
    r = CliRunner().invoke(build_engines_cmd, [str(path), "--batch-sizes", "2,4", "--trt-flavor", "tensorrt_rtx",
                                               "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["options"]["engine_batches"] == [2, 4, 8] and len(m["engines"]) == len(Bundle.load(path).groups)
    r = CliRunner().invoke(build_engines_cmd, [str(path), "--sdt", "gather", "--trt-flavor", "tensorrt_rtx"])
    assert r.exit_code != 0 and "NonZero" in str(r.exception)


@pytest.mark.parametrize("dtype,trt_type", [("fp32", "FLOAT"), ("bf16", "BF16")])
def test_engine_precision_is_the_bundle_dtype(trt, tmp_path, dtype, trt_type):
    """Strongly typed: the plan's IO (and every layer) has the graph's own types, no builder precision flags."""
    path = compile_tiny(tmp_path, dtype, groups=1)
    m = build_engines(path, batch_sizes="2", flavor="tensorrt_rtx")
    (e,) = m["engines"]
    assert m["dtype"] == dtype and m["options"]["strongly_typed"]
    assert {i["name"]: i["dtype"] for i in e["inputs"]} | {"out": e["outputs"][0]["dtype"]} == {
        "x": trt_type, "t": "INT64", "y": "INT64", "out": trt_type,
        **{n: trt_type for n in ("head_mask", "channel_mask") if n in {i["name"] for i in e["inputs"]}}}


def test_plain_dit_bundle_builds(trt, tmp_path):
    """The static baseline every benchmark needs: one group, no SDT, no mask inputs."""
    from conftest import random_model, tiny_config

    from dyc.checkpoint import save_checkpoint
    from dyc.compiler.compile import compile_checkpoint

    save_checkpoint(random_model(tiny_config(dynamic=False)), tmp_path / "dit.safetensors")
    path = compile_checkpoint(tmp_path / "dit.safetensors", tmp_path / "dit.dyc", dtype="fp16", calib=1,
                              calib_steps=2).path
    m = build_engines(path, batch_sizes="2", flavor="tensorrt_rtx")
    assert m["sdt_form"] == "none" and len(m["engines"]) == 1
    (e,) = m["engines"]
    assert [i["name"] for i in e["inputs"]] == ["x", "t", "y"]
    # per block: adaLN, qkv, proj, fc1, fc2 and the two attention products; t-embedder 2; final adaLN + linear
    assert e["layer_types"]["MATRIX_MULTIPLY"] == 2 * (5 + 2) + 2 + 2
    assert "SELECT" not in e["layer_types"] and "NON_ZERO" not in e["layer_types"]


def test_build_refuses_a_non_bundle(tmp_path):
    with pytest.raises(DycError, match="no such bundle"):
        build_engines(tmp_path / "missing.dyc")


def test_dyc_compile_backend_tensorrt_builds_one_plan_per_group(trt, tmp_path):
    """The user's one command: checkpoint -> bundle -> engines, on this CPU machine with TensorRT-RTX."""
    from conftest import random_model, tiny_config

    from dyc.checkpoint import save_checkpoint
    from dyc.cli import main

    ckpt = save_checkpoint(random_model(tiny_config(), seed=1, router_scale=3.0), tmp_path / "m.safetensors")
    out = tmp_path / "m.dyc"
    code = main(["compile", str(ckpt), "--dtype", "fp16", "--groups", "2", "--calib", "1", "--backend", "tensorrt",
                 "--batch-sizes", "1,2", "--trt-flavor", "tensorrt_rtx", "-o", str(out)])
    assert code == 0
    groups = Bundle.load(out).groups
    plans = sorted(p.name for p in (out / "engines").glob("*.plan"))
    assert plans == [f"group{g.index}.plan" for g in groups]
    sidecar = json.loads((out / "engines" / "trt_manifest.json").read_text())
    assert sidecar["flavor"] == "tensorrt_rtx" and len(sidecar["engines"]) == len(groups)
