"""ONNX building blocks the families' exporters share (``uvit_onnx``, ``pixart_onnx``).

The same graph contract as DiT's (``dyc.compiler.export``): batch-dynamic inputs ``x``, ``t``,
``y`` (the family's condition) and, where a group's members differ, ``head_mask`` /
``channel_mask``; one output ``out``; initializers in the bundle's one ``weights.bin`` (sliced
qkv / fc1 as prefixes of a layer's shared unit order); SDT as gather → MLP → scatter-add in the
``std`` variant and as ``dyc::SdtMlp`` in ``trt``; node names scoped by model part, as
``dyc.compiler.onnx_flops`` attributes MACs (``blocks.{l}.skip/`` and ``blocks.{l}.cross_attn/``
count as ``other``, ``text/`` too, ``adaLN/`` as ``adaln``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..compiler.export import (
    CUSTOM_DOMAIN,
    OPSET,
    WeightStore,
    _gelu_tanh,
    _Graph,
    _linear,
    _mask_slice,
)
from ..compiler.plan import GroupPlan
from ..compiler.slice import group_units, head_cols, is_prefix, qkv_rows_head_major
from ..config import ModelConfig


def engine_tensor(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], prefix: str, what: str,
                  units: list[int]) -> torch.Tensor:
    """One sliced tensor of the block at ``prefix`` in the engine layout (as ``slice.engine_tensor``)."""
    if what in ("qkv_w", "qkv_b"):
        src = sd[prefix + ("attn.qkv.weight" if what == "qkv_w" else "attn.qkv.bias")]
        return src.index_select(0, qkv_rows_head_major(cfg, units))
    if what == "proj_w":
        return sd[prefix + "attn.proj.weight"].index_select(1, head_cols(cfg, units))
    if what in ("fc1_w", "fc1_b"):
        return sd[prefix + ("mlp.fc1.weight" if what == "fc1_w" else "mlp.fc1.bias")].index_select(
            0, group_units(cfg, units))
    if what == "fc2_w":
        return sd[prefix + "mlp.fc2.weight"].index_select(1, group_units(cfg, units))
    raise ValueError(what)


class Weights:
    """The initializers of one graph: whole checkpoint tensors and sliced ones (shared prefixes)."""

    def __init__(self, cfg: ModelConfig, sd: Mapping[str, torch.Tensor], store: WeightStore):
        self.cfg, self.sd, self.store = cfg, sd, store
        self.inits: dict[str, TensorProto] = {}

    def __call__(self, name: str, make: Callable[[], torch.Tensor] | None = None) -> TensorProto:
        """An unsliced tensor (``make`` builds a derived one, stored under ``name``)."""
        if name not in self.inits:
            self.inits[name] = self.store.ref(name, name, make or (lambda: self.sd[name]))
        return self.inits[name]

    def sliced(self, prefix: str, name: str, what: str, units: list[int], order: list[int],
               rows_per_unit: int | None) -> TensorProto:
        """A sliced tensor: a prefix of the layer's shared copy where ``units`` lead ``order``."""
        if name in self.inits:
            return self.inits[name]
        shared = bool(rows_per_unit) and is_prefix(units, order)
        ids = ",".join(map(str, order if shared else units))
        key = f"{prefix}{what}[{ids}]"
        if shared:
            tp = self.store.ref(name, key, lambda: engine_tensor(self.cfg, self.sd, prefix, what, order),
                                len(units) * rows_per_unit)
        else:
            tp = self.store.ref(name, key, lambda: engine_tensor(self.cfg, self.sd, prefix, what, units))
        self.inits[name] = tp
        return tp


def gemm(g: _Graph, x2d: str, w: TensorProto, b: TensorProto | None) -> str:
    if b is None:
        return g.op("Gemm", [x2d, w.name], transB=1)
    return _linear(g, x2d, w, b)


