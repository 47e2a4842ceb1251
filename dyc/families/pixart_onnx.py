"""Export of one group's PixArt-α / DyPixArt-α engine to ONNX (``dyc.families.pixart``'s semantics).

Inputs as DiT's graphs except ``y``: the text embeddings [B, T, C_text] in the bundle's dtype
(guidance feeds the null text, ``null_text.npy`` of the bundle, as the unconditional half). The
text projection is ``text/`` nodes, ``t_block`` is ``adaLN/``, each block's cross-attention
``blocks.{l}.cross_attn/`` (full width: every head, every text token). The MLP is DiT's, so
``dyc::SdtMlp`` takes PixArt's per-row shift/scale/gate (table + t_block rows) as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import onnx
import torch
from onnx import helper

from ..compiler.export import VARIANTS, WeightStore, _gelu_tanh, _Graph, _linear, _modulate, _silu
from ..compiler.plan import GroupPlan
from ..config import ModelConfig
from ..errors import DycError
from ..model import FREQ_DIM
from . import onnx_common as oc
from .pixart import block_prefix


def _cross_attention(g: _Graph, cfg: ModelConfig, x: str, cond2d: str, ws: oc.Weights, pre: str) -> str:
    """Each sample's image tokens attend to its own T text tokens; the output of ``proj`` [B, N, C]."""
    c, n, t, h, d = cfg.hidden_size, cfg.num_tokens, cfg.text_len, cfg.num_heads, cfg.head_dim
    q = _linear(g, g.op("Reshape", [x, g.i64([-1, c])]), ws(pre + "cross_attn.q_linear.weight"),
                ws(pre + "cross_attn.q_linear.bias"))
    q = g.op("Transpose", [g.op("Reshape", [q, g.i64([-1, n, h, d])])], perm=[0, 2, 1, 3])
    q = g.op("Mul", [q, g.const(1.0 / math.sqrt(d))])
    kv = _linear(g, cond2d, ws(pre + "cross_attn.kv_linear.weight"), ws(pre + "cross_attn.kv_linear.bias"))
    kv = g.op("Transpose", [g.op("Reshape", [kv, g.i64([-1, t, 2, h, d])])], perm=[2, 0, 3, 1, 4])
    k, v = (g.op("Squeeze", [s, g.i64([0])]) for s in g.op("Split", [kv, g.i64([1, 1])], n_out=2, axis=0))
    o = g.op("MatMul", [oc.softmax(g, g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])), v])
    o = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), g.i64([-1, c])])
    o = _linear(g, o, ws(pre + "cross_attn.proj.weight"), ws(pre + "cross_attn.proj.bias"))
    return g.op("Reshape", [o, g.i64([-1, n, c])])


def build_graph(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], group: GroupPlan, store: WeightStore,
                variant: str, orders: tuple[list[list[int]], list[list[int]]] | None = None) -> onnx.ModelProto:
    if variant not in VARIANTS:
        raise DycError(f"unknown ONNX variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    g = _Graph(store.onnx_dtype)
    ws = oc.Weights(cfg, sd, store)
    c = cfg.hidden_size
    cond_in = helper.make_tensor_value_info("y", g.dt, ["batch", cfg.text_len, cfg.text_channels])
    ins = oc.inputs(cfg, group, g.dt, cond_in)

    g.scope = "embed"
    x = g.op("Add", [oc.patch_embed(g, cfg, ws("x_embedder.proj.weight"), ws("x_embedder.proj.bias")),
                     ws("pos_embed").name])
    temb = oc.timestep_sinusoid(g, FREQ_DIM)
    temb = _silu(g, _linear(g, temb, ws("t_embedder.mlp.0.weight"), ws("t_embedder.mlp.0.bias")))
    temb = _linear(g, temb, ws("t_embedder.mlp.2.weight"), ws("t_embedder.mlp.2.bias"))  # [B, C]
    g.scope = "adaLN"
    t0 = g.op("Reshape", [_linear(g, _silu(g, temb), ws("t_block.1.weight"), ws("t_block.1.bias")),
                          g.i64([-1, 6, c])])  # [B, 6, C]
    g.scope = "text"
    y2d = g.op("Reshape", ["y", g.i64([-1, cfg.text_channels])])
    cond = _linear(g, y2d, ws("y_embedder.y_proj.fc1.weight"), ws("y_embedder.y_proj.fc1.bias"))
    cond = _linear(g, _gelu_tanh(g, cond), ws("y_embedder.y_proj.fc2.weight"), ws("y_embedder.y_proj.fc2.bias"))

    for l in range(cfg.depth):
        pre = block_prefix(cfg, l)
        h_order = orders[0][l] if orders else group.heads[l]
        c_order = orders[1][l] if orders else group.channels[l]
        g.scope = f"blocks.{l}.adaLN"
        mods = g.op("Add", [t0, ws(pre + "scale_shift_table").name])  # [B, 6, C]
        shift1, scale1, gate1, shift2, scale2, gate2 = (
            g.op("Squeeze", [m, g.i64([1])]) for m in g.op("Split", [mods, g.i64([1] * 6)], n_out=6, axis=1))
        g.scope = f"blocks.{l}.attn"
        h = _modulate(g, oc.layernorm(g, x, c, 1e-6), shift1, scale1)
        o = oc.self_attention(g, cfg, group, l, h, ws, pre, h_order, qkv_bias=True)
        x = g.op("Add", [x, g.op("Mul", [g.op("Unsqueeze", [gate1, g.i64([1])]), o])])
        g.scope = f"blocks.{l}.cross_attn"
        x = g.op("Add", [x, _cross_attention(g, cfg, x, cond, ws, pre)])

        def normed(_x=x, _s=shift2, _c=scale2) -> str:
            return _modulate(g, oc.layernorm(g, _x, c, 1e-6), _s, _c)

        if not cfg.dynamic:
            g.scope = f"blocks.{l}.mlp"
            f = oc.dense_mlp(g, cfg, group, l, normed(), ws, pre, c_order, exact_gelu=False)
            x = g.op("Add", [x, g.op("Mul", [g.op("Unsqueeze", [gate2, g.i64([1])]), f])])
            continue
        g.scope = f"blocks.{l}.token_selection"
        keep = oc.token_keep(g, cfg, x, ws, pre)
        g.scope = f"blocks.{l}.mlp"
        x = oc.sdt_mlp(g, cfg, group, l, x, normed, shift2, scale2, gate2, keep, ws, pre, c_order, variant, 1e-6,
                       exact_gelu=False)

    g.scope = "final"
    fm = g.op("Add", [g.op("Unsqueeze", [temb, g.i64([1])]), ws("final_layer.scale_shift_table").name])  # [B, 2, C]
    shift, scale = (g.op("Squeeze", [m, g.i64([1])]) for m in g.op("Split", [fm, g.i64([1, 1])], n_out=2, axis=1))
    h = _modulate(g, oc.layernorm(g, x, c, 1e-6), shift, scale)
    o = _linear(g, g.op("Reshape", [h, g.i64([-1, c])]), ws("final_layer.linear.weight"),
                ws("final_layer.linear.bias"))
    oc.unpatchify(g, cfg, o, cfg.out_channels, "out")
    return oc.finish(g, cfg, group, variant, ins, ws)


__all__ = ["build_graph"]
