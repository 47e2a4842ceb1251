"""The ``cuda`` variant of a group's graph: ONNX Runtime's CUDA execution provider, fast.

Same interface and semantics as the ``std`` graph (``export.build_graph``), other operators:

* SDT is ``dyc::SdtMlp`` (the plugin's CUDA kernel through the ONNX Runtime custom-op library
  ``libdyc_ort_ops.so``), with ``shared_channel_mask=1``: a sampler call runs one timestep, so
  every row of ``channel_mask`` is the same and GEMM1 runs as one plain GEMM;
* attention is ``com.microsoft.MultiHeadAttention`` on Q, K and V [B, N, heads·Dh], three GEMMs
  whose bias is a weight row (below): flash attention on sm80+ for fp16/bf16 reads them as they are,
  with no unpack or bias pass (the packed QKV form cost an ``AddBiasUnpack`` pass per layer, 0.73 ms
  of a DiT-XL/2 batch-32 step on the H200); the same node runs on ORT's CPU and fp32 CUDA kernels;
* patchify is a GEMM on the conv weight's bytes seen as [C, C_in·p·p] (no cuDNN, and bf16 works);
* the plain DiT's MLP uses ``com.microsoft.FastGelu`` with fc1's bias (tanh GELU in one kernel);
* the glue between them is one pass each (``libdyc_ort_ops.so``; ORT's stock ops took 3-5 passes
  over [B, N, C] and a broadcast copy of the bias before every biased GEMM, 41 % of a step's kernel
  time on the H200, bench/RESULTS.md): ``dyc::LnModulate`` is LayerNorm + modulate, and
  ``dyc::GatedResidual`` the residual ``x + gate·(y + bias)`` that takes proj's (and the plain
  MLP's fc2) bias, so those GEMMs run without one; ``dyc::TokenKeep`` is the token router after its
  first, bias-free GEMM (bias, ReLU, the one-output GEMM, sigmoid and threshold, one warp per
  token); before qkv, LnModulate appends a ones column (zero-padded to a multiple of 8) and the q,
  k, v weights carry their bias as the matching row (``blocks.L.{q,k,v}_w_aug``: the qkv weight
  stored once more in this layout, [heads·Dh, C + 8]).

Like ``SdtMlp``'s ``shared_channel_mask``, the head mask is read from row 0 (a sampler call runs one
timestep): it zeroes the off heads' columns of proj's weight, [C, heads·Dh], instead of the
attention output, [B·N, heads·Dh]. The backends declare it (``mixed_timesteps`` False).

Every other weight references the tensor the ``std`` graph stores (same key in ``weights.bin``).
Shapes are static per (group, batch) and no node needs the host, which CUDA graphs require.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import onnx
import torch
from onnx import TensorProto, helper

from ..config import ModelConfig
from ..model import FREQ_DIM
from .export import (
    CUSTOM_DOMAIN,
    OPSET,
    WeightStore,
    _Graph,
    _linear,
    _mask_slice,
    _silu,
    sliced_tensor,
)
from .plan import GroupPlan
from .slice import engine_tensor

MS_DOMAIN = "com.microsoft"


def required_ops_abi(model: bytes) -> int:
    """The ``libdyc_ort_ops.so`` ABI (its ``dyc_ort_ops_abi()``) a serialized graph needs: 2 where it
    uses ``TokenKeep`` or LnModulate's ``ones_column`` (the op and attribute names appear verbatim in
    the protobuf; the weights are external, so nothing else can hold them), else 1."""
    return 2 if b"TokenKeep" in model or b"ones_column" in model else 1


# qkv's GEMMs take their bias as one more weight row: LnModulate appends a ones column, padded
# with zeros to a multiple of 8 (tensor-core alignment), so q, k, v leave their GEMMs ready for
# flash attention, with no bias pass over them
ONES_COLUMN = 8


def augmented_width(c: int) -> int:
    """Width of LnModulate's output with ``ones_column=ONES_COLUMN``: C, a ones column, zeros."""
    return (c + ONES_COLUMN) // ONES_COLUMN * ONES_COLUMN