def layernorm(g: _Graph, x: str, c: int, eps: float, weight: TensorProto | None = None,
              bias: TensorProto | None = None) -> str:
    """LayerNormalization over the last axis (fp32 statistics); affine when weight/bias are given."""
    ins = [x, weight.name if weight is not None else g.const(np.ones(c))]
    if bias is not None:
        ins.append(bias.name)
    return g.op("LayerNormalization", ins, axis=-1, epsilon=eps, stash_type=1)


def gelu_erf(g: _Graph, x: str) -> str:
    """0.5·x·(1 + erf(x/√2)): torch's exact GELU."""
    e = g.op("Erf", [g.op("Mul", [x, g.const(1.0 / math.sqrt(2.0))])])
    return g.op("Mul", [g.op("Mul", [x, g.const(0.5)]), g.op("Add", [e, g.const(1.0)])])


def timestep_sinusoid(g: _Graph, dim: int) -> str:
    """[cos(t·f), sin(t·f)] of the input ``t``, f_k = 10000^(-k/half), in fp32 then the graph dtype."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)  # as the eager model
    tf = g.op("Unsqueeze", [g.op("Cast", ["t"], to=TensorProto.FLOAT), g.i64([1])])
    args = g.op("Mul", [tf, g.const(freqs.numpy()[None], TensorProto.FLOAT)])
    emb = g.op("Concat", [g.op("Cos", [args]), g.op("Sin", [args])], axis=1)
    return g.op("Cast", [emb], to=g.dt) if g.dt != TensorProto.FLOAT else emb


def patch_embed(g: _Graph, cfg: ModelConfig, w: TensorProto, b: TensorProto) -> str:
    """Conv patchify -> [B, N_patches, C] (bf16 patchify in fp32: opset-17 Conv has no bf16)."""
    p, c = cfg.patch_size, cfg.hidden_size
    conv_in = ["x", w.name, b.name]
    if g.dt == TensorProto.BFLOAT16:
        conv_in = [g.op("Cast", [v], to=TensorProto.FLOAT) for v in conv_in]
    xe = g.op("Conv", conv_in, kernel_shape=[p, p], strides=[p, p])
    if g.dt == TensorProto.BFLOAT16:
        xe = g.op("Cast", [xe], to=g.dt)
    return g.op("Transpose", [g.op("Reshape", [xe, g.i64([0, c, cfg.num_patches])])], perm=[0, 2, 1])


def softmax(g: _Graph, scores: str) -> str:
    if g.dt != TensorProto.FLOAT:  # softmax in fp32
        return g.op("Cast", [g.op("Softmax", [g.op("Cast", [scores], to=TensorProto.FLOAT)], axis=-1)], to=g.dt)
    return g.op("Softmax", [scores], axis=-1)


def self_attention(g: _Graph, cfg: ModelConfig, group: GroupPlan, l: int, h: str, ws: Weights, prefix: str,
                   order: list[int], qkv_bias: bool) -> str:
    """Attention on the group's union heads of layer l, the head mask input where members differ; the
    output of ``proj`` [B, N, C] (no residual)."""
    c, n, d = cfg.hidden_size, cfg.num_tokens, cfg.head_dim
    heads = group.heads[l]
    hn = len(heads)
    qkv_w = ws.sliced(prefix, prefix + "attn.qkv.weight", "qkv_w", heads, order, 3 * d)  # rows head-major
    qkv_b = ws.sliced(prefix, prefix + "attn.qkv.bias", "qkv_b", heads, order, 3 * d) if qkv_bias else None
    qkv = gemm(g, g.op("Reshape", [h, g.i64([-1, c])]), qkv_w, qkv_b)
    qkv = g.op("Transpose", [g.op("Reshape", [qkv, g.i64([-1, n, hn, 3, d])])], perm=[3, 0, 2, 1, 4])
    q, k, v = (g.op("Squeeze", [s, g.i64([0])]) for s in g.op("Split", [qkv, g.i64([1, 1, 1])], n_out=3, axis=0))
    q = g.op("Mul", [q, g.const(1.0 / math.sqrt(d))])  # scale q first: keeps fp16 scores in range
    o = g.op("MatMul", [softmax(g, g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])), v])
    if group.vary_head[l]:
        o = g.op("Mul", [o, g.op("Reshape", [_mask_slice(g, "head_mask", l, hn), g.i64([-1, hn, 1, 1])])])
    o = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), g.i64([-1, hn * d])])
    proj_w = ws.sliced(prefix, prefix + "attn.proj.weight", "proj_w", heads, order, None)  # [C, hn·Dh]
    return g.op("Reshape", [_linear(g, o, proj_w, ws(prefix + "attn.proj.bias")), g.i64([-1, n, c])])


def token_keep(g: _Graph, cfg: ModelConfig, x: str, ws: Weights, prefix: str) -> str:
    """SDT router: sigmoid(mlp_head(x)) > 0.5, [B, N] bool (standard ops in both variants)."""
    c, n = cfg.hidden_size, cfg.num_tokens
    r = _linear(g, g.op("Reshape", [x, g.i64([-1, c])]), ws(prefix + "token_selection.mlp_head.0.weight"),
                ws(prefix + "token_selection.mlp_head.0.bias"))
    r = _linear(g, g.op("Relu", [r]), ws(prefix + "token_selection.mlp_head.2.weight"),
                ws(prefix + "token_selection.mlp_head.2.bias"))
    return g.op("Greater", [g.op("Sigmoid", [g.op("Reshape", [r, g.i64([-1, n])])]), g.const(0.5)])


def mlp_weights(cfg: ModelConfig, group: GroupPlan, l: int, ws: Weights, prefix: str, order: list[int]):
    chans = group.channels[l]
    gs = cfg.group_size
    return (ws.sliced(prefix, prefix + "mlp.fc1.weight", "fc1_w", chans, order, gs),
            ws.sliced(prefix, prefix + "mlp.fc1.bias", "fc1_b", chans, order, gs),
            ws.sliced(prefix, prefix + "mlp.fc2.weight", "fc2_w", chans, order, None),  # [C, Hs]: per unit set
            ws(prefix + "mlp.fc2.bias"))


def mlp_hidden(g: _Graph, cfg: ModelConfig, rows2d: str, fc1w: TensorProto, fc1b: TensorProto, gn: int,
               cm: str | None, bidx: str | None, exact_gelu: bool) -> str:
    """fc1 on [M, C] rows, the channel-group mask (per row's image, ``bidx``) where given, GELU."""
    f = _linear(g, rows2d, fc1w, fc1b)
    if cm is not None:
        hs, gs = gn * cfg.group_size, cfg.group_size
        m = cm if bidx is None else g.op("Gather", [cm, bidx], axis=0)
        f = g.op("Reshape", [g.op("Mul", [g.op("Reshape", [f, g.i64([-1, gn, gs])]),
                                          g.op("Unsqueeze", [m, g.i64([2])])]), g.i64([-1, hs])])
    return gelu_erf(g, f) if exact_gelu else _gelu_tanh(g, f)


def sdt_mlp(g: _Graph, cfg: ModelConfig, group: GroupPlan, l: int, x: str, normed: Callable[[], str],
            shift: str, scale: str, gate: str | None, keep: str, ws: Weights, prefix: str, order: list[int],
            variant: str, eps: float, exact_gelu: bool) -> str:
    """x + keep·gate·MLP(normed x) over the group's union channel groups.

    ``normed()`` builds the MLP's input (LN + modulate) for the ``std`` decomposition; ``trt`` hands
    x, shift [B, C], scale [B, C], gate [B, C] to ``dyc::SdtMlp`` (whose GELU is the tanh form).
    ``gate`` None: no gate (a ones [B, C] tensor for the op).
    """
    c, n = cfg.hidden_size, cfg.num_tokens
    gn = len(group.channels[l])
    fc1w, fc1b, fc2w, fc2b = mlp_weights(cfg, group, l, ws, prefix, order)
    cm = _mask_slice(g, "channel_mask", l, gn) if group.vary_channel[l] else None
    if variant == "trt":
        if gate is None:
            gate = g.op("Expand", [g.const(np.ones(c)), g.op("Shape", [shift])])
        ins = [x, shift, scale, gate, g.op("Cast", [keep], to=g.dt), fc1w.name, fc1b.name, fc2w.name, fc2b.name]
        if cm is not None:
            ins.append(cm)
        y = g.op("SdtMlp", ins, domain=CUSTOM_DOMAIN, group_size=cfg.group_size, eps=eps)
        g.value_info.append(helper.make_tensor_value_info(y, g.dt, ["batch", n, c]))
        return y
    idx = g.op("Transpose", [g.op("NonZero", [keep])], perm=[1, 0])  # [K, 2] (batch, token)
    bidx = g.op("Gather", [idx, g.i64(0)], axis=1)
    f = mlp_hidden(g, cfg, g.op("GatherND", [normed(), idx]), fc1w, fc1b, gn, cm, bidx, exact_gelu)
    f = _linear(g, f, fc2w, fc2b)  # [K, C]
    if gate is not None:
        f = g.op("Mul", [f, g.op("Gather", [gate, bidx], axis=0)])
    # gather-add-scatter: ScatterND's reduction='add' has no fp16 kernel in ORT's CPU EP
    return g.op("ScatterND", [x, idx, g.op("Add", [g.op("GatherND", [x, idx]), f])])


def dense_mlp(g: _Graph, cfg: ModelConfig, group: GroupPlan, l: int, h: str, ws: Weights, prefix: str,
              order: list[int], exact_gelu: bool) -> str:
    """The MLP on every token of a plain model (one group, every unit on), [B, N, C], no residual or gate."""
    c, n = cfg.hidden_size, cfg.num_tokens
    fc1w, fc1b, fc2w, fc2b = mlp_weights(cfg, group, l, ws, prefix, order)
    f = mlp_hidden(g, cfg, g.op("Reshape", [h, g.i64([-1, c])]), fc1w, fc1b, len(group.channels[l]), None, None,
                   exact_gelu)
    return g.op("Reshape", [_linear(g, f, fc2w, fc2b), g.i64([-1, n, c])])


def unpatchify(g: _Graph, cfg: ModelConfig, o2d: str, channels: int, out_name: str) -> None:
    """[B·N_patches, p·p·channels] (channels last within a patch) -> ``out_name`` [B, channels, S, S]."""
    p, grid = cfg.patch_size, cfg.input_size // cfg.patch_size
    o = g.op("Transpose", [g.op("Reshape", [o2d, g.i64([-1, grid, grid, p, p, channels])])], perm=[0, 5, 1, 3, 2, 4])
    g.nodes.append(helper.make_node("Reshape", [o, g.i64([-1, channels, grid * p, grid * p])], [out_name],
                                    name="final/out"))


def inputs(cfg: ModelConfig, group: GroupPlan, dt: int, condition: onnx.ValueInfoProto) -> list:
    ins = [helper.make_tensor_value_info("x", dt, ["batch", cfg.in_channels, cfg.input_size, cfg.input_size]),
           helper.make_tensor_value_info("t", TensorProto.INT64, ["batch"]), condition]
    if group.needs_head_mask:
        ins.append(helper.make_tensor_value_info("head_mask", dt, ["batch", cfg.depth, group.head_slots]))
    if group.needs_channel_mask:
        ins.append(helper.make_tensor_value_info("channel_mask", dt, ["batch", cfg.depth, group.channel_slots]))
    return ins


def finish(g: _Graph, cfg: ModelConfig, group: GroupPlan, variant: str, ins: list, ws: Weights) -> onnx.ModelProto:
    outputs = [helper.make_tensor_value_info("out", g.dt, ["batch", cfg.out_channels, cfg.input_size,
                                                            cfg.input_size])]
    graph = helper.make_graph(g.nodes, f"{cfg.name}-group{group.index}-{variant}", ins, outputs,
                              initializer=list(ws.inits.values()) + g.inits, value_info=g.value_info)
    opsets = [helper.make_opsetid("", OPSET)]
    if variant == "trt" and cfg.dynamic:
        opsets.append(helper.make_opsetid(CUSTOM_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="dyc")
    model.ir_version = 8
    return model
