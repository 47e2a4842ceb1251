"""dyc/recipes/: the FLOPs loss, the Gumbel-Sigmoid/STE gate, the magnitude permutation, a fine-tuning smoke
run, and the shipped default models (dyc/models)."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import random_model, tiny_config

from dyc.checkpoint import load_checkpoint, save_checkpoint
from dyc.errors import DycError
from dyc.flops import flops_ratio
from dyc.model import threshold_gate
from dyc.models import default_checkpoint
from dyc.recipes import finetune as ft
from dyc.recipes.data import digits_dataset, load_digits_raw, to_model_space, to_raw_space
from dyc.recipes.evaluate import realized_lambda, sample


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these models are tiny: on a busy 2-core box, 2 OpenMP threads spin against each other and run
    # ~10x slower than 1 (measured: 40 s vs 3.5 s for the sampling test), so the module uses one
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- FLOPs-constrained loss ------------------------------------------------------------------


def _masks(requires_grad: bool = False) -> dict[str, torch.Tensor]:
    head = torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 0]], [[1, 1, 1, 1], [1, 1, 1, 1]]], dtype=torch.float32)
    channel = torch.tensor([[[1, 1, 1, 1], [1, 1, 0, 0]], [[1, 1, 1, 1], [1, 1, 1, 1]]], dtype=torch.float32)
    token = torch.zeros(2, 2, 16)
    token[0, 0, :8] = 1  # keep 0.5
    token[0, 1] = 1  # keep 1.0
    token[1, :, :4] = 1  # keep 0.25 in both layers
    return {k: v.requires_grad_(requires_grad) for k, v in (("head", head), ("channel", channel), ("token", token))}


def test_flops_loss_by_hand():
    cfg = tiny_config()  # N=16, C=64, H=4, L=2: a head costs 73728 MACs, a channel group 131072
    a, m = 3 * 16 * 64 * 16 + 2 * 16 * 16 * 16 + 16 * 16 * 64, 2 * 16 * 64 * 64
    assert (a, m) == (73728, 131072)
    static = 2 * 4 * (a + m)
    # sample 0: 3 heads; MLP 4 groups x 0.5 + 2 groups x 1.0 = 4 group-loads. sample 1: 8 heads, 8 x 0.25 = 2
    frac = ft.flops_fraction(cfg, _masks())
    assert frac.tolist() == pytest.approx([(3 * a + 4 * m) / static, (8 * a + 2 * m) / static])
    assert frac.tolist() == pytest.approx([0.455, 0.52])
    assert ft.flops_loss(cfg, _masks(), 0.5).item() == pytest.approx((0.4875 - 0.5) ** 2, rel=1e-4)
    # the same convention as dyc.flops (what the compiler reports as the realized λ)
    mk = _masks()
    keep = mk["token"].mean(-1).numpy()
    assert flops_ratio(cfg, mk["head"].numpy(), mk["channel"].numpy(), keep) == pytest.approx(0.4875)


def test_flops_loss_gradient_reaches_every_mask():
    cfg = tiny_config()
    mk = _masks(requires_grad=True)
    ft.flops_loss(cfg, mk, 0.5).backward()  # below target: the loss asks for more compute
    for k in ("head", "channel", "token"):
        assert (mk[k].grad < 0).any(), k
    # a token's weight is its layer's active channel groups: 2 in sample 0's layer 1, 4 in sample 1's
    assert mk["token"].grad[1, 1, 0].item() == pytest.approx(2 * mk["token"].grad[0, 1, 0].item())


# ---- Gumbel-Sigmoid + straight-through ---------------------------------------------------------


def test_gate_without_noise_is_the_inference_threshold():
    logits = torch.tensor([[-3.0, -0.01, 0.01, 2.0, 40.0]])
    gate = ft.GumbelSigmoidGate(tau=5.0, noise=False)
    out = gate(logits, "head")
    assert torch.equal(out, threshold_gate(logits, "head"))
    assert set(out.flatten().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("tau", [1.0, 5.0])
def test_gate_gradient_is_the_relaxed_sigmoid(tau):
    logits = torch.tensor([0.0, 2.0, -1.0], requires_grad=True)
    ft.GumbelSigmoidGate(tau=tau, noise=False)(logits, "channel").sum().backward()
    s = torch.sigmoid(logits.detach() / tau)
    assert torch.allclose(logits.grad, s * (1 - s) / tau)
    assert logits.grad[0].item() == pytest.approx(0.25 / tau)


@pytest.mark.parametrize("tau", [1.0, 5.0])
def test_gumbel_noise_is_hard_and_on_with_probability_sigmoid(tau):
    gen = torch.Generator().manual_seed(0)
    gate = ft.GumbelSigmoidGate(tau=tau, noise=True, generator=gen)
    logits = torch.tensor([-1.0, 0.0, 1.5]).repeat(20000, 1)
    out = gate(logits, "token")
    assert set(out.unique().tolist()) <= {0.0, 1.0}  # forward stays hard 0/1 in training too
    # logistic noise: P(on) = sigmoid(logit), whatever the temperature (tau only shapes the gradient)
    assert out.mean(0).tolist() == pytest.approx(torch.sigmoid(torch.tensor([-1.0, 0.0, 1.5])).tolist(), abs=0.015)
    out2 = gate(logits, "token")
    assert not torch.equal(out, out2)  # fresh noise each call
    with pytest.raises(DycError):
        ft.GumbelSigmoidGate(tau=0.0)


# ---- magnitude ranking + permutation -------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_permutation_leaves_the_dit_unchanged_and_sorts_by_magnitude(granularity):
    cfg = tiny_config(dynamic=False)
    model = random_model(cfg, seed=3).double()  # float64: only a real change of function shows
    torch.manual_seed(1)
    x, t, y = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.tensor([5, 500, 990]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        before = model(x, t, y)
    perms = ft.permute_by_magnitude(model, granularity)
    with torch.no_grad():
        after = model(x, t, y)
    assert torch.allclose(before, after, rtol=1e-10, atol=1e-9)
    assert any(p != sorted(p) for p in perms["heads"]) and any(p != sorted(p) for p in perms["mlp"])
    for block in model.blocks:
        h = ft.head_importance(block, cfg.num_heads)
        assert torch.all(h[:-1] >= h[1:])
        g = ft.channel_importance(block).reshape(cfg.num_heads, -1).sum(1)
        assert torch.all(g[:-1] >= g[1:])  # group 0 is the most important either way
        if granularity == "channel":
            c = ft.channel_importance(block)
            assert torch.all(c[:-1] >= c[1:])


def test_to_dynamic_starts_with_everything_on():
    cfg = tiny_config(dynamic=False)
    dit = random_model(cfg, seed=4)
    with torch.no_grad():  # a trained DiT's timestep MLP keeps DiT's N(0, 0.02) scale, not the random 0.3
        for lin in (dit.t_embedder.mlp[0], dit.t_embedder.mlp[2]):
            lin.weight.normal_(0.0, 0.02)
    dy = ft.to_dynamic(dit).eval()
    assert dy.config.dynamic
    torch.manual_seed(2)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 999]), torch.tensor([3, 10])
    with torch.no_grad():
        out, masks = dy(x, t, y, return_masks=True)
        ref = dit(x, t, y)
    assert all(bool((v == 1).all()) for v in masks.values())
    assert torch.allclose(out, ref, atol=1e-6)
    assert dy.blocks[0].attn_rate.router.bias.eq(ft.TDW_BIAS_INIT).all()
    assert dy.blocks[0].token_selection.mlp_head[2].bias.eq(ft.TOKEN_BIAS_INIT).all()


# ---- fine-tuning smoke run -------------------------------------------------------------------------


def test_finetune_smoke_moves_routers_toward_lambda(tmp_path):
    cfg = tiny_config(in_channels=1, hidden_size=32, num_classes=10, dynamic=False, vae_scale=1)
    src = save_checkpoint(random_model(cfg, seed=5), tmp_path / "dit.safetensors")
    out = tmp_path / "dydit.safetensors"
    args = ft.parse_args([
        "--from", str(src), "--out", str(out), "--lambda", "0.5", "--steps", "25", "--warmup", "2",
        "--batch-size", "8", "--router-lr", "1.0", "--log-every", "25", "--save-dtype", "fp32",
    ])
    info = ft.finetune(args)
    ck = load_checkpoint(out)
    assert ck.config.dynamic and ck.config.num_heads == 4
    assert json.loads(ck.metadata["dyc.recipe"])["steps"] == 25
    # the routers left their all-on start: the FLOPs loss pulled the training ratio down from 1
    assert info["final_train_ratio"] < 0.9
    assert not ck.model.blocks[0].attn_rate.router.bias.eq(ft.TDW_BIAS_INIT).all()
    with pytest.raises(DycError, match="already a DyDiT"):
        ft.finetune(ft.parse_args(["--from", str(out), "--out", str(tmp_path / "x.safetensors")]))


# ---- data --------------------------------------------------------------------------------------


def test_digits_round_trip_and_range():
    x, y = digits_dataset(16)
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,) and set(y.tolist()) == set(range(10))
    assert x.min() >= -1 and x.max() <= 1
    raw, _ = load_digits_raw()
    back = to_raw_space(to_model_space(raw[:50]))
    assert np.abs(back - raw[:50].reshape(50, -1)).mean() < 1.5  # area-downsampling undoes most of the upsample


# ---- the shipped default models -------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(default_checkpoint(dynamic=True)), load_checkpoint(default_checkpoint(dynamic=False))


def test_shipped_checkpoints_load_and_match(shipped):
    dy, dit = shipped
    assert dy.config.dynamic and not dit.config.dynamic
    assert dy.config.to_dict() | {"dynamic": False} == dit.config.to_dict()
    assert dy.config.in_channels == 1 and dy.config.num_classes == 10 and dy.config.vae_scale == 1
    assert default_checkpoint(True).stat().st_size < 8 * 2**20
    assert "dyc.recipe" in dy.metadata and "dyc.recipe" in dit.metadata


def test_shipped_dydit_masks_vary_with_t(shipped):
    model = shipped[0].model
    head, channel = model.tdw_masks(torch.arange(1000))
    arch = torch.cat([head, channel], -1).flatten(1)
    assert torch.unique(arch, dim=0).shape[0] > 1  # not one constant architecture
    assert 0 < head.mean() < 1 and 0 < channel.mean() < 1
    assert (head[:, :, 0] == 1).all() and (channel[:, :, 0] == 1).all()


def test_shipped_dydit_tokens_and_realized_lambda(shipped):
    model = shipped[0].model
    x, labels, keep = sample(model, n=10, steps=10, cfg_scale=3.0, seed=0)
    assert keep.shape == (10, model.config.depth)
    assert 0 < keep.mean() < 1  # the token routers keep some tokens, not none or all
    lam = realized_lambda(model, 10, keep)
    assert math.isfinite(lam) and abs(lam - 0.5) < 0.08  # the recipe target; 10 steps, 10 samples: loose
    assert x.abs().max() <= 1.0 + 1e-6
