"""Host-side checks of the plugins (no GPU needed): the reference op against the eager DyDiT
modules, the CMake build of libdyc_plugins.so and its C ABI through ctypes.

The build takes 10-25 minutes on two cores (nvcc + CUTLASS for four architectures), so the tests that
need it are marked ``plugins_build``: the default suite leaves them out and CI runs them in their own
step (``scripts/test_plugins.sh``)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dyc.kernels import sdt_mlp as K
from dyc.model import Mlp, modulate

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "plugins" / "include" / "dyc_sdt_mlp.h"


def _inputs(b=3, n=10, c=32, groups=4, gs=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hs = groups * gs
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    keep = (torch.rand(b, n, generator=g) < 0.5).to(dtype)
    cm = (torch.rand(b, groups, generator=g) < 0.6).to(dtype)
    cm[:, 0] = 1
    return [r(b, n, c), r(b, c), r(b, c), r(b, c), keep, r(hs, c), r(hs), r(c, hs), r(c)], cm, gs


@pytest.mark.parametrize("with_mask", [True, False])
def test_reference_matches_eager_dydit_block_mlp(with_mask):
    """sdt_mlp_reference == DiTBlock's MLP path (norm2, modulate, Mlp with channel groups, gate, token mask)."""
    (x, shift, scale, gate, keep, w1, b1, w2, b2), cm, gs = _inputs()
    c, hs = x.shape[-1], w1.shape[0]
    mlp = Mlp(c, hs, hs // gs).double()
    with torch.no_grad():
        mlp.fc1.weight.copy_(w1)
        mlp.fc1.bias.copy_(b1)
        mlp.fc2.weight.copy_(w2)
        mlp.fc2.bias.copy_(b2)
    norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
    mask = cm if with_mask else None
    with torch.no_grad():  # DiTBlock.forward, second half
        y = gate.unsqueeze(1) * mlp(modulate(norm2(x), shift, scale), mask)
        want = x + y * keep.unsqueeze(-1)
        got = K.sdt_mlp_reference(x, shift, scale, gate, keep, w1, b1, w2, b2, channel_mask=mask, group_size=gs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[keep == 0], x[keep == 0])


def test_reference_bf16_and_default_group_size():
    (x, shift, scale, gate, keep, w1, b1, w2, b2), cm, gs = _inputs(dtype=torch.float32)
    full = K.sdt_mlp_reference(x, shift, scale, gate, keep, w1, b1, w2, b2, channel_mask=cm)  # gs from the mask
    explicit = K.sdt_mlp_reference(x, shift, scale, gate, keep, w1, b1, w2, b2, channel_mask=cm, group_size=gs)
    torch.testing.assert_close(full, explicit)
    low = K.sdt_mlp_reference(*[t.bfloat16() for t in (x, shift, scale, gate, keep, w1, b1, w2, b2)],
                              channel_mask=cm.bfloat16(), group_size=gs)
    assert low.dtype == torch.bfloat16
    assert ((low.float() - full) / full.abs().max()).abs().max() < 5e-2


def test_kernel_entry_rejects_cpu_tensors():
    ts, cm, gs = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="CUDA"):
        K.sdt_mlp(*ts, channel_mask=cm, group_size=gs)