def _ln_modulate(g: _Graph, x: str, shift: str, scale: str, ones_column: int = 0) -> str:
    """LayerNorm(x) · (1 + scale) + shift over x [B, N, C], one kernel (``ones_column``: see ONES_COLUMN)."""
    extra = {"ones_column": ones_column} if ones_column else {}
    return g.op("LnModulate", [x, shift, scale], domain=CUSTOM_DOMAIN, eps=1e-6, **extra)


def _gated_residual(g: _Graph, x: str, gate: str, y: str, bias: str | None = None) -> str:
    """x + gate · (y + bias) over [B, N, C], one kernel."""
    return g.op("GatedResidual", [x, gate, y] + ([bias] if bias else []), domain=CUSTOM_DOMAIN)


def _gemm(g: _Graph, x2d: str, w: TensorProto) -> str:
    """x [M, in] · Wᵀ without a bias (its add is fused into what follows)."""
    return g.op("Gemm", [x2d, w.name], transB=1)


def build_cuda_graph(
    cfg: ModelConfig, sd: Mapping[str, torch.Tensor], group: GroupPlan, store: WeightStore,
    orders: tuple[list[list[int]], list[list[int]]] | None = None,
) -> onnx.ModelProto:
    """The ``cuda`` ONNX model of one group's engine (interface of ``export.build_graph``)."""
    g = _Graph(store.onnx_dtype)
    dt = store.onnx_dtype
    c, n, p, d = cfg.hidden_size, cfg.num_tokens, cfg.patch_size, cfg.head_dim
    grid, oc, cin = cfg.input_size // p, cfg.out_channels, cfg.in_channels
    c_aug = augmented_width(c)
    inits: dict[str, TensorProto] = {}

    def w(name: str) -> TensorProto:
        if name not in inits:
            inits[name] = store.ref(name, name, lambda: sd[name])
        return inits[name]

    inputs = [
        helper.make_tensor_value_info("x", dt, ["batch", cin, cfg.input_size, cfg.input_size]),
        helper.make_tensor_value_info("t", TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info("y", TensorProto.INT64, ["batch"]),
    ]
    if group.needs_head_mask:
        inputs.append(helper.make_tensor_value_info("head_mask", dt, ["batch", cfg.depth, group.head_slots]))
    if group.needs_channel_mask:
        inputs.append(helper.make_tensor_value_info("channel_mask", dt, ["batch", cfg.depth, group.channel_slots]))

    # ---- embeddings: patchify as a GEMM over [B·N, C_in·p·p] rows ---------------------------
    g.scope = "embed"
    conv_w = w("x_embedder.proj.weight")  # stored [C, C_in, p, p]: the same bytes as [C, C_in·p·p]
    del conv_w.dims[:]
    conv_w.dims.extend([c, cin * p * p])
    xp = g.op("Reshape", ["x", g.i64([-1, cin, grid, p, grid, p])])
    xp = g.op("Reshape", [g.op("Transpose", [xp], perm=[0, 2, 4, 1, 3, 5]), g.i64([-1, cin * p * p])])
    xe = g.op("Reshape", [_gemm(g, xp, conv_w), g.i64([-1, n, c])])
    x = g.op("Add", [xe, g.op("Add", [w("pos_embed").name, w("x_embedder.proj.bias").name])])  # [N, C] + [C]
    half = FREQ_DIM // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    tf = g.op("Unsqueeze", [g.op("Cast", ["t"], to=TensorProto.FLOAT), g.i64([1])])
    args = g.op("Mul", [tf, g.const(freqs.numpy()[None], TensorProto.FLOAT)])
    temb = g.op("Concat", [g.op("Cos", [args]), g.op("Sin", [args])], axis=1)
    if dt != TensorProto.FLOAT:
        temb = g.op("Cast", [temb], to=dt)
    temb = _silu(g, _linear(g, temb, w("t_embedder.mlp.0.weight"), w("t_embedder.mlp.0.bias")))
    temb = _linear(g, temb, w("t_embedder.mlp.2.weight"), w("t_embedder.mlp.2.bias"))
    yemb = g.op("Gather", [w("y_embedder.embedding_table.weight").name, "y"], axis=0)
    cond = _silu(g, g.op("Add", [temb, yemb]))

    for l in range(cfg.depth):
        pre = f"blocks.{l}."
        heads, chans = group.heads[l], group.channels[l]
        hn, gn = len(heads), len(chans)
        h_order = orders[0][l] if orders else heads
        c_order = orders[1][l] if orders else chans

        sw = functools.partial(sliced_tensor, store, inits, cfg, sd, l)

        g.scope = pre + "adaLN"
        mod = _linear(g, cond, w(pre + "adaLN_modulation.1.weight"), w(pre + "adaLN_modulation.1.bias"))
        shift1, scale1, gate1, shift2, scale2, gate2 = g.op("Split", [mod, g.i64([c] * 6)], n_out=6, axis=1)

        g.scope = pre + "attn"
        h = g.op("Reshape", [_ln_modulate(g, x, shift1, scale1, ONES_COLUMN), g.i64([-1, c_aug])])
        qkv = []
        for part, what in enumerate(("q_w_aug", "k_w_aug", "v_w_aug")):  # rows [hn, Dh]: prefixes shared
            wq = sw(pre + what, what, heads, h_order, d, functools.partial(_qkv_aug, cfg, sd, l, part))
            qkv.append(g.op("Reshape", [_gemm(g, h, wq), g.i64([-1, n, hn * d])]))
        o = g.op("MultiHeadAttention", qkv, domain=MS_DOMAIN, num_heads=hn, scale=1.0 / math.sqrt(d))
        proj_w = sw(pre + "attn.proj.weight", "proj_w", heads, h_order, None).name
        if group.vary_head[l]:  # row 0's mask on proj's columns: [1, hn] -> [1, hn·Dh]
            hm = g.op("Slice", [_mask_slice(g, "head_mask", l, hn), g.i64([0]), g.i64([1]), g.i64([0])])
            hm = g.op("Expand", [g.op("Reshape", [hm, g.i64([1, hn, 1])]), g.i64([1, hn, d])])
            proj_w = g.op("Mul", [proj_w, g.op("Reshape", [hm, g.i64([1, hn * d])])])
        o = g.op("Gemm", [g.op("Reshape", [o, g.i64([-1, hn * d])]), proj_w], transB=1)
        x = _gated_residual(g, x, gate1, g.op("Reshape", [o, g.i64([-1, n, c])]), w(pre + "attn.proj.bias").name)

        gs = cfg.group_size
        fc1w = sw(pre + "mlp.fc1.weight", "fc1_w", chans, c_order, gs)
        fc1b = sw(pre + "mlp.fc1.bias", "fc1_b", chans, c_order, gs)
        fc2w = sw(pre + "mlp.fc2.weight", "fc2_w", chans, c_order, None)
        fc2b = w(pre + "mlp.fc2.bias")
        if not cfg.dynamic:
            g.scope = pre + "mlp"
            h = _ln_modulate(g, x, shift2, scale2)
            f = g.op("FastGelu", [_gemm(g, g.op("Reshape", [h, g.i64([-1, c])]), fc1w), fc1b.name], domain=MS_DOMAIN)
            x = _gated_residual(g, x, gate2, g.op("Reshape", [_gemm(g, f, fc2w), g.i64([-1, n, c])]), fc2b.name)
            continue

        g.scope = pre + "token_selection"
        ts = pre + "token_selection.mlp_head."
        r = _gemm(g, g.op("Reshape", [x, g.i64([-1, c])]), w(ts + "0.weight"))  # [B·N, C/16], no bias
        keep = g.op("TokenKeep", [g.op("Reshape", [r, g.i64([-1, n, cfg.token_hidden])]), w(ts + "0.bias").name,
                                  w(ts + "2.weight").name, w(ts + "2.bias").name], domain=CUSTOM_DOMAIN)  # [B, N]

        g.scope = pre + "mlp"
        ins = [x, shift2, scale2, gate2, keep, fc1w.name, fc1b.name, fc2w.name, fc2b.name]
        if group.vary_channel[l]:
            ins.append(_mask_slice(g, "channel_mask", l, gn))
        x = g.op("SdtMlp", ins, domain=CUSTOM_DOMAIN, group_size=gs, eps=1e-6, shared_channel_mask=1)
        g.value_info.append(helper.make_tensor_value_info(x, dt, ["batch", n, c]))

    g.scope = "final.adaLN"
    fm = _linear(g, cond, w("final_layer.adaLN_modulation.1.weight"), w("final_layer.adaLN_modulation.1.bias"))
    g.scope = "final"
    shift, scale = g.op("Split", [fm, g.i64([c, c])], n_out=2, axis=1)
    h = _ln_modulate(g, x, shift, scale)
    o = _linear(g, g.op("Reshape", [h, g.i64([-1, c])]), w("final_layer.linear.weight"), w("final_layer.linear.bias"))
    o = g.op("Transpose", [g.op("Reshape", [o, g.i64([-1, grid, grid, p, p, oc])])], perm=[0, 5, 1, 3, 2, 4])
    g.nodes.append(helper.make_node("Reshape", [o, g.i64([-1, oc, grid * p, grid * p])], ["out"], name="final/out"))

    outputs = [helper.make_tensor_value_info("out", dt, ["batch", oc, cfg.input_size, cfg.input_size])]
    graph = helper.make_graph(g.nodes, f"{cfg.name}-group{group.index}-cuda", inputs, outputs,
                              initializer=list(inits.values()) + g.inits, value_info=g.value_info)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1), helper.make_opsetid(CUSTOM_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="dyc")
    model.ir_version = 8
    return model


