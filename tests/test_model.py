"""The eager model against independent references (DESIGN.md §1)."""

import math

import numpy as np
import pytest
import torch
from conftest import random_model, tiny_config

from dyc.model import DyDiT, sincos_pos_embed, timestep_embedding


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, dim=256)
    assert emb.shape == (4, 256)
    for i, tv in enumerate(t.tolist()):
        for k in (0, 1, 5, 64, 127):
            f = math.exp(-math.log(10000) * k / 128)
            assert emb[i, k].item() == pytest.approx(math.cos(tv * f), abs=1e-4)  # cos half first
            assert emb[i, 128 + k].item() == pytest.approx(math.sin(tv * f), abs=1e-4)


def test_pos_embed_closed_form():
    c, g = 16, 4
    pe = sincos_pos_embed(c, g)
    assert pe.shape == (g * g, c)
    q = c // 4
    for h in range(g):
        for w in range(g):
            row = pe[h * g + w]
            for k in range(q):
                om = 1.0 / 10000 ** (k / q)
                # DiT's meshgrid(w, h) puts the column index in the first half
                assert row[k] == pytest.approx(math.sin(w * om))
                assert row[q + k] == pytest.approx(math.cos(w * om))
                assert row[2 * q + k] == pytest.approx(math.sin(h * om))
                assert row[3 * q + k] == pytest.approx(math.cos(h * om))


# ---- an independent numpy implementation of DESIGN.md §1, loop by loop ---------------------------
def _np(p):
    return p.detach().double().numpy()


def _lin(x, layer):
    return x @ _np(layer.weight).T + _np(layer.bias)


def _ln(x):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6)


def _silu(x):
    return x / (1 + np.exp(-x))