def test_header_is_plain_c():
    cc = shutil.which("cc") or shutil.which("gcc")
    nvcc = shutil.which("nvcc")
    if not cc or not nvcc:
        pytest.skip("needs a C compiler and the CUDA toolkit headers")
    cands = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include",
             Path(nvcc).resolve().parents[1] / "include", *sorted(Path("/usr/local").glob("cuda*/include"))]
    cuda_inc = next((d for d in cands if (d / "cuda_runtime_api.h").exists()), None)
    if cuda_inc is None:
        pytest.skip("cuda_runtime_api.h not found")
    r = subprocess.run([cc, "-std=c99", "-Wall", "-Werror", "-fsyntax-only", f"-I{cuda_inc}", "-x", "c", str(HEADER)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------------------------------
# The CMake build. DYC_PLUGIN_BUILD_DIR reuses a finished build; otherwise this builds into a temp dir
# (the Hopper CUTLASS unit takes a few minutes on 2 cores).

@pytest.fixture(scope="module")
def built_lib(tmp_path_factory) -> Path:
    pre = os.environ.get("DYC_PLUGIN_BUILD_DIR")
    if pre:
        lib = Path(pre) / "lib" / "libdyc_plugins.so"
        assert lib.is_file(), f"DYC_PLUGIN_BUILD_DIR={pre} holds no lib/libdyc_plugins.so"
        return lib
    if not shutil.which("cmake") or not shutil.which("nvcc"):
        pytest.skip("needs cmake and nvcc to build the plugins")
    build = tmp_path_factory.mktemp("dyc_build")
    cfg = ["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}"]
    if os.environ.get("DYC_TEST_CUDA_ARCHS"):
        cfg.append(f"-DDYC_CUDA_ARCHS={os.environ['DYC_TEST_CUDA_ARCHS']}")
    r = subprocess.run(cfg, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["cmake", "--build", str(build), f"-j{os.cpu_count() or 2}"], capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    lib = build / "lib" / "libdyc_plugins.so"
    assert lib.is_file()
    return lib


@pytest.fixture(scope="module")
def abi(built_lib):
    lib = ctypes.CDLL(str(built_lib))
    i64, u32, vp = ctypes.c_int64, ctypes.c_uint32, ctypes.c_void_p
    lib.dyc_sdt_mlp_version.restype = ctypes.c_char_p
    lib.dyc_sdt_mlp_status_string.restype = ctypes.c_char_p
    lib.dyc_sdt_mlp_workspace_size.restype = ctypes.c_size_t
    lib.dyc_sdt_mlp_workspace_size.argtypes = [ctypes.c_int, i64, i64, i64, i64, i64]
    lib.dyc_sdt_mlp_select_path.argtypes = [ctypes.c_int, i64, i64, i64, ctypes.c_int, u32]
    lib.dyc_sdt_mlp_forward.argtypes = [ctypes.c_int] + [vp] * 11 + [i64] * 6 + [ctypes.c_float, vp, ctypes.c_size_t,
                                                                               u32, vp]
    return lib


@pytest.mark.plugins_build
def test_abi_exports_only_the_c_api(built_lib):
    nm = shutil.which("nm")
    if not nm:
        pytest.skip("nm not found")
    out = subprocess.run([nm, "-D", "--defined-only", str(built_lib)], capture_output=True, text=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if " T " in line}
    want = {"dyc_sdt_mlp_version", "dyc_sdt_mlp_status_string", "dyc_sdt_mlp_workspace_size",
            "dyc_sdt_mlp_select_path", "dyc_sdt_mlp_forward"}
    assert want <= exported
    assert not {s for s in exported if s.startswith("_ZN3dyc")}, "C++ internals must stay hidden"


@pytest.mark.plugins_build
def test_abi_version_and_workspace(abi):
    assert abi.dyc_sdt_mlp_version().decode().startswith("0.1.0+abi2")
    assert abi.dyc_sdt_mlp_status_string(0) == b"ok"
    # idx, pos (int32 per row), count, fp32 group mask, fp32 column mask, then A [rows, C], H [rows, Hs],
    # D [rows, C] in T
    rows, c, hs, groups = 32 * 256, 1152, 4608, 16
    size = abi.dyc_sdt_mlp_workspace_size(2, 32, 256, c, hs, 288)
    payload = 2 * 4 * rows + 4 * groups * rows + 4 * hs + 2 * (2 * rows * c + rows * hs)
    assert payload <= size <= payload + 8 * 256
    assert abi.dyc_sdt_mlp_workspace_size(0, 32, 256, c, hs, 288) > size  # fp32 intermediates
    assert abi.dyc_sdt_mlp_workspace_size(2, 32, 256, c, hs, 500) == 0  # hidden % group_size != 0
    assert abi.dyc_sdt_mlp_workspace_size(7, 32, 256, c, hs, 288) == 0  # unknown dtype


@pytest.mark.plugins_build
def test_abi_validates_before_touching_the_gpu(abi):
    p = ctypes.c_void_p(256)  # never dereferenced: validation fails first
    args = [p] * 9  # x .. fc2_b
    # bad dtype, bad group size -> invalid argument
    assert abi.dyc_sdt_mlp_forward(9, *args, None, p, 2, 4, 8, 16, 8, 0, 1e-6, p, 1 << 20, 0, None) == 1
    assert abi.dyc_sdt_mlp_forward(2, *args, None, p, 2, 4, 8, 16, 5, 0, 1e-6, p, 1 << 20, 0, None) == 1
    # fc2_w row stride below hidden -> invalid argument
    assert abi.dyc_sdt_mlp_forward(2, *args, None, p, 2, 4, 8, 16, 8, 15, 1e-6, p, 1 << 20, 0, None) == 1
    # missing input -> invalid argument; missing / small workspace -> workspace status
    assert abi.dyc_sdt_mlp_forward(2, None, *args[1:], None, p, 2, 4, 8, 16, 8, 0, 1e-6, p, 1 << 20, 0, None) == 1
    assert abi.dyc_sdt_mlp_forward(2, *args, None, p, 2, 4, 8, 16, 8, 0, 1e-6, None, 0, 0, None) == 2
    assert abi.dyc_sdt_mlp_forward(2, *args, None, p, 2, 4, 8, 16, 8, 0, 1e-6, p, 16, 0, None) == 2
    # an empty batch is a no-op
    assert abi.dyc_sdt_mlp_forward(2, *args, None, p, 0, 4, 8, 16, 8, 0, 1e-6, None, 0, 0, None) == 0
    if not torch.cuda.is_available():  # no device: the portable path is what would be chosen
        assert abi.dyc_sdt_mlp_select_path(2, 1152, 4608, 288, 0, 0) == 0
    assert abi.dyc_sdt_mlp_select_path(2, 1152, 4608, 288, 0, 1) == 0  # FORCE_GENERIC


def _ops_lib(built_lib: Path) -> Path:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    ops_lib = built_lib.parent / "libdyc_ort_ops.so"
    if not ops_lib.is_file():
        pytest.skip("libdyc_ort_ops.so not built (no ONNX Runtime headers: plugins/scripts/fetch_ort_headers.sh)")
    return ops_lib


def _one_op_session(ops_lib: Path, op: str, shapes: dict, out_shape, **attrs):
    """An ONNX Runtime CPU session of one float node ``dyc::op`` (inputs named and shaped by ``shapes``)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node(op, list(shapes), ["out"], domain="dyc", **attrs)
    ins = [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in shapes.items()]
    graph = helper.make_graph([node], op, ins, [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("dyc", 1)])
    model.ir_version = 8  # onnx's newest IR can be ahead of onnxruntime's
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(ops_lib))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.plugins_build
def test_onnxruntime_custom_op_cpu_kernel(built_lib):
    """dyc::SdtMlp through ONNX Runtime's CPU EP (the op library's float kernel) == the reference."""
    ops_lib = _ops_lib(built_lib)

    ts, cm, gs = _inputs(b=2, n=7, c=24, groups=3, gs=8, seed=4, dtype=torch.float32)
    names = ["x", "shift", "scale", "gate", "keep", "fc1_w", "fc1_b", "fc2_w", "fc2_b", "channel_mask"]
    feeds = {n: t.numpy() for n, t in zip(names, [*ts, cm], strict=True)}
    for with_mask in (True, False):
        ins = names if with_mask else names[:9]
        sess = _one_op_session(ops_lib, "SdtMlp", {n: list(feeds[n].shape) for n in ins}, list(feeds["x"].shape),
                               group_size=gs, eps=1e-6)
        (y,) = sess.run(None, {n: feeds[n] for n in ins})
        want = K.sdt_mlp_reference(*ts, channel_mask=cm if with_mask else None, group_size=gs)
        torch.testing.assert_close(torch.from_numpy(y), want, rtol=1e-4, atol=1e-4)


@pytest.mark.plugins_build
def test_top_level_ctest_runs_the_engine_unit_tests(built_lib):
    """The plugin build is the top-level CMake project: `ctest --test-dir BUILD` runs engines/' tests there."""
    build = built_lib.parent.parent
    if not (build / "engines" / "tests").is_dir():
        pytest.skip("engines/ has no tests in this build (nlohmann-json or ONNX Runtime absent: docs/cpp.md)")
    r = subprocess.run(["ctest", "--test-dir", str(build), "-R", "^dyc_unit$", "--output-on-failure"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "100% tests passed" in r.stdout and "dyc_unit" in r.stdout, r.stdout + r.stderr


@pytest.mark.plugins_build
def test_onnxruntime_custom_op_shared_channel_mask(built_lib):
    """shared_channel_mask=1 reads row 0 of channel_mask for every image (the contract of the CUDA flag)."""
    ops_lib = _ops_lib(built_lib)

    ts, cm, gs = _inputs(b=3, n=6, c=24, groups=3, gs=8, seed=9, dtype=torch.float32)
    cm[1:] = 1 - cm[0]  # other rows differ from row 0: only row 0 may be read
    cm[:, 0] = 1
    names = ["x", "shift", "scale", "gate", "keep", "fc1_w", "fc1_b", "fc2_w", "fc2_b", "channel_mask"]
    feeds = {n: t.numpy() for n, t in zip(names, [*ts, cm], strict=True)}
    sess = _one_op_session(ops_lib, "SdtMlp", {n: list(feeds[n].shape) for n in names}, list(feeds["x"].shape),
                           group_size=gs, eps=1e-6, shared_channel_mask=1)
    (y,) = sess.run(None, feeds)
    want = K.sdt_mlp_reference(*ts, channel_mask=cm[:1].expand_as(cm), group_size=gs)
    torch.testing.assert_close(torch.from_numpy(y), want, rtol=1e-4, atol=1e-4)


@pytest.mark.plugins_build
def test_onnxruntime_glue_ops_cpu_kernels(built_lib):
    """dyc::LnModulate (also with the ones column), dyc::GatedResidual (with and without bias) and
    dyc::TokenKeep on the CPU EP == torch's maths."""
    ops_lib = _ops_lib(built_lib)

    g = torch.Generator().manual_seed(3)
    b, n, c = 3, 5, 40
    x, y = torch.randn(b, n, c, generator=g) * 3 + 1, torch.randn(b, n, c, generator=g)
    shift, scale, gate, bias = (torch.randn(b, c, generator=g), torch.randn(b, c, generator=g),
                                torch.randn(b, c, generator=g), torch.randn(c, generator=g))
    cases = [
        ("LnModulate", {"x": x, "shift": shift, "scale": scale}, {"eps": 1e-6},
         torch.nn.functional.layer_norm(x, (c,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]),
        ("GatedResidual", {"x": x, "gate": gate, "y": y, "bias": bias}, {}, x + gate[:, None] * (y + bias)),
        ("GatedResidual", {"x": x, "gate": gate, "y": y}, {}, x + gate[:, None] * y),
    ]
    # ones_column=8: the row, a one, zeros up to a multiple of 8 (40 -> 48 wide)
    ln = cases[0][3]
    cases.append(("LnModulate", cases[0][1], {"eps": 1e-6, "ones_column": 8},
                  torch.cat([ln, torch.ones(b, n, 1), torch.zeros(b, n, 7)], dim=2)))
    for op, feeds, attrs, want in cases:
        sess = _one_op_session(ops_lib, op, {k: list(v.shape) for k, v in feeds.items()}, list(want.shape), **attrs)
        (out,) = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
        torch.testing.assert_close(torch.from_numpy(out), want, rtol=1e-5, atol=1e-5)
    # TokenKeep: the router's head after its bias-free GEMM; keep where sigmoid(logit) > 0.5
    h, b1, w2, b2 = torch.randn(b, n, 8, generator=g), torch.randn(8, generator=g), torch.randn(1, 8, generator=g), \
        torch.randn(1, generator=g)
    z = torch.relu(h + b1) @ w2[0] + b2
    assert (z.abs() > 1e-3).all()  # no token at the threshold: rounding cannot flip one
    feeds = {"h": h, "b1": b1, "w2": w2, "b2": b2}
    sess = _one_op_session(ops_lib, "TokenKeep", {k: list(v.shape) for k, v in feeds.items()}, [b, n])
    (keep,) = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
    assert 0 < keep.sum() < b * n
    torch.testing.assert_close(torch.from_numpy(keep), (torch.sigmoid(z) > 0.5).float(), rtol=0, atol=0)
    sess = _one_op_session(ops_lib, "GatedResidual", dict.fromkeys(("x", "gate", "y")), None)
    with pytest.raises(Exception, match="GatedResidual: input 1 must be \\[B, C\\]"):
        sess.run(None, {"x": x.numpy(), "gate": gate[:, :5].contiguous().numpy(), "y": y.numpy()})


@pytest.mark.plugins_build
def test_op_library_abi_is_checked_against_the_graphs(built_lib, tmp_path, monkeypatch):
    """The built library says ABI 2 (TokenKeep, ones_column), a library without the symbol counts as 1,
    and a backend over cuda graphs that need 2 refuses an ABI-1 library with a clear error instead of
    failing at run time (or, for ones_column, computing on a narrower tensor)."""
    import ctypes.util

    from conftest import random_model, tiny_config

    import dyc.backends.onnxruntime as ortb
    from dyc.bundle import Bundle
    from dyc.checkpoint import save_checkpoint
    from dyc.compiler.compile import compile_checkpoint
    from dyc.compiler.export_cuda import required_ops_abi
    from dyc.errors import DycError

    ops_lib = _ops_lib(built_lib)
    assert ortb.ops_library_abi(ops_lib) == 2
    assert ortb.ops_library_abi(ctypes.util.find_library("m") or "libm.so.6") == 1  # no dyc_ort_ops_abi symbol
    with pytest.raises(DycError, match="cannot load the custom-op library"):
        ortb.ops_library_abi(tmp_path / "missing.so")
    ck = save_checkpoint(random_model(tiny_config(), seed=1), tmp_path / "m.safetensors")
    b = Bundle.load(compile_checkpoint(ck, tmp_path / "m.dyc", groups=2, calib=1, calib_steps=2).path)
    assert {required_ops_abi(b.graph_bytes(g, "cuda")) for g in b.groups} == {2}
    assert {required_ops_abi(b.graph_bytes(g, "std")) for g in b.groups} == {1}
    ortb.OnnxRuntimeBackend(b, variant="cuda", custom_ops=ops_lib)  # the built library loads them
    monkeypatch.setattr(ortb, "ops_library_abi", lambda lib: 1)
    with pytest.raises(DycError, match=r"older than m\.dyc's cuda graphs \(op library ABI 1, the graphs need 2"):
        ortb.OnnxRuntimeBackend(b, variant="cuda", custom_ops=ops_lib)


@pytest.mark.plugins_build
@pytest.mark.parametrize("dynamic", [True, False])
def test_cuda_graphs_run_on_the_cpu(built_lib, tmp_path, dynamic):
    """The bundle's cuda graphs (dyc::SdtMlp with a shared mask, dyc::LnModulate, dyc::GatedResidual,
    MultiHeadAttention with qkv's bias; the plain DiT's FastGelu with fc1's) through the onnxruntime
    backend on the CPU, fp32, every group against the eager model: the maths the CUDA EP runs."""
    pytest.importorskip("onnxruntime")
    ops_lib = built_lib.parent / "libdyc_ort_ops.so"
    if not ops_lib.is_file():
        pytest.skip("libdyc_ort_ops.so not built (no ONNX Runtime headers: plugins/scripts/fetch_ort_headers.sh)")
    from conftest import random_model, tiny_config
    from runtime_fixtures import tame_config, tame_model

    from dyc.backends.onnxruntime import OnnxRuntimeBackend
    from dyc.bundle import Bundle
    from dyc.checkpoint import save_checkpoint
    from dyc.compiler.compile import compile_checkpoint
    from dyc.compiler.verify import verify_bundle

    # the tame DyDiT: bounded outputs, fp32 rounding stays at fp32 level; a plain DiT has no routers
    model = tame_model(tame_config(), seed=1) if dynamic else random_model(tiny_config(dynamic=False), seed=1)
    ck = save_checkpoint(model, tmp_path / "m.safetensors")
    b = Bundle.load(compile_checkpoint(ck, tmp_path / "m.dyc", groups=3, calib=1, calib_steps=2).path)
    assert any(g.needs_channel_mask for g in b.groups) or not dynamic  # the shared-mask path is exercised
    be = OnnxRuntimeBackend(b, variant="cuda", custom_ops=ops_lib)
    assert not be.mixed_timesteps  # row 0's masks serve the call: dyc serve batches it by timestep
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 4, 10])
    for g in b.groups:
        for t in (g.t_lo, g.t_hi):
            feeds = {"x": x, "t": torch.full((3,), t), "y": y}
            feeds.update({k: torch.from_numpy(v) for k, v in b.mask_inputs(t, 3).items()})
            out = be.run_group(g.index, feeds)
            with torch.no_grad():
                ref = (model(x, torch.full((3,), t), y, threshold_offset=b.threshold_offset) if dynamic
                       else model(x, torch.full((3,), t), y))
            # the plain random DiT amplifies ORT's CPU FastGelu polynomial tanh (~1e-6)
            assert ((out - ref).abs().max() / ref.abs().max()).item() < (1e-4 if dynamic else 5e-4), (g.index, t)
    os.environ["DYC_ORT_OPS_LIB"] = str(ops_lib)
    try:
        assert verify_bundle(b, variant="cuda").ok  # dyc verify --variant cuda on the CPU
    finally:
        del os.environ["DYC_ORT_OPS_LIB"]
