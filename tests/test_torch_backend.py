"""The sliced torch modules (torch backend) against the eager masked model, on CPU."""

import itertools
import os

import numpy as np
import pytest
import torch
from conftest import random_model, tiny_config

from dyc.backends.torch_sliced import GroupLayout, SharedWeights, SlicedDiT


def _layout_for(hm: np.ndarray, cm: np.ndarray) -> tuple[GroupLayout, np.ndarray, np.ndarray]:
    """Union layout of several timesteps' masks [T, L, H], plus each t's slot masks."""
    heads = [sorted(set(np.nonzero(hm[:, l].any(0))[0].tolist())) for l in range(hm.shape[1])]
    chans = [sorted(set(np.nonzero(cm[:, l].any(0))[0].tolist())) for l in range(cm.shape[1])]
    vary_h = [bool((hm[:, l] != hm[:1, l]).any()) for l in range(hm.shape[1])]
    vary_c = [bool((cm[:, l] != cm[:1, l]).any()) for l in range(cm.shape[1])]
    slots_h = max(map(len, heads))
    slots_c = max(map(len, chans))
    hslot = np.zeros((hm.shape[0], hm.shape[1], slots_h), np.float32)
    cslot = np.zeros((cm.shape[0], cm.shape[1], slots_c), np.float32)
    for l in range(hm.shape[1]):
        hslot[:, l, : len(heads[l])] = hm[:, l, heads[l]]
        cslot[:, l, : len(chans[l])] = cm[:, l, chans[l]]
    return GroupLayout(heads, chans, vary_h, vary_c), hslot, cslot


@pytest.mark.parametrize("mlp_mode", ["dense", "sdt", "dense-fold"])
@pytest.mark.parametrize("dynamic", [True, False])
def test_sliced_union_matches_eager_at_every_member_t(dynamic, mlp_mode):
    cfg = tiny_config(depth=3, dynamic=dynamic)
    model = random_model(cfg, seed=5, router_scale=3.0)
    ts = torch.tensor([100, 400, 700])
    hm, cm = (m.numpy() > 0.5 for m in model.tdw_masks(ts))
    layout, hslot, cslot = _layout_for(hm, cm)
    if dynamic:  # a union narrower than the full model, with per-t masks where members differ
        assert sum(map(len, layout.heads)) < cfg.depth * cfg.num_heads and any(layout.vary_head)
    sliced = SlicedDiT(cfg, model.state_dict(), layout)
    x = torch.randn(3, 4, 8, 8)
    y = torch.tensor([1, 2, 10])
    with torch.no_grad():
        want = model(x, ts, y)
        got = sliced(x, ts, y, head_mask=torch.from_numpy(hslot), channel_mask=torch.from_numpy(cslot),
                     mlp_mode=mlp_mode)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the sliced weights really are narrower: no zero head is materialised
    qkv = sum(layer["qkv_w"].shape[0] for layer in sliced.layers)
    assert qkv == 3 * cfg.head_dim * sum(map(len, layout.heads))


