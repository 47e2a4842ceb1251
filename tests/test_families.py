"""U-ViT / PixArt-α families (dyc.families): eager models against independent numpy references, official
checkpoint layouts, FLOPs against torch's own counter and the papers' tables, synth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dyc.checkpoint import model_from_state_dict
from dyc.config import ModelConfig, parse_model_name
from dyc.errors import DycError
from dyc.families import build_model, mixed_conditions
from dyc.flops import fvcore_gflops, static_breakdown
from dyc.model import timestep_embedding
from dyc.synth import synthesize


def uvit_config(**kw) -> ModelConfig:
    base = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=5, num_heads=4, num_classes=0,
                learn_sigma=False, vae_scale=1, family="uvit", qkv_bias=False, final_conv=True)
    base.update(kw)
    return ModelConfig(**base)


def pixart_config(**kw) -> ModelConfig:
    base = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4, num_classes=0,
                family="pixart", text_channels=32, text_len=6)
    base.update(kw)
    return ModelConfig(**base)


def random_family_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """Every weight random (norms, tables and routers included), so no path is trivially zero or one."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            p.normal_(0.0, 0.3 if p.ndim > 1 else 0.1)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.add_(1.0)
    return model


# ---- independent float64 references: the official code's equations written out ---------------------
def _np(t):
    return t.detach().double().numpy()


def _lin(x, sd, name, bias=True):
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if bias else y


def _ln(x, eps, w=None, b=None):
    mu = x.mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    return y if w is None else y * w + b


def _sigmoid(x):
    return 0.5 * (1 + np.tanh(0.5 * x))