def _qkv_aug(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], layer: int, part: int, heads: list[int]
             ) -> torch.Tensor:
    """Layer ``layer``'s q (``part`` 0), k (1) or v (2) weight for ``heads``, [heads·Dh, C'], each row
    followed by its bias and zeros up to ``augmented_width(C)`` (the ones column of LnModulate's output
    meets the bias)."""
    c, d = cfg.hidden_size, cfg.head_dim
    w = engine_tensor(cfg, sd, layer, "qkv_w", heads).view(len(heads), 3, d, c)[:, part].reshape(-1, c)
    b = engine_tensor(cfg, sd, layer, "qkv_b", heads).view(len(heads), 3, d)[:, part].reshape(-1, 1)
    return torch.cat([w, b, w.new_zeros(w.shape[0], augmented_width(c) - c - 1)], dim=1)


def cpu_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with every packed-QKV MultiHeadAttention fed split Q, K, V ([B, N, heads·Dh]
    each), the form ONNX Runtime's CPU kernel takes. Same maths. The cuda graphs of this dyc feed
    split Q, K, V already (it leaves them as they are); bundles compiled before it packed them."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        packed = len(node.input) == 1 or (len(node.input) >= 3 and not node.input[1] and not node.input[2])
        if node.op_type == "MultiHeadAttention" and node.domain == MS_DOMAIN and packed:
            base = f"{node.name}/split_qkv"
            split = f"{base}:sizes"
            out.graph.initializer.append(helper.make_tensor(split, TensorProto.INT64, [3], [1, 1, 1]))
            shape = f"{base}:shape"
            out.graph.initializer.append(helper.make_tensor(shape, TensorProto.INT64, [3], [0, 0, -1]))
            parts = [f"{base}:{i}" for i in range(3)]
            nodes.append(helper.make_node("Split", [node.input[0], split], parts, name=base, axis=3))
            flat = [f"{base}:flat{i}" for i in range(3)]
            for i in range(3):  # [B, N, heads, 1, Dh] -> [B, N, heads·Dh]
                nodes.append(helper.make_node("Reshape", [parts[i], shape], [flat[i]], name=f"{base}/reshape{i}"))
            new = helper.make_node("MultiHeadAttention", flat + list(node.input[3:]), list(node.output),
                                   name=node.name, domain=MS_DOMAIN)  # the bias, [q | k | v], as it was
            new.attribute.extend(node.attribute)
            nodes.append(new)
        else:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out