def _sigmoid(x):
    return 0.5 * (1 + np.tanh(0.5 * x))  # overflow-free form


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def reference_forward(model: DyDiT, x, t, y):
    """Per sample, per head, per token loops; returns output and masks."""
    cfg = model.config
    p, c, H = cfg.patch_size, cfg.hidden_size, cfg.num_heads
    dh, g = c // H, cfg.input_size // p
    outs, masks = [], []
    for b in range(x.shape[0]):
        img = x[b].double().numpy()
        # patch embedding as explicit patch dot products
        w = _np(model.x_embedder.proj.weight)
        tok = np.zeros((g * g, c))
        for i in range(g):
            for j in range(g):
                patch = img[:, i * p:(i + 1) * p, j * p:(j + 1) * p]
                tok[i * g + j] = np.tensordot(w, patch, axes=([1, 2, 3], [0, 1, 2])) + _np(model.x_embedder.proj.bias)
        h = tok + _np(model.pos_embed)[0]
        # the sinusoid itself is checked against its closed form above; take the model's float32
        # values so that float32 rounding, amplified by random weights, does not mask the semantics
        feat = timestep_embedding(t[b:b + 1])[0].double().numpy()
        temb = _lin(_silu(_lin(feat, model.t_embedder.mlp[0])), model.t_embedder.mlp[2])
        cond = temb + _np(model.y_embedder.embedding_table.weight)[y[b].item()]
        mrec = {"head": [], "channel": [], "token": []}
        for blk in model.blocks:
            mod = _lin(_silu(cond), blk.adaLN_modulation[1])
            sh1, sc1, g1, sh2, sc2, g2 = np.split(mod, 6)
            mh = np.concatenate([[1.0], (_sigmoid(_lin(temb, blk.attn_rate.router)) > 0.5).astype(float)])
            mc = np.concatenate([[1.0], (_sigmoid(_lin(temb, blk.mlp_rate.router)) > 0.5).astype(float)])
            a = _ln(h) * (1 + sc1) + sh1
            qkv = _lin(a, blk.attn.qkv)
            heads = []
            for hd in range(H):
                q = qkv[:, hd * dh:(hd + 1) * dh]
                k = qkv[:, c + hd * dh:c + (hd + 1) * dh]
                v = qkv[:, 2 * c + hd * dh:2 * c + (hd + 1) * dh]
                s = q @ k.T / math.sqrt(dh)
                s = np.exp(s - s.max(-1, keepdims=True))
                heads.append(mh[hd] * (s / s.sum(-1, keepdims=True)) @ v)
            h = h + g1 * _lin(np.concatenate(heads, -1), blk.attn.proj)
            ts = blk.token_selection.mlp_head
            mt = (_sigmoid(_lin(np.maximum(_lin(h, ts[0]), 0), ts[2])[:, 0]) > 0.5).astype(float)
            m = _ln(h) * (1 + sc2) + sh2
            hid = _lin(m, blk.mlp.fc1)
            gs = hid.shape[1] // H
            hid = hid * np.repeat(mc, gs)[None]
            h = h + mt[:, None] * g2 * _lin(_gelu_tanh(hid), blk.mlp.fc2)
            mrec["head"].append(mh)
            mrec["channel"].append(mc)
            mrec["token"].append(mt)
        fmod = _lin(_silu(cond), model.final_layer.adaLN_modulation[1])
        fsh, fsc = np.split(fmod, 2)
        o = _lin(_ln(h) * (1 + fsc) + fsh, model.final_layer.linear)  # [N, p*p*out]
        oc = cfg.out_channels
        img_out = np.zeros((oc, g * p, g * p))
        for i in range(g):
            for j in range(g):
                img_out[:, i * p:(i + 1) * p, j * p:(j + 1) * p] = o[i * g + j].reshape(p, p, oc).transpose(2, 0, 1)
        outs.append(img_out)
        masks.append({k: np.stack(v) for k, v in mrec.items()})
    return np.stack(outs), masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_matches_independent_reference(seed):
    cfg = tiny_config(depth=3)
    model = random_model(cfg, seed=seed, router_scale=3.0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 400, 999])
    y = torch.tensor([1, 5, 10])  # 10 = the null class
    model = model.double()  # compare semantics, not float32 rounding
    with torch.no_grad():
        out, masks = model(x.double(), t, y, return_masks=True)
    ref, ref_masks = reference_forward(model, x, t, y)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-9, atol=1e-9)
    for b in range(3):
        for k in ("head", "channel", "token"):
            np.testing.assert_array_equal(masks[k][b].numpy(), ref_masks[b][k])
    # the test is only meaningful if some masks are off and some on
    allm = torch.cat([masks["head"].flatten(), masks["channel"].flatten(), masks["token"].flatten()])
    assert 0 < allm.mean() < 1


def test_all_masks_on_equals_static_dit():
    cfg = tiny_config()
    dyn = random_model(cfg, seed=3)
    with torch.no_grad():  # every router far on
        for blk in dyn.blocks:
            for r in (blk.attn_rate.router, blk.mlp_rate.router):
                r.bias.fill_(50.0)
            blk.token_selection.mlp_head[2].bias.fill_(1e4)
    static = DyDiT(tiny_config(dynamic=False)).eval()
    static.load_state_dict({k: v for k, v in dyn.state_dict().items() if k in static.state_dict()})
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 7])
    with torch.no_grad():
        a, m = dyn(x, t, y, return_masks=True)
        b = static(x, t, y)
        c = dyn(x, t, y, complete_model=True)
    assert all(bool((v == 1).all()) for v in m.values())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(c, b, rtol=0, atol=0)


def _fixed_masks_model(head_on, group_on, seed=4):
    """Depth-1 model whose routers give exactly the listed heads/groups (1..H-1) at every t."""
    cfg = tiny_config(depth=1)
    model = random_model(cfg, seed=seed)
    with torch.no_grad():
        blk = model.blocks[0]
        for router, on in ((blk.attn_rate.router, head_on), (blk.mlp_rate.router, group_on)):
            router.weight.zero_()
            router.bias.copy_(torch.tensor([20.0 if j in on else -20.0 for j in range(1, cfg.num_heads)]))
    return model


