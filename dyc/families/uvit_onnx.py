"""Export of one group's U-ViT / DyU-ViT engine to ONNX (``dyc.families.uvit``'s semantics).

Inputs as DiT's graphs: ``x``, ``t``, ``y`` (class ids; declared but unused by an unconditional
U-ViT, so every family's runtime feeds the same names), and the mask inputs where the group's
members differ. Tokens: [label,] time, patches. The long skips are ``blocks.{l}.skip/`` nodes
(``other`` MACs). In the ``trt`` variant the affine LayerNorm before the MLP enters ``dyc::SdtMlp``
as shift = bias and scale = weight − 1 (gate 1); the op's GELU is the tanh form where U-ViT's is
exact (a difference below fp16/bf16 resolution; the ``std`` variant, which ``dyc verify`` checks,
is exact).
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx
import torch
from onnx import TensorProto, helper

from ..compiler.export import VARIANTS, WeightStore, _Graph, _linear
from ..compiler.plan import GroupPlan
from ..config import ModelConfig
from ..errors import DycError
from . import onnx_common as oc
from .uvit import LN_EPS, block_prefix


def build_graph(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], group: GroupPlan, store: WeightStore,
                variant: str, orders: tuple[list[list[int]], list[list[int]]] | None = None) -> onnx.ModelProto:
    if variant not in VARIANTS:
        raise DycError(f"unknown ONNX variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    g = _Graph(store.onnx_dtype)
    ws = oc.Weights(cfg, sd, store)
    c, depth, k = cfg.hidden_size, cfg.depth, cfg.depth // 2
    ins = oc.inputs(cfg, group, g.dt, helper.make_tensor_value_info("y", TensorProto.INT64, ["batch"]))

    g.scope = "embed"
    patches = oc.patch_embed(g, cfg, ws("patch_embed.proj.weight"), ws("patch_embed.proj.bias"))
    temb = oc.timestep_sinusoid(g, c)  # [B, C]: the time token, and what the TDW routers read
    tokens = [g.op("Unsqueeze", [temb, g.i64([1])]), patches]
    if cfg.num_classes > 0:
        tokens.insert(0, g.op("Unsqueeze", [g.op("Gather", [ws("label_emb.weight").name, "y"], axis=0),
                                            g.i64([1])]))
    x = g.op("Add", [g.op("Concat", tokens, axis=1), ws("pos_embed").name])
    rows = g.op("Shape", [temb])  # [B, C]: expands the LayerNorm affine into SdtMlp's per-row shift/scale

    skips: list[str] = []
    for l in range(depth):
        pre = block_prefix(cfg, l)
        h_order = orders[0][l] if orders else group.heads[l]
        c_order = orders[1][l] if orders else group.channels[l]
        if l > k:
            g.scope = f"blocks.{l}.skip"
            cat = g.op("Reshape", [g.op("Concat", [x, skips.pop()], axis=-1), g.i64([-1, 2 * c])])
            x = g.op("Reshape", [_linear(g, cat, ws(pre + "skip_linear.weight"), ws(pre + "skip_linear.bias")),
                                 g.i64([-1, cfg.num_tokens, c])])
        g.scope = f"blocks.{l}.attn"
        h = oc.layernorm(g, x, c, LN_EPS, ws(pre + "norm1.weight"), ws(pre + "norm1.bias"))
        x = g.op("Add", [x, oc.self_attention(g, cfg, group, l, h, ws, pre, h_order, cfg.qkv_bias)])

        def normed(_x=x, _pre=pre) -> str:
            return oc.layernorm(g, _x, c, LN_EPS, ws(_pre + "norm2.weight"), ws(_pre + "norm2.bias"))

        if not cfg.dynamic:
            g.scope = f"blocks.{l}.mlp"
            x = g.op("Add", [x, oc.dense_mlp(g, cfg, group, l, normed(), ws, pre, c_order, exact_gelu=True)])
        else:
            g.scope = f"blocks.{l}.token_selection"
            keep = oc.token_keep(g, cfg, x, ws, pre)
            g.scope = f"blocks.{l}.mlp"
            shift = scale = ""
            if variant == "trt":
                shift = g.op("Expand", [ws(pre + "norm2.bias").name, rows])
                scale = g.op("Expand", [g.op("Sub", [ws(pre + "norm2.weight").name, g.const(1.0)]), rows])
            x = oc.sdt_mlp(g, cfg, group, l, x, normed, shift, scale, None, keep, ws, pre, c_order, variant, LN_EPS,
                           exact_gelu=True)
        if l < k:
            skips.append(x)

    g.scope = "final"
    h = oc.layernorm(g, x, c, LN_EPS, ws("norm.weight"), ws("norm.bias"))
    o = _linear(g, g.op("Reshape", [h, g.i64([-1, c])]), ws("decoder_pred.weight"), ws("decoder_pred.bias"))
    width = cfg.patch_size**2 * cfg.in_channels
    o = g.op("Reshape", [o, g.i64([-1, cfg.num_tokens, width])])
    o = g.op("Slice", [o, g.i64([cfg.extra_tokens]), g.i64([cfg.num_tokens]), g.i64([1])])  # drop the extras
    o = g.op("Reshape", [o, g.i64([-1, width])])
    if cfg.final_conv:
        oc.unpatchify(g, cfg, o, cfg.in_channels, "patches")
        g.nodes[-1].name = "final/unpatchify"
        conv_in = ["patches", ws("final_layer.weight").name, ws("final_layer.bias").name]
        if g.dt == TensorProto.BFLOAT16:
            conv_in = [g.op("Cast", [v], to=TensorProto.FLOAT) for v in conv_in]
            y = g.op("Conv", conv_in, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
            g.nodes.append(helper.make_node("Cast", [y], ["out"], name="final/out", to=g.dt))
        else:
            g.nodes.append(helper.make_node("Conv", conv_in, ["out"], name="final/out", kernel_shape=[3, 3],
                                            pads=[1, 1, 1, 1]))
    else:
        oc.unpatchify(g, cfg, o, cfg.in_channels, "out")
    return oc.finish(g, cfg, group, variant, ins, ws)


__all__ = ["build_graph"]