def _gelu_erf(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _sinusoid(t, dim):
    """The sinusoid in float32, as the official code computes it (its closed form: test_model.py); the
    network then amplifies any other rounding of it far past float64 tolerances."""
    return timestep_embedding(torch.tensor([t]), dim)[0].double().numpy()


def _patches(img, sd, name, p):
    c_in, s, _ = img.shape
    g = s // p
    blocks = img.reshape(c_in, g, p, g, p).transpose(1, 3, 0, 2, 4).reshape(g * g, -1)  # row-major (h, w)
    return blocks @ sd[name + ".weight"].reshape(sd[name + ".weight"].shape[0], -1).T + sd[name + ".bias"]


def _unpatch(tok, c, p, g):
    return tok.reshape(g, g, p, p, c).transpose(4, 0, 2, 1, 3).reshape(c, g * p, g * p)


def _attention(x, qkv_w, qkv_b, heads, head_mask):
    n, c = x.shape
    d = c // heads
    qkv = x @ qkv_w.T + (qkv_b if qkv_b is not None else 0)
    out = np.zeros((n, c))
    for h in range(heads):
        q, k, v = (qkv[:, s * c + h * d: s * c + (h + 1) * d] for s in range(3))
        a = q @ k.T / math.sqrt(d)
        a = np.exp(a - a.max(-1, keepdims=True))
        out[:, h * d:(h + 1) * d] = head_mask[h] * (a / a.sum(-1, keepdims=True)) @ v
    return out


def _cross(x, cond, sd, pre, heads):
    n, c = x.shape
    d = c // heads
    q = _lin(x, sd, pre + "q_linear")
    kv = _lin(cond, sd, pre + "kv_linear")  # [T, (2, H, D)]
    out = np.zeros((n, c))
    for h in range(heads):
        k, v = kv[:, h * d:(h + 1) * d], kv[:, c + h * d: c + (h + 1) * d]
        a = q[:, h * d:(h + 1) * d] @ k.T / math.sqrt(d)
        a = np.exp(a - a.max(-1, keepdims=True))
        out[:, h * d:(h + 1) * d] = (a / a.sum(-1, keepdims=True)) @ v
    return _lin(out, sd, pre + "proj")


def _router(temb, sd, pre):
    return np.concatenate([[1.0], (_sigmoid(_lin(temb, sd, pre)) > 0.5).astype(float)])


def _mlp(x, sd, pre, groups, channel_mask, gelu):
    h = _lin(x, sd, pre + "fc1")
    h = h * np.repeat(channel_mask, h.shape[1] // groups)[None]
    return _lin(gelu(h), sd, pre + "fc2")


def reference_uvit(model, x, t, y):
    cfg = model.config
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    c, p, g, k = cfg.hidden_size, cfg.patch_size, cfg.input_size // cfg.patch_size, cfg.depth // 2
    prefixes = [f"in_blocks.{i}." for i in range(k)] + ["mid_block."] + [f"out_blocks.{i}." for i in range(k)]
    outs, heads_on = [], []
    for b in range(x.shape[0]):
        temb = _sinusoid(int(t[b]), c)
        toks = [temb[None], _patches(x[b].double().numpy(), sd, "patch_embed.proj", p)]
        if cfg.num_classes > 0:
            toks.insert(0, sd["label_emb.weight"][int(y[b])][None])
        h = np.concatenate(toks) + sd["pos_embed"][0]
        skips, on = [], []
        for l, pre in enumerate(prefixes):
            if l > k:
                h = _lin(np.concatenate([h, skips.pop()], -1), sd, pre + "skip_linear")
            mh, mc = _router(temb, sd, pre + "attn_rate.router"), _router(temb, sd, pre + "mlp_rate.router")
            on.append(mh)
            a = _attention(_ln(h, 1e-5, sd[pre + "norm1.weight"], sd[pre + "norm1.bias"]), sd[pre + "attn.qkv.weight"],
                           sd.get(pre + "attn.qkv.bias"), cfg.num_heads, mh)
            h = h + _lin(a, sd, pre + "attn.proj")
            r = _lin(np.maximum(_lin(h, sd, pre + "token_selection.mlp_head.0"), 0), sd,
                     pre + "token_selection.mlp_head.2")
            keep = (_sigmoid(r) > 0.5).astype(float)
            m = _mlp(_ln(h, 1e-5, sd[pre + "norm2.weight"], sd[pre + "norm2.bias"]), sd, pre + "mlp.",
                     cfg.num_heads, mc, _gelu_erf)
            h = h + keep * m
            if l < k:
                skips.append(h)
        o = _lin(_ln(h, 1e-5, sd["norm.weight"], sd["norm.bias"]), sd, "decoder_pred")[cfg.extra_tokens:]
        img = _unpatch(o, cfg.in_channels, p, g)
        if cfg.final_conv:  # 3x3 conv, padding 1, written out
            w, bias = sd["final_layer.weight"], sd["final_layer.bias"]
            pad = np.pad(img, ((0, 0), (1, 1), (1, 1)))
            s = img.shape[1]
            img = np.stack([sum(w[co, ci, i, j] * pad[ci, i:i + s, j:j + s] for ci in range(img.shape[0])
                                for i in range(3) for j in range(3)) + bias[co] for co in range(w.shape[0])])
        outs.append(img)
        heads_on.append(np.stack(on))
    return np.stack(outs), np.stack(heads_on)


def reference_pixart(model, x, t, y):
    cfg = model.config
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    c, p, g = cfg.hidden_size, cfg.patch_size, cfg.input_size // cfg.patch_size
    outs, heads_on = [], []
    for b in range(x.shape[0]):
        h = _patches(x[b].double().numpy(), sd, "x_embedder.proj", p) + sd["pos_embed"][0]
        f = _sinusoid(int(t[b]), 256)
        hid = _lin(f, sd, "t_embedder.mlp.0")
        temb = _lin(hid * _sigmoid(hid), sd, "t_embedder.mlp.2")
        t0 = _lin(temb * _sigmoid(temb), sd, "t_block.1").reshape(6, c)
        cond = _lin(_gelu_tanh(_lin(y[b].double().numpy(), sd, "y_embedder.y_proj.fc1")), sd, "y_embedder.y_proj.fc2")
        on = []
        for l in range(cfg.depth):
            pre = f"blocks.{l}."
            sh1, sc1, g1, sh2, sc2, g2 = sd[pre + "scale_shift_table"] + t0
            mh, mc = _router(temb, sd, pre + "attn_rate.router"), _router(temb, sd, pre + "mlp_rate.router")
            on.append(mh)
            a = _attention(_ln(h, 1e-6) * (1 + sc1) + sh1, sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"],
                           cfg.num_heads, mh)
            h = h + g1 * _lin(a, sd, pre + "attn.proj")
            h = h + _cross(h, cond, sd, pre + "cross_attn.", cfg.num_heads)
            r = _lin(np.maximum(_lin(h, sd, pre + "token_selection.mlp_head.0"), 0), sd,
                     pre + "token_selection.mlp_head.2")
            keep = (_sigmoid(r) > 0.5).astype(float)
            h = h + keep * g2 * _mlp(_ln(h, 1e-6) * (1 + sc2) + sh2, sd, pre + "mlp.", cfg.num_heads, mc, _gelu_tanh)
        shift, scale = sd["final_layer.scale_shift_table"] + temb
        o = _lin(_ln(h, 1e-6) * (1 + scale) + shift, sd, "final_layer.linear")
        outs.append(_unpatch(o, cfg.out_channels, p, g))
        heads_on.append(np.stack(on))
    return np.stack(outs), np.stack(heads_on)


@pytest.mark.parametrize("cfg", [uvit_config(), uvit_config(num_classes=10, in_channels=4, final_conv=False,
                                                             qkv_bias=True, vae_scale=8)],
                         ids=["uncond-conv", "class-cond"])
def test_uvit_matches_reference(cfg):
    model = random_family_model(cfg)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    t = torch.tensor([999, 400, 3])
    y = mixed_conditions(model, 3, gen)
    with torch.no_grad():  # in float64: no router decision can differ from the reference's by rounding
        out, masks = model.double()(x.double(), t, y, return_masks=True)
    ref, heads = reference_uvit(model, x, t, y)
    assert np.array_equal(masks["head"].numpy(), heads)
    assert 0 < heads.mean() < 1  # some heads on, some off
    assert 0 < masks["token"].mean() < 1
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())


def test_pixart_matches_reference():
    cfg = pixart_config()
    model = random_family_model(cfg)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    t = torch.tensor([999, 400, 3])
    y = mixed_conditions(model, 3, gen)
    assert torch.equal(y[1], model.null_embedding)  # the null text is in the mix
    with torch.no_grad():  # in float64: no router decision can differ from the reference's by rounding
        out, masks = model.double()(x.double(), t, y.double(), return_masks=True)
    ref, heads = reference_pixart(model, x, t, y)
    assert np.array_equal(masks["head"].numpy(), heads)
    assert 0 < heads.mean() < 1 and 0 < masks["token"].mean() < 1
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())