def test_head_mask_zeroes_exactly_the_masked_heads():
    model = _fixed_masks_model(head_on={2}, group_on={1, 2, 3})
    cfg = model.config
    dh, c = cfg.head_dim, cfg.hidden_size
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        base, m = model(x, t, y, return_masks=True)
        assert m["head"][0, 0].tolist() == [1, 0, 1, 0]
        attn = model.blocks[0].attn
        for head, should_change in ((0, True), (1, False), (2, True), (3, False)):
            saved = attn.qkv.weight.clone()
            attn.qkv.weight[2 * c + head * dh:2 * c + (head + 1) * dh] += 1.0  # this head's V rows
            changed = not torch.equal(model(x, t, y), base)
            attn.qkv.weight.copy_(saved)
            assert changed == should_change, head


def test_channel_mask_zeroes_exactly_the_masked_groups():
    model = _fixed_masks_model(head_on={1, 2, 3}, group_on={3})
    gs = model.config.group_size
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        base = model(x, t, y)
        fc1 = model.blocks[0].mlp.fc1
        for grp, should_change in ((0, True), (1, False), (2, False), (3, True)):
            saved = fc1.bias.clone()
            fc1.bias[grp * gs:(grp + 1) * gs] += 1.0
            changed = not torch.equal(model(x, t, y), base)
            fc1.bias.copy_(saved)
            assert changed == should_change, grp


def test_token_mask_skips_the_mlp_of_dropped_tokens():
    model = _fixed_masks_model(head_on={1, 2, 3}, group_on={1, 2, 3})
    blk = model.blocks[0]
    captured = {}
    blk.token_selection.register_forward_hook(lambda m, i, o: captured.update(x=i[0].clone(), logit=o.clone()))
    blk.register_forward_hook(lambda m, i, o: captured.update(out=o.clone()))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        _, m = model(x, t, y, return_masks=True)
    keep = m["token"][:, 0] > 0.5
    assert keep.any() and (~keep).any()
    assert torch.equal(keep, torch.sigmoid(captured["logit"]) > 0.5)
    # dropped tokens leave the block exactly as they were after the attention residual
    assert torch.equal(captured["out"][~keep], captured["x"][~keep])
    assert not torch.allclose(captured["out"][keep], captured["x"][keep])


def test_masks_depend_on_t_only():
    model = random_model(tiny_config(depth=3), seed=5, router_scale=3.0)
    t = torch.tensor([123, 123, 456])
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 9, 3])
    with torch.no_grad():
        _, m = model(x, t, y, return_masks=True)
        hm, cm = model.tdw_masks(t)
    assert torch.equal(m["head"], hm) and torch.equal(m["channel"], cm)
    assert torch.equal(m["head"][0], m["head"][1])  # same t, different x and y
    assert hm[:, :, 0].eq(1).all() and cm[:, :, 0].eq(1).all()  # head 0 and group 0 always on


def test_given_tdw_masks_replace_the_routers():
    model = random_model(tiny_config(depth=3), seed=8, router_scale=3.0)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 9])
    t_a, t_b = torch.tensor([50, 50]), torch.tensor([900, 900])
    with torch.no_grad():
        hm, cm = model.tdw_masks(t_b)
        assert not torch.equal(hm, model.tdw_masks(t_a)[0])
        # masks of t_b forced at t_a: the TDW part follows t_b's architecture, the rest t_a
        forced, m = model(x, t_a, y, tdw_masks=(hm, cm), return_masks=True)
        assert torch.equal(m["head"], hm) and torch.equal(m["channel"], cm)
        same = model(x, t_a, y, tdw_masks=model.tdw_masks(t_a))
        torch.testing.assert_close(same, model(x, t_a, y), rtol=0, atol=0)
        assert not torch.allclose(forced, same)