def test_groups_share_one_copy_of_weights():
    """Nested groups take views of one store; a layer that is not a prefix gets a copy; outputs stay exact."""
    cfg = tiny_config(depth=2)
    model = random_model(cfg, seed=6, router_scale=3.0)
    H = cfg.num_heads
    full = GroupLayout([list(range(H))] * 2, [list(range(H))] * 2, [False] * 2, [False] * 2)
    narrow = GroupLayout([[0, 2], [0]], [[0, 2, 3], [0, 1]], [True, False], [False, True])
    # layer 0 heads {3}: not a prefix of the use order (0, 2, 3, 1) -> a copy; layer 1 lists its
    # heads out of storage order, so its mask slots are picked by index
    odd = GroupLayout([[3], [1, 0]], [[0], [0, 1]], [False, True], [False, False])
    sd = {k: v.double() for k, v in model.state_dict().items()}  # compare layouts, not float32 rounding
    shared = SharedWeights(cfg, sd, [full, narrow, odd], dtype=torch.float64)
    assert shared.head_order[0] == [0, 2, 3, 1]
    mods = [SlicedDiT(cfg, None, lay, dtype=torch.float64, shared=shared) for lay in (full, narrow, odd)]
    stored = {v.untyped_storage().data_ptr() for v in shared.tensors()}
    for layer in mods[0].layers + mods[1].layers:  # views of the one store
        assert all(v.untyped_storage().data_ptr() in stored for v in layer.values())
    assert len(shared.copies) == 3  # odd, layer 0: qkv weight, qkv bias, proj weight
    x, t, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([5, 5]), torch.tensor([1, 2])
    hm = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]] * 2)
    cm = torch.tensor([[[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]] * 2)
    for lay, mod in zip((full, narrow, odd), mods, strict=True):
        own = SlicedDiT(cfg, sd, lay, dtype=torch.float64)  # a private store: plain slicing in the layout's own order
        with torch.no_grad():
            got = mod(x, t, y, head_mask=hm, channel_mask=cm)
            torch.testing.assert_close(got, own(x, t, y, head_mask=hm, channel_mask=cm), rtol=1e-10, atol=1e-10)
    # odd with layer 1's slot for head 1 off equals a layout with only head 0 there
    only0 = GroupLayout([[3], [0]], [[0], [0, 1]], [False, False], [False, False])
    with torch.no_grad():
        want = SlicedDiT(cfg, sd, only0, dtype=torch.float64)(x, t, y)
        torch.testing.assert_close(mods[2](x, t, y, head_mask=hm), want, rtol=1e-10, atol=1e-10)


def test_torch_backend_pipeline_matches_eager_on_a_bundle(tmp_path):
    """`dyc.Pipeline.load(bundle, backend="torch")`: the bundle's groups, switched per step, = eager loop."""
    from runtime_fixtures import CLASSES, compile_tame

    import dyc

    c = compile_tame(tmp_path)
    outs = {}
    for backend in ("torch", "eager"):
        pipe = dyc.Pipeline.load(c["bundle"], backend=backend)
        res = pipe(CLASSES, sampler="ddim", steps=10, cfg=4.0, noise=c["noise"])
        outs[backend] = res
    torch.testing.assert_close(outs["torch"].latents, outs["eager"].latents, rtol=1e-4, atol=1e-4)
    groups = {s.group for s in outs["torch"].trace}
    assert len(groups) > 1  # the engines switched during the run
    # steps are timed without waiting for each (CUDA events on the GPU): every step has its time
    ms = [s.ms for s in outs["torch"].trace]
    assert len(ms) == 10 and min(ms) > 0 and sum(ms) <= outs["torch"].total_ms * 1.001  # two clocks


def _three_t_union():
    """A tiny DyDiT, the union engine (shared_masks) of t = 100, 400, 700, and each t's masks / slot masks."""
    cfg = tiny_config(depth=3)
    model = random_model(cfg, seed=5, router_scale=3.0)
    ts = torch.tensor([100, 400, 700])
    hm, cm = (m.numpy() > 0.5 for m in model.tdw_masks(ts))
    layout, hslot, cslot = _layout_for(hm, cm)
    assert any(layout.vary_channel) and any(layout.vary_head)
    return model, ts, hm, cm, hslot, cslot, SlicedDiT(cfg, model.state_dict(), layout, shared_masks=True)


def test_shared_masks_use_row_zero_and_match_eager_at_one_t():
    """shared_masks (one t per call, the runtime's case) reads row 0's head and channel masks for every row."""
    model, ts, hm, cm, hslot, cslot, shared = _three_t_union()
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 10])
    for (i, t), mode in itertools.product(enumerate(ts.tolist()), ("dense", "sdt")):
        rows_t = torch.full((3,), t)
        hs = torch.from_numpy(np.repeat(hslot[i : i + 1], 3, axis=0))
        cs = torch.from_numpy(np.repeat(cslot[i : i + 1], 3, axis=0))
        cs_other, hs_other = cs.clone(), hs.clone()
        cs_other[1:] = 1 - cs_other[1:]  # rows past 0 are ignored
        hs_other[1:] = 1 - hs_other[1:]
        with torch.no_grad():
            want = model(x, rows_t, y)
            torch.testing.assert_close(shared(x, rows_t, y, head_mask=hs, channel_mask=cs, mlp_mode=mode), want,
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(shared(x, rows_t, y, head_mask=hs_other, channel_mask=cs_other, mlp_mode=mode),
                                       want, rtol=1e-5, atol=1e-5)


def test_mask_free_call_at_a_full_width_t_matches_eager():
    """A t that switches on the group's whole union runs without mask inputs (Scheduler omit_full_masks)."""
    model, ts, hm, cm, hslot, cslot, sliced = _three_t_union()
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 10])
    # force t = 400 to the union: the eager model gets the union's masks, the engine none
    union_h = torch.from_numpy(hm.any(0)).float().expand(3, -1, -1)
    union_c = torch.from_numpy(cm.any(0)).float().expand(3, -1, -1)
    with torch.no_grad():
        want = model(x, torch.full((3,), 400), y, tdw_masks=(union_h, union_c))
        got = sliced(x, torch.full((3,), 400), y)
        masked = sliced(x, torch.full((3,), 400), y, head_mask=torch.from_numpy(hslot[1:2]).expand(3, -1, -1),
                        channel_mask=torch.from_numpy(cslot[1:2]).expand(3, -1, -1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - masked).abs().max() > 1e-4  # t = 400's own masks are narrower: the call did drop them


def test_hybrid_mlp_form_runs_dense_only_above_the_keep_threshold():
    """'hybrid' runs dense the layers whose expected keep rate reaches HYBRID_KEEP; every form = eager."""
    model, ts, hm, cm, hslot, cslot, sliced = _three_t_union()
    sliced.keep_rates = [0.9, 0.2, 0.75]
    assert sliced._dense_layers("hybrid") == {0, 2} and sliced._dense_layers("sdt") == set()
    assert sliced._dense_layers("hybrid-fold") == {0, 2}
    assert sliced._dense_layers("dense") == {0, 1, 2}
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 10])
    rows_t = torch.full((3,), 400)
    hs, cs = (torch.from_numpy(m[1:2]).expand(3, -1, -1) for m in (hslot, cslot))
    with torch.no_grad():
        want = model(x, rows_t, y)
        for mode in ("hybrid", "sdt", "dense", "dense-fold", "hybrid-fold"):
            torch.testing.assert_close(sliced(x, rows_t, y, head_mask=hs, channel_mask=cs, mlp_mode=mode), want,
                                       rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="mlp_mode"):
            sliced(x, rows_t, y, mlp_mode="sparse")