def test_masks_depend_on_t_only_and_complete_model():
    for cfg in (uvit_config(), pixart_config()):
        model = random_family_model(cfg)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
        y = mixed_conditions(model, 2, gen)
        t = torch.tensor([500, 500])
        with torch.no_grad():
            _, m = model(x, t, y, return_masks=True)
            head, _ = model.tdw_masks(torch.tensor([500]))
            assert torch.equal(m["head"][0], m["head"][1]) and torch.equal(m["head"][0], head[0])
            full = model(x, t, y, complete_model=True)
            off = model(x, t, y, tdw_masks=(torch.ones(2, cfg.depth, cfg.num_heads),) * 2)
        assert not torch.allclose(full, off)  # complete_model also turns SDT off


# ---- official layouts ------------------------------------------------------------------------
def _uvit_official_keys(c, heads, depth_cfg, in_ch, p, n_tokens, classes, conv, dyn):
    """The state dict of github.com/baofff/U-ViT libs/uvit.py (qkv_bias=False), written out by hand."""
    sd = {"patch_embed.proj.weight": (c, in_ch, p, p), "patch_embed.proj.bias": (c,), "pos_embed": (1, n_tokens, c),
          "norm.weight": (c,), "norm.bias": (c,), "decoder_pred.weight": (p * p * in_ch, c),
          "decoder_pred.bias": (p * p * in_ch,)}
    if classes:
        sd["label_emb.weight"] = (classes, c)
    if conv:
        sd["final_layer.weight"], sd["final_layer.bias"] = (in_ch, in_ch, 3, 3), (in_ch,)
    blocks = [f"in_blocks.{i}." for i in range(depth_cfg // 2)] + ["mid_block."] + [
        f"out_blocks.{i}." for i in range(depth_cfg // 2)]
    for pre in blocks:
        sd.update({pre + "norm1.weight": (c,), pre + "norm1.bias": (c,), pre + "attn.qkv.weight": (3 * c, c),
                   pre + "attn.proj.weight": (c, c), pre + "attn.proj.bias": (c,), pre + "norm2.weight": (c,),
                   pre + "norm2.bias": (c,), pre + "mlp.fc1.weight": (4 * c, c), pre + "mlp.fc1.bias": (4 * c,),
                   pre + "mlp.fc2.weight": (c, 4 * c), pre + "mlp.fc2.bias": (c,)})
        if pre.startswith("out_blocks"):
            sd[pre + "skip_linear.weight"], sd[pre + "skip_linear.bias"] = (c, 2 * c), (c,)
        if dyn:
            sd.update({pre + "attn_rate.router.weight": (heads - 1, c), pre + "attn_rate.router.bias": (heads - 1,),
                       pre + "mlp_rate.router.weight": (heads - 1, c), pre + "mlp_rate.router.bias": (heads - 1,),
                       pre + "token_selection.mlp_head.0.weight": (c // 16, c),
                       pre + "token_selection.mlp_head.0.bias": (c // 16,),
                       pre + "token_selection.mlp_head.2.weight": (1, c // 16),
                       pre + "token_selection.mlp_head.2.bias": (1,)})
    return {k: torch.randn(s) * 0.02 for k, s in sd.items()}


def _pixart_official_keys(c, heads, depth, n_tokens, text_len, text_ch, dyn):
    """The state dict of PixArt-α's PixArt.py / PixArt_blocks.py (XL layout), written out by hand."""
    sd = {"x_embedder.proj.weight": (c, 4, 2, 2), "x_embedder.proj.bias": (c,), "pos_embed": (1, n_tokens, c),
          "t_embedder.mlp.0.weight": (c, 256), "t_embedder.mlp.0.bias": (c,), "t_embedder.mlp.2.weight": (c, c),
          "t_embedder.mlp.2.bias": (c,), "t_block.1.weight": (6 * c, c), "t_block.1.bias": (6 * c,),
          "y_embedder.y_proj.fc1.weight": (c, text_ch), "y_embedder.y_proj.fc1.bias": (c,),
          "y_embedder.y_proj.fc2.weight": (c, c), "y_embedder.y_proj.fc2.bias": (c,),
          "y_embedder.y_embedding": (text_len, text_ch), "final_layer.scale_shift_table": (2, c),
          "final_layer.linear.weight": (2 * 2 * 8, c), "final_layer.linear.bias": (2 * 2 * 8,)}
    for i in range(depth):
        pre = f"blocks.{i}."
        sd.update({pre + "scale_shift_table": (6, c), pre + "attn.qkv.weight": (3 * c, c),
                   pre + "attn.qkv.bias": (3 * c,),
                   pre + "attn.proj.weight": (c, c), pre + "attn.proj.bias": (c,),
                   pre + "cross_attn.q_linear.weight": (c, c), pre + "cross_attn.q_linear.bias": (c,),
                   pre + "cross_attn.kv_linear.weight": (2 * c, c), pre + "cross_attn.kv_linear.bias": (2 * c,),
                   pre + "cross_attn.proj.weight": (c, c), pre + "cross_attn.proj.bias": (c,),
                   pre + "mlp.fc1.weight": (4 * c, c), pre + "mlp.fc1.bias": (4 * c,),
                   pre + "mlp.fc2.weight": (c, 4 * c), pre + "mlp.fc2.bias": (c,)})
        if dyn:
            sd.update({pre + "attn_rate.router.weight": (heads - 1, c), pre + "attn_rate.router.bias": (heads - 1,),
                       pre + "mlp_rate.router.weight": (heads - 1, c), pre + "mlp_rate.router.bias": (heads - 1,),
                       pre + "token_selection.mlp_head.0.weight": (c // 16, c),
                       pre + "token_selection.mlp_head.0.bias": (c // 16,),
                       pre + "token_selection.mlp_head.2.weight": (1, c // 16),
                       pre + "token_selection.mlp_head.2.bias": (1,)})
    return {k: torch.randn(s) * 0.02 for k, s in sd.items()}


@pytest.mark.parametrize("dyn", [False, True])
def test_official_uvit_keys_load_as_is(dyn):
    # U-ViT-S/2 of configs/cifar10_uvit.py: 512 wide, depth 12 (13 blocks), 8 heads, 32x32 RGB, final conv
    sd = _uvit_official_keys(512, 8, 12, 3, 2, 257, 0, True, dyn)
    cfg, model = model_from_state_dict(sd)
    assert cfg == parse_model_name(("Dy" if dyn else "") + "U-ViT-S/2")
    assert cfg.name == ("DyU-ViT-S/2" if dyn else "U-ViT-S/2") and cfg.num_tokens == 257
    # imagenet256_uvit_huge: label_emb of 1001 rows (the last the null class), latents, no conv
    sd = _uvit_official_keys(512, 8, 4, 4, 2, 2 + 16, 1001, False, dyn)  # plain: heads from the width
    cfg, model = model_from_state_dict(sd)
    assert (cfg.num_classes, cfg.extra_tokens, cfg.depth, cfg.final_conv, cfg.qkv_bias) == (1000, 2, 5, False, False)
    assert torch.equal(model.state_dict()["mid_block.mlp.fc1.weight"], sd["mid_block.mlp.fc1.weight"])


@pytest.mark.parametrize("dyn", [False, True])
def test_official_pixart_keys_load_as_is(dyn):
    sd = _pixart_official_keys(1152, 16, 2, 256, 120, 4096, dyn)
    cfg, model = model_from_state_dict(sd)
    assert (cfg.family, cfg.text_len, cfg.text_channels, cfg.num_heads, cfg.dynamic) == ("pixart", 120, 4096, 16, dyn)
    assert torch.equal(model.null_embedding, sd["y_embedder.y_embedding"])


def test_missing_and_unexpected_keys_are_clear():
    sd = _pixart_official_keys(64, 4, 2, 16, 6, 32, True)
    sd.pop("blocks.1.cross_attn.proj.bias")
    with pytest.raises(DycError, match="missing keys.*cross_attn.proj.bias"):
        model_from_state_dict(sd)
    sd = _uvit_official_keys(64, 4, 4, 3, 2, 17, 0, True, False)
    sd["time_embed.0.weight"] = torch.zeros(256, 64)
    with pytest.raises(DycError, match="mlp_time_embed"):
        model_from_state_dict(sd)


# ---- FLOPs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,size", [("DiT-XL/2", 256), ("U-ViT-S/2", None), ("U-ViT-H/2", None),
                                       ("PixArt-XL/2", 256), ("DyU-ViT-H/2", None), ("DyPixArt-XL/2", 256)])
def test_static_flops_equal_torch_flop_counter(name, size):
    """The breakdown's total equals torch's own count of the eager model (meta tensors, full width)."""
    cfg = parse_model_name(name, size)
    with torch.device("meta"):
        model = build_model(cfg)
        x = torch.randn(1, cfg.in_channels, cfg.input_size, cfg.input_size)
        y = torch.randn(1, cfg.text_len, cfg.text_channels) if cfg.family == "pixart" else torch.zeros(1, dtype=int)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, torch.zeros(1, dtype=torch.long, device="meta"), y, complete_model=True)
    b = static_breakdown(ModelConfig(**{**cfg.to_dict(), "dynamic": False}))
    assert counter.get_total_flops() / 2 == b.total  # FLOPs = 2 MACs


@pytest.mark.parametrize("name,size,paper", [("DiT-XL/2", 256, 118.69), ("U-ViT-S/2", None, 11.34)])
def test_fvcore_count_reproduces_paper_tables(name, size, paper):
    """DyDiT paper Tables 1 and 9: fvcore's count of the official code."""
    assert fvcore_gflops(parse_model_name(name, size)) == pytest.approx(paper, abs=0.005)


def test_figures_the_paper_tables_do_not_match():
    """Recorded in docs/families.md: no count of the official code gives these tables' figures."""
    dit512, uvit_h, pixart = (parse_model_name(n, s) for n, s in (("DiT-XL/2", 512), ("U-ViT-H/2", None),
                                                                  ("PixArt-XL/2", 256)))
    assert static_breakdown(dit512).total / 1e9 == pytest.approx(524.6, rel=1e-3)  # the DiT paper's own figure
    assert fvcore_gflops(dit512) == pytest.approx(524.81, abs=0.01)  # Table 12: 514.80
    assert fvcore_gflops(uvit_h) == pytest.approx(128.84, abs=0.01)  # Table 10: 113.00
    assert fvcore_gflops(pixart) == pytest.approx(142.91, abs=0.01)  # Table 13: 141.09 (+1.3%)


# ---- synth --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [uvit_config(), pixart_config()], ids=["uvit", "pixart"])
def test_synth_reaches_lambda(cfg):
    model, info = synthesize(cfg, 0.6, token_keep=0.7)
    assert info["flops_ratio_at_target_keep"] == pytest.approx(0.6, abs=0.02)
    assert all(abs(k - 0.7) < 0.05 for k in info["token_keep_calibrated"])
    head, _ = model.tdw_masks(torch.tensor([999, 0]))
    assert head[1].sum() > head[0].sum()  # more width as t -> 0
