"""dyc::SdtMlp CUDA kernels against the eager PyTorch op (CUDA only; needs libdyc_plugins.so built)."""

from __future__ import annotations

import pytest
import torch

from dyc.kernels import sdt_mlp as K

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not K.available(), reason="libdyc_plugins.so not built (cmake -S . -B build)"),
]

C_XL, GS_XL = 1152, 288  # DiT-XL: hidden 4608 = 16 channel groups of 288
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def make_inputs(b, n, c, groups, gs, dtype, keep_rate=0.5, seed=0, channel_mask=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hs = groups * gs

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32) * std

    x = rnd(b, n, c) + 0.5
    shift, scale, gate = rnd(b, c, std=0.5), rnd(b, c, std=0.5), rnd(b, c, std=0.5)
    keep = (torch.rand(b, n, generator=g, device="cuda") < keep_rate).float()
    fc1_w, fc1_b = rnd(hs, c, std=c**-0.5), rnd(hs, std=0.1)
    fc2_w, fc2_b = rnd(c, hs, std=hs**-0.5), rnd(c, std=0.1)
    cm = None
    if channel_mask:
        cm = (torch.rand(b, groups, generator=g, device="cuda") < 0.7).float()
        cm[:, 0] = 1.0  # group 0 is always on in DyDiT
    ts = [x, shift, scale, gate, keep, fc1_w, fc1_b, fc2_w, fc2_b]
    ts = [t.to(dtype) for t in ts]
    return ts, (cm.to(dtype) if cm is not None else None), gs


def check(ts, cm, gs, dtype, force_generic=False, out=None):
    """Kernel vs the eager reference evaluated in fp32 on the same (rounded) inputs."""
    x0 = ts[0].clone()  # out may alias x
    y = K.sdt_mlp(*ts, channel_mask=cm, group_size=gs, force_generic=force_generic, out=out)
    torch.cuda.synchronize()
    ins = [x0] + list(ts[1:])
    ref = K.sdt_mlp_reference(*[t.float() for t in ins], channel_mask=None if cm is None else cm.float(),
                              group_size=gs)
    dropped = ts[4] <= 0.5
    assert torch.equal(y[dropped], x0[dropped]), "rows that are not kept must be exactly x"
    kept = ~dropped
    if kept.any():
        err = (y.float() - ref)[kept].norm()
        scale = (ref - x0.float())[kept].norm().clamp_min(1e-30)  # the MLP's contribution
        rel = (err / scale).item()
        assert rel < TOL[dtype], f"relative error {rel:.3g} >= {TOL[dtype]}"
    assert torch.isfinite(y).all()
    return y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("groups", [1, 5, 16])
