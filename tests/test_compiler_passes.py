"""Each compiler pass alone, on plain data (no files)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import random_model, tiny_config

from dyc.compiler.analyse import (
    architectures,
    calibrate_keep_rates,
    calibration_timesteps,
    keep_rates_per_t,
    tdw_masks,
)
from dyc.compiler.budget import fit_budget, realized_ratio
from dyc.compiler.group import best_partitions, compiled_ratio, partition, runs_of, segment_costs
from dyc.compiler.plan import Plan, bits_to_mask, mask_to_bits
from dyc.compiler.slice import slice_layer
from dyc.errors import DycError
from dyc.model import DyDiT
from dyc.timesteps import sampler_timesteps

DDIM50 = sampler_timesteps("ddim", 50)


@pytest.fixture(scope="module")
def many_arch_model():
    return random_model(tiny_config(depth=3), seed=1, router_scale=8.0)


# ---- plan ---------------------------------------------------------------------------------
def test_mask_bits_roundtrip():
    rng = np.random.default_rng(0)
    m = rng.random((5, 16)) > 0.5
    assert (bits_to_mask(mask_to_bits(m), 16) == m).all()


# ---- analyse ------------------------------------------------------------------------------
def test_tdw_masks_match_eager_forward(many_arch_model):
    head, channel = tdw_masks(many_arch_model)
    assert head.shape == (1000, 3, 4) and head[:, :, 0].all() and channel[:, :, 0].all()
    ts = torch.tensor([0, 17, 500, 999])
    _, rec = many_arch_model(torch.randn(4, 4, 8, 8), ts, torch.tensor([1, 2, 3, 10]), return_masks=True)
    assert ((rec["head"].numpy() > 0.5) == head[ts.numpy()]).all()
    assert ((rec["channel"].numpy() > 0.5) == channel[ts.numpy()]).all()


def test_architectures_index_table(many_arch_model):
    head, channel = tdw_masks(many_arch_model)
    arch_of_t, ah, ac = architectures(head, channel)
    assert len(ah) > 50  # random routers: many distinct architectures
    assert arch_of_t[0] == 0 and (np.diff(np.maximum.accumulate(arch_of_t)) <= 1).all()  # first-appearance order
    assert (ah[arch_of_t] == head).all() and (ac[arch_of_t] == channel).all()


def test_calibration_and_interpolation(many_arch_model):
    ts = calibration_timesteps(DDIM50, 5)
    assert ts[0] == DDIM50[0] and ts[-1] == DDIM50[-1] and len(ts) == 5
    rates = calibrate_keep_rates(many_arch_model, ts, 2, seed=0)
    assert rates.shape == (5, 3) and ((rates >= 0) & (rates <= 1)).all()
    assert (rates == calibrate_keep_rates(many_arch_model, ts, 2, seed=0)).all()  # seeded: reproducible
    keep = keep_rates_per_t(ts, rates)
    assert keep.shape == (1000, 3)
    for t, r in zip(ts, rates, strict=True):
        assert np.allclose(keep[t], r)
    assert np.allclose(keep[999], rates[0]) and np.allclose(keep[0], rates[-1])


def test_static_model_keeps_every_token():
    m = random_model(tiny_config(dynamic=False))
    assert (calibrate_keep_rates(m, [980, 0], 1) == 1).all()


# ---- budget -------------------------------------------------------------------------------
def test_budget_without_target_keeps_trained_thresholds(many_arch_model):
    keep = np.full((1000, 3), 0.7)
    b = fit_budget(many_arch_model, keep, DDIM50, None)
    assert b.offset == 0.0 and not b.forced and b.ratio == b.trained_ratio


def test_budget_bisection_fits_and_is_tight(many_arch_model):
    keep = np.full((1000, 3), 0.7)
    cfg = many_arch_model.config
    trained = fit_budget(many_arch_model, keep, DDIM50, None).ratio
    target = trained * 0.8
    b = fit_budget(many_arch_model, keep, DDIM50, target)
    assert b.forced and b.offset > 0 and b.ratio <= target
    # a slightly smaller offset does not fit: the smallest fitting offset was found
    h, c = tdw_masks(many_arch_model, b.offset * (1 - 1e-4) - 1e-6)
    assert realized_ratio(cfg, h, c, keep, DDIM50) > target
    # masks at the offset are the eager model's own
    h2, c2 = tdw_masks(many_arch_model, b.offset)
    assert (h2 == b.head).all() and (c2 == b.channel).all()


def test_budget_errors(many_arch_model):
    keep = np.ones((1000, 3))
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(DycError, match="λ"):
            fit_budget(many_arch_model, keep, DDIM50, bad)
    with pytest.raises(DycError, match="unreachable"):
        fit_budget(many_arch_model, keep, DDIM50, 0.01)
    with pytest.raises(DycError, match="plain DiT"):
        fit_budget(random_model(tiny_config(dynamic=False)), np.ones((1000, 2)), DDIM50, 0.5)


# ---- group --------------------------------------------------------------------------------
def _brute_force(cost: np.ndarray, k: int) -> float:
    r = cost.shape[0]
    best = np.inf
    for n in range(1, k + 1):
        for cuts in itertools.combinations(range(1, r), n - 1):
            starts = [0, *cuts]
            ends = [c - 1 for c in cuts] + [r - 1]
            best = min(best, sum(cost[a, b] for a, b in zip(starts, ends, strict=True)))
    return best


def test_dp_matches_brute_force():
    rng = np.random.default_rng(3)
    cfg = tiny_config(depth=2)
    arch_of_t = np.repeat(rng.integers(0, 5, size=9), 1000 // 9 + 1)[:1000]
    ah = rng.random((5, 2, 4)) > 0.5
    ac = rng.random((5, 2, 4)) > 0.5
    ah[:, :, 0] = ac[:, :, 0] = True
    keep = rng.random((1000, 2))
    runs = runs_of(arch_of_t)
    cost = segment_costs(cfg, runs, ah, ac, keep, DDIM50)
    best, splits = best_partitions(cost, 4)
    for k in range(1, len(best) + 1):
        assert best[k - 1] == pytest.approx(_brute_force(cost, k), rel=1e-12)
        starts = splits[k - 1]
        ends = [s - 1 for s in starts[1:]] + [len(cost) - 1]
        assert sum(cost[a, b] for a, b in zip(starts, ends, strict=True)) == pytest.approx(best[k - 1], rel=1e-12)
        assert len(starts) <= k


def test_partition_covers_t_and_is_exact(many_arch_model):
    cfg = many_arch_model.config
    head, channel = tdw_masks(many_arch_model)
    arch_of_t, ah, ac = architectures(head, channel)
    keep = np.full((1000, 3), 0.6)
    for k in (1, 2, 5):
        groups = partition(cfg, arch_of_t, ah, ac, keep, DDIM50, k)
        assert 1 <= len(groups) <= k
        assert groups[0].t_lo == 0 and groups[-1].t_hi == 999
        assert all(a.t_hi + 1 == b.t_lo for a, b in zip(groups, groups[1:], strict=False))
        assert sum(g.schedule_steps for g in groups) == len(DDIM50)
        for g in groups:
            for l in range(cfg.depth):  # every member's units are inside the union
                uh = np.zeros(4, bool)
                uh[g.heads[l]] = True
                uc = np.zeros(4, bool)
                uc[g.channels[l]] = True
                hs, cs = head[g.t_lo:g.t_hi + 1, l], channel[g.t_lo:g.t_hi + 1, l]
                assert (hs.any(0) == uh).all() and (cs.any(0) == uc).all()
                assert g.vary_head[l] == bool((hs != uh).any()) and g.vary_channel[l] == bool((cs != uc).any())
    # more engines never cost more; one per architecture costs the model's own ratio
    r1 = compiled_ratio(cfg, partition(cfg, arch_of_t, ah, ac, keep, DDIM50, 1), keep, DDIM50)
    r5 = compiled_ratio(cfg, partition(cfg, arch_of_t, ah, ac, keep, DDIM50, 5), keep, DDIM50)
    assert r1 >= r5 >= realized_ratio(cfg, head, channel, keep, DDIM50)


def few_arch_model(scale: float = 0.1, seed: int = 4, **kw) -> DyDiT:
    """Default init with router weights scaled down: a handful of architectures over t."""
    torch.manual_seed(seed)
    m = DyDiT(tiny_config(**kw)).eval()
    with torch.no_grad():
        for b in m.blocks:
            b.attn_rate.router.weight.mul_(scale)
            b.mlp_rate.router.weight.mul_(scale)
    return m


def test_one_engine_per_architecture_is_the_model_ratio():
    cfg = tiny_config(depth=2)
    m = few_arch_model()
    head, channel = tdw_masks(m)
    arch_of_t, ah, ac = architectures(head, channel)
    keep = np.random.default_rng(0).random((1000, 2))
    runs = len(runs_of(arch_of_t).start)
    assert runs < 100
    groups = partition(cfg, arch_of_t, ah, ac, keep, DDIM50, runs)
    got = compiled_ratio(cfg, groups, keep, DDIM50)
    assert got == pytest.approx(realized_ratio(cfg, head, channel, keep, DDIM50), rel=1e-12)


def test_default_k_within_two_percent():
    cfg = tiny_config(depth=2)
    m = few_arch_model()
    head, channel = tdw_masks(m)
    arch_of_t, ah, ac = architectures(head, channel)
    keep = np.full((1000, 2), 0.5)
    groups = partition(cfg, arch_of_t, ah, ac, keep, DDIM50, None)
    assert len(groups) <= 8
    ideal = realized_ratio(cfg, head, channel, keep, DDIM50)
    got = compiled_ratio(cfg, groups, keep, DDIM50)
    if len(groups) < 8:
        assert got <= ideal * 1.02 + 1e-12
        if len(groups) > 1:  # and one group fewer would not be
            fewer = partition(cfg, arch_of_t, ah, ac, keep, DDIM50, len(groups) - 1)
            assert compiled_ratio(cfg, fewer, keep, DDIM50) > ideal * 1.02


def test_partition_rejects_zero_groups(many_arch_model):
    with pytest.raises(DycError, match="--groups"):
        partition(many_arch_model.config, np.zeros(1000, int), np.ones((1, 3, 4), bool), np.ones((1, 3, 4), bool),
                  np.ones((1000, 3)), DDIM50, 0)


# ---- slice --------------------------------------------------------------------------------
def test_slice_equals_masked_block(many_arch_model):
    cfg = many_arch_model.config
    sd = many_arch_model.state_dict()
    heads, groups = [0, 2, 3], [0, 1]
    s = slice_layer(cfg, sd, 1, heads, groups)
    assert s["blocks.1.attn.qkv.weight"].shape == (3 * 3 * cfg.head_dim, cfg.hidden_size)
    assert s["blocks.1.mlp.fc1.weight"].shape == (2 * cfg.group_size, cfg.hidden_size)
    blk = many_arch_model.blocks[1]
    x = torch.randn(2, cfg.num_tokens, cfg.hidden_size)
    mh = torch.zeros(2, cfg.num_heads)
    mh[:, heads] = 1
    ref = blk.attn(x, mh)
    qkv = (x @ s["blocks.1.attn.qkv.weight"].T + s["blocks.1.attn.qkv.bias"]).reshape(2, cfg.num_tokens, 3, 3, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, cfg.num_tokens, -1)
    got = o @ s["blocks.1.attn.proj.weight"].T + s["blocks.1.attn.proj.bias"]
    assert torch.allclose(got, ref, atol=1e-5)
    mc = torch.zeros(2, cfg.num_heads)
    mc[:, groups] = 1
    ref = blk.mlp(x, mc)
    h = torch.nn.functional.gelu(x @ s["blocks.1.mlp.fc1.weight"].T + s["blocks.1.mlp.fc1.bias"], approximate="tanh")
    got = h @ s["blocks.1.mlp.fc2.weight"].T + s["blocks.1.mlp.fc2.bias"]
    assert torch.allclose(got, ref, atol=1e-5)


def test_plan_json_roundtrip(many_arch_model):
    import json

    cfg = many_arch_model.config
    head, channel = tdw_masks(many_arch_model)
    arch_of_t, ah, ac = architectures(head, channel)
    groups = partition(cfg, arch_of_t, ah, ac, np.ones((1000, 3)), DDIM50, 3)
    from dyc.compiler.plan import Architecture

    plan = Plan(config=cfg.to_dict(), dtype="fp32", sampler="ddim", steps=50, schedule=DDIM50, lambda_target=None,
                lambda_model=0.5, lambda_realized=0.6, lambda_trained=0.5, threshold_offset=0.0, offset_forced=False,
                architectures=[Architecture(mask_to_bits(h), mask_to_bits(c)) for h, c in zip(ah, ac, strict=True)],
                arch_of_t=[int(a) for a in arch_of_t], groups=groups)
    back = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan


def test_unit_orders_make_nested_unions_prefixes():
    from dyc.compiler.plan import GroupPlan
    from dyc.compiler.slice import is_prefix, reorder_groups, unit_orders

    def gp(i, heads):
        return GroupPlan(index=i, t_lo=i, t_hi=i, architectures=[0], heads=[heads], channels=[heads],
                         vary_head=[False], vary_channel=[False])

    groups = [gp(0, [0, 3]), gp(1, [0, 1, 3]), gp(2, [0, 1, 2, 3]), gp(3, [0, 2])]
    ho, co = unit_orders(groups, 1)
    assert ho[0][:2] == [0, 3] and sorted(ho[0]) == [0, 1, 2, 3]
    re = reorder_groups(groups, 1)
    assert [is_prefix(g.heads[0], ho[0]) for g in re] == [True, True, True, False]  # {0,2} is not nested
    assert all(sorted(a.heads[0]) == sorted(b.heads[0]) for a, b in zip(groups, re, strict=True))