def test_group_keep_rates_follow_the_bundle_calibration(tmp_path):
    """The torch backend's per-engine keep rates: the calibration's rates averaged over each group's steps."""
    from runtime_fixtures import compile_tame

    from dyc.backends.torch_sliced import group_keep_rates
    from dyc.bundle import Bundle
    from dyc.compiler.analyse import keep_rates_per_t

    bundle = Bundle.load(compile_tame(tmp_path)["bundle"])
    rates = group_keep_rates(bundle)
    cal = bundle.manifest["calibration"]
    per_t = keep_rates_per_t(cal["timesteps"], np.asarray(cal["keep_rates"]))
    assert len(rates) == len(bundle.groups)
    for g, r in zip(bundle.groups, rates, strict=True):
        ts = [t for t in bundle.schedule if g.t_lo <= t <= g.t_hi]
        np.testing.assert_allclose(r, per_t[ts].mean(0))
        assert len(r) == bundle.config.depth and all(0.0 <= v <= 1.0 for v in r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs, side-stream router)")
def test_graph_runner_forms_replay_what_the_module_computes():
    """On CUDA, every MLP form replayed from its CUDA graph (the dense form forks the router onto a
    side stream inside the capture) equals the same module run eagerly, and the forms agree."""
    from dyc.backends.torch_sliced import GraphRunner

    model, ts, hm, cm, hslot, cslot, _ = _three_t_union()
    cfg = tiny_config(depth=3)  # as _three_t_union builds it
    layout, _, _ = _layout_for(hm, cm)
    mod = SlicedDiT(cfg, model.state_dict(), layout, dtype=torch.float16, device="cuda", shared_masks=True)
    mod.keep_rates = [0.9, 0.2, 0.75]
    g = torch.Generator().manual_seed(3)
    feeds = {"x": torch.randn(4, 4, 8, 8, generator=g).cuda().half(), "t": torch.full((4,), 400, device="cuda"),
             "y": torch.tensor([1, 2, 3, 10], device="cuda"),
             "head_mask": torch.from_numpy(hslot[1:2]).expand(4, -1, -1).cuda().half(),
             "channel_mask": torch.from_numpy(cslot[1:2]).expand(4, -1, -1).cuda().half()}
    outs = {}
    assert {"dense-fold", "hybrid-fold"} <= set(mod.mlp_modes())  # the Triton LN kernel finishes the router
    for mode in ("dense", "sdt", "hybrid", "dense-fold", "hybrid-fold"):
        os.environ["DYC_MLP_MODE"] = mode
        try:
            runner = GraphRunner([mod])
            got = runner(0, feeds)
            got2 = runner(0, feeds)  # a replay
        finally:
            del os.environ["DYC_MLP_MODE"]
        with torch.no_grad():
            want = mod(**feeds, mlp_mode=mode)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(got2, got, rtol=0, atol=0)  # replays are deterministic
        outs[mode] = want.float()
    for mode in ("sdt", "hybrid", "dense-fold", "hybrid-fold"):
        assert ((outs[mode] - outs["dense"]).norm() / outs["dense"].norm()).item() < 1e-2


def test_channels_last_patch_tokens_are_the_blocks_layout():
    """What ``patch_tokens`` relies on for CUDA: a channels-last conv's output, read as tokens, is already
    a contiguous [B, N, C] (no transposed pass), and holds the same values as the NCHW conv's."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 4, 8, 8, generator=g), torch.randn(32, 4, 2, 2, generator=g), torch.randn(32, generator=g)
    conv = torch.nn.functional.conv2d
    want = conv(x, w, b, stride=2).flatten(2).transpose(1, 2)
    got = conv(x.contiguous(memory_format=torch.channels_last), w, b, stride=2).flatten(2).transpose(1, 2)
    assert got.is_contiguous() and not want.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