@pytest.mark.parametrize("masked", [True, False])  # channel-mask GEMM1 and the plain one
def test_xl_shapes(dtype, groups, masked):
    ts, cm, gs = make_inputs(32, 256, C_XL, groups, GS_XL, dtype, keep_rate=0.5, seed=groups, channel_mask=masked)
    check(ts, cm, gs, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hopper_path_selected_and_generic_agrees(dtype):
    major, minor = torch.cuda.get_device_capability()
    path = K.select_path(dtype, C_XL, 16 * GS_XL, GS_XL, torch.cuda.current_device())
    if (major, minor) == (9, 0):
        assert path == "sm90_cutlass", "Hopper should take the CUTLASS path at DiT-XL sizes"
    ts, cm, gs = make_inputs(8, 256, C_XL, 16, GS_XL, dtype, seed=3)
    fast = check(ts, cm, gs, dtype)
    slow = check(ts, cm, gs, dtype, force_generic=True)
    rel = ((fast.float() - slow.float()).norm() / (slow.float() - ts[0].float()).norm()).item()
    assert rel < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("groups", [1, 5, 16])
@pytest.mark.parametrize("force_generic", [False, True])
def test_shared_channel_mask(dtype, groups, force_generic):
    """A [1, G] mask applies to every image (Hopper: one plain GEMM1 with a per-column mask)."""
    ts, cm, gs = make_inputs(32, 256, C_XL, groups, GS_XL, dtype, keep_rate=0.5, seed=20 + groups)
    shared = cm[:1].clone()
    if groups > 1:
        shared[0, 1] = 0  # at least one group off
    check(ts, shared, gs, dtype, force_generic=force_generic)
    # the same as the per-image form with the row repeated
    y_shared = K.sdt_mlp(*ts, channel_mask=shared, group_size=gs, force_generic=force_generic)
    y_rows = K.sdt_mlp(*ts, channel_mask=shared.expand(32, -1).contiguous(), group_size=gs,
                       force_generic=force_generic)
    rel = ((y_shared.float() - y_rows.float()).norm() / (y_rows.float() - ts[0].float()).norm()).item()
    assert rel < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", ["none", "all", "one", "batch1", "no_channel_mask", "all_groups_off_but_0"])
def test_edge_cases(dtype, case):
    b, n, rate, use_cm = 4, 256, 0.5, True
    if case == "batch1":
        b = 1
    if case == "no_channel_mask":
        use_cm = False
    ts, cm, gs = make_inputs(b, n, C_XL, 4, GS_XL, dtype, keep_rate=rate, seed=7, channel_mask=use_cm)
    keep = ts[4]
    if case == "none":
        keep.zero_()
    elif case == "all":
        keep.fill_(1)
    elif case == "one":
        keep.zero_()
        keep[b - 1, n // 3] = 1
    elif case == "all_groups_off_but_0":
        cm.zero_()
        cm[:, 0] = 1
    y = check(ts, cm, gs, dtype)
    if case == "none":
        assert torch.equal(y, ts[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_sizes_generic(dtype):
    # C and group_size not multiples of 8: the portable path (no TMA), scalar loads
    ts, cm, gs = make_inputs(3, 37, 100, 3, 30, dtype, keep_rate=0.6, seed=11)
    check(ts, cm, gs, dtype)


def test_in_place():
    ts, cm, gs = make_inputs(4, 256, C_XL, 2, GS_XL, torch.bfloat16, seed=5)
    x = ts[0]
    y = check(ts, cm, gs, torch.bfloat16, out=x)
    assert y.data_ptr() == x.data_ptr()


def test_cuda_graph_capture_follows_device_side_count():
    dtype = torch.bfloat16
    ts, cm, gs = make_inputs(8, 256, C_XL, 16, GS_XL, dtype, keep_rate=0.5, seed=13)
    y = torch.empty_like(ts[0])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside capture (CUDA state, attribute setting)
        K.sdt_mlp(*ts, channel_mask=cm, group_size=gs, out=y)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        K.sdt_mlp(*ts, channel_mask=cm, group_size=gs, out=y)
    for rate in (0.5, 0.1, 1.0, 0.0):  # new token masks, same graph: the count is read on the device
        ts[4].copy_((torch.rand_like(ts[4].float()) < rate).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        ref = K.sdt_mlp_reference(*[t.float() for t in ts], channel_mask=cm.float(), group_size=gs)
        dropped = ts[4] <= 0.5
        assert torch.equal(y[dropped], ts[0][dropped])
        if (~dropped).any():
            d = (y.float() - ref)[~dropped].norm() / (ref - ts[0].float())[~dropped].norm()
            assert d.item() < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", ["none", "shared"])
def test_cuda_graph_across_the_few_rows_thresholds(dtype, mask):
    """One captured call at 32 x 256 tokens; kept counts below, at and above the Hopper GEMMs'
    few-rows threshold (GEMM2 2048: two kernels, one exits; GEMM1 one kernel for every count) replay correctly."""
    ts, _, gs = make_inputs(32, 256, C_XL, 16, GS_XL, dtype, keep_rate=0.5, seed=31, channel_mask=False)
    cm = None
    if mask == "shared":
        cm = torch.ones(1, 16, device="cuda", dtype=dtype)
        cm[0, 5:9] = 0
    y = torch.empty_like(ts[0])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        K.sdt_mlp(*ts, channel_mask=cm, group_size=gs, out=y)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        K.sdt_mlp(*ts, channel_mask=cm, group_size=gs, out=y)
    g = torch.Generator(device="cuda").manual_seed(3)
    rows = 32 * 256
    for kept in (0, 1, 100, 2047, 2048, 2049, 3072, 5000, 6144, 6145, rows):
        flat = torch.zeros(rows, device="cuda")
        flat[torch.randperm(rows, generator=g, device="cuda")[:kept]] = 1
        ts[4].copy_(flat.view(32, 256).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        ref = K.sdt_mlp_reference(*[t.float() for t in ts], channel_mask=None if cm is None else cm.float(),
                                  group_size=gs)
        dropped = ts[4] <= 0.5
        assert torch.equal(y[dropped], ts[0][dropped]), kept
        if kept:
            d = (y.float() - ref)[~dropped].norm() / (ref - ts[0].float())[~dropped].norm()
            assert d.item() < TOL[dtype], (kept, d.item())


def test_bad_arguments_raise():
    ts, cm, gs = make_inputs(2, 16, 64, 2, 32, torch.float32, seed=1)
    with pytest.raises(ValueError):
        K.sdt_mlp(*ts, channel_mask=cm, group_size=48)  # hidden 64 is not a multiple of 48
    with pytest.raises(ValueError):
        K.sdt_mlp(ts[0][:, :, :32], *ts[1:], channel_mask=cm, group_size=gs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fc2_column_slice_read_in_place(dtype):
    """fc2_w as a column slice of a wider matrix (shared weights): read through its row stride."""
    ts, cm, gs = make_inputs(8, 256, C_XL, 4, GS_XL, dtype, seed=9)
    wide = torch.randn(C_XL, 7 * GS_XL, device="cuda").to(dtype) * (4 * GS_XL) ** -0.5
    wide[:, : 4 * GS_XL] = ts[7]
    ts[7] = wide[:, : 4 * GS_XL]
    assert not ts[7].is_contiguous()
    check(ts, cm, gs, dtype)
