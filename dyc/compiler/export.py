"""Pass 5, export: one ONNX graph per group, built directly with ``onnx.helper``.

A direct builder (rather than ``torch.onnx.export``) gives full control of the fixed DiT
architecture: exact sliced widths, the ``dyc::SdtMlp`` custom op, node names that say which
part of the model a node belongs to, and initializers that point into one bundle-wide external
data file (``weights.bin``) in which every tensor is stored once: shared weights (embeddings,
adaLN, token routers, final layer) are written once and referenced by every graph and both
variants; the sliced qkv / proj / fc1 of a group whose units are a prefix of the layer's shared
order (``slice.unit_orders``) are a byte range of one stored copy shared by all groups. Engine
layout: ``blocks.{l}.attn.qkv.weight`` rows are head-major ([h, 3, Dh] per head, unlike the
checkpoint's [3, h, Dh]); proj, fc1 and fc2 keep torch's [out, in] layout (fc2 [C, Hs] as
``dyc::SdtMlp`` takes it), so proj and fc2 slices (columns) are stored per distinct unit set.

Graph interface (batch dynamic, ``D`` = the bundle dtype):

* inputs ``x`` [B, C_in, S, S] D, ``t`` [B] int64 (original timestep), ``y`` [B] int64 (class,
  ``num_classes`` = null class); ``head_mask`` [B, L, Hu] D only if members of the group differ
  in some layer's heads (slot j of layer l = the j-th entry of ``GroupPlan.heads[l]``; slots past
  the layer's count and layers that do not vary are ignored); ``channel_mask`` [B, L, Gu] D likewise.
* output ``out`` [B, C_out, S, S] D (the model output: eps and, with learn_sigma, the variance).

Variants: ``std`` decomposes SDT into standard ops (NonZero → GatherND → MLP on the kept tokens →
gated ScatterND add); ``trt`` uses the custom op ``dyc::SdtMlp`` (contract in ``plugins/``:
inputs x, shift, scale, gate, keep, fc1_w, fc1_b, fc2_w, fc2_b[, channel_mask]; attributes
group_size, eps; output x + keep·gate·MLP). The token router itself (Sigmoid > 0.5) is standard
ops in both. A plain DiT has no SDT: both variants are the same graph.

Node names start with the part they belong to (``embed/``, ``blocks.{l}.adaLN/``,
``blocks.{l}.attn/``, ``blocks.{l}.token_selection/``, ``blocks.{l}.mlp/``, ``final.adaLN/``,
``final/``), which is
how ``onnx_flops`` attributes MACs.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..config import ModelConfig
from ..errors import DycError, UsageError
from ..model import FREQ_DIM
from .plan import GroupPlan
from .slice import engine_tensor, is_prefix

OPSET = 17
CUSTOM_DOMAIN = "dyc"
WEIGHTS_FILE = "weights.bin"
ALIGN = 4096  # page-aligned offsets let runtimes mmap external data
VARIANTS = ("std", "trt", "cuda")  # cuda: export_cuda.build_cuda_graph

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "fp32": (torch.float32, TensorProto.FLOAT),
    "fp16": (torch.float16, TensorProto.FLOAT16),
    "bf16": (torch.bfloat16, TensorProto.BFLOAT16),
}


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return dtype


class WeightStore:
    """The bundle's one external-data file. ``ref`` writes a tensor on first use only."""

    def __init__(self, path: str | os.PathLike, dtype: str):
        self.path = Path(path)
        self.torch_dtype, self.onnx_dtype = DTYPES[check_dtype(dtype)]
        self._f = open(self.path, "wb")
        self._index: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        self.bytes_written = 0  # tensor bytes, padding excluded
        self._sha = hashlib.sha256()  # of the whole file, computed while writing (XL: GBs)

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self._sha.update(data)

    def sha256(self) -> str:
        return self._sha.hexdigest()

    def size(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def __enter__(self) -> WeightStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._index)

    def ref(self, name: str, key: str, make: Callable[[], torch.Tensor], rows: int | None = None) -> TensorProto:
        """An initializer ``name`` whose data is the stored tensor ``key`` (``make()`` builds it if new).

        ``rows``: only the first ``rows`` entries along dim 0 (a prefix is a contiguous byte range, so
        groups whose units are a prefix of a layer's shared order reference one stored copy).
        """
        if key not in self._index:
            t = make().detach().to(self.torch_dtype).contiguous()
            data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            pad = (-self._f.tell()) % ALIGN
            if pad:
                self._write(b"\0" * pad)
            off = self._f.tell()
            self._write(data)
            self.bytes_written += len(data)
            self._index[key] = (off, len(data), tuple(t.shape))
        off, length, shape = self._index[key]
        if rows is not None:
            if not 0 < rows <= shape[0]:
                raise ValueError(f"{name}: prefix of {rows} rows of a tensor of {shape[0]}")
            length = length // shape[0] * rows
            shape = (rows, *shape[1:])
        tp = TensorProto()
        tp.name = name
        tp.data_type = self.onnx_dtype
        tp.dims.extend(shape)
        tp.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(off)), ("length", str(length))):
            e = tp.external_data.add()
            e.key, e.value = k, v
        return tp


class _Graph:
    """Minimal graph builder: unique value names, node names scoped by model part."""

    def __init__(self, onnx_dtype: int):
        self.dt = onnx_dtype
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self.scope = ""
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> list[str] | str:
        self._n += 1
        base = f"{self.scope}/{op_type}_{self._n}"
        outs = [f"{base}:{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype: int | None = None) -> str:
        """A small inline constant (shapes, scalars); deduplicated by value."""
        dtype = self.dt if dtype is None else dtype
        arr = np.asarray(value)
        key = (dtype, arr.shape, np.asarray(value, np.float64).tobytes())
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            if dtype == TensorProto.INT64:
                tp = helper.make_tensor(name, dtype, arr.shape, arr.astype(np.int64).ravel().tolist())
            else:
                t = torch.as_tensor(np.asarray(value, np.float32)).to(_torch_of(dtype)).contiguous()
                raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
                tp = helper.make_tensor(name, dtype, list(t.shape), raw, raw=True)
            self.inits.append(tp)
            self._consts[key] = name
        return self._consts[key]

    def i64(self, value) -> str:
        return self.const(np.asarray(value, dtype=np.int64), TensorProto.INT64)


def _torch_of(onnx_dtype: int) -> torch.dtype:
    for td, od in DTYPES.values():
        if od == onnx_dtype:
            return td
    return torch.float32


def _silu(g: _Graph, x: str) -> str:
    return g.op("Mul", [x, g.op("Sigmoid", [x])])


def _gelu_tanh(g: _Graph, x: str) -> str:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), torch's approximate='tanh' formula."""
    x3 = g.op("Mul", [g.op("Mul", [x, x]), x])
    inner = g.op("Add", [x, g.op("Mul", [x3, g.const(0.044715)])])
    th = g.op("Tanh", [g.op("Mul", [inner, g.const(math.sqrt(2.0 / math.pi))])])
    return g.op("Mul", [g.op("Mul", [x, g.const(0.5)]), g.op("Add", [th, g.const(1.0)])])


def _layernorm(g: _Graph, x: str, c: int) -> str:
    # no affine in DiT: scale 1, no bias; stash_type=1 keeps mean/variance in fp32 for fp16/bf16
    return g.op("LayerNormalization", [x, g.const(np.ones(c))], axis=-1, epsilon=1e-6, stash_type=1)


def _modulate(g: _Graph, x: str, shift: str, scale: str) -> str:
    s1 = g.op("Unsqueeze", [g.op("Add", [scale, g.const(1.0)]), g.i64([1])])
    return g.op("Add", [g.op("Mul", [x, s1]), g.op("Unsqueeze", [shift, g.i64([1])])])


def _linear(g: _Graph, x2d: str, w: TensorProto, b: TensorProto) -> str:
    """x [M, in] · Wᵀ + b with W in torch's [out, in] layout (Gemm transB): no transposed copy."""
    return g.op("Gemm", [x2d, w.name, b.name], transB=1)


def _mask_slice(g: _Graph, mask_input: str, layer: int, width: int) -> str:
    """[B, L, U] mask input -> this layer's first ``width`` slots, [B, width]."""
    m = g.op("Gather", [mask_input, g.i64(layer)], axis=1)
    return g.op("Slice", [m, g.i64([0]), g.i64([width]), g.i64([1])])


def sliced_tensor(store: WeightStore, inits: dict[str, TensorProto], cfg: ModelConfig,
                  sd: Mapping[str, torch.Tensor], layer: int, name: str, what: str, units: list[int],
                  order: list[int], rows_per_unit: int | None,
                  make: Callable[[list[int]], torch.Tensor] | None = None) -> TensorProto:
    """Initializer ``name``: layer ``layer``'s tensor ``what`` sliced to ``units`` in the engine layout
    (``make(units)`` builds it; default ``engine_tensor``).

    Stored once per distinct slice (the key): where ``units`` are a prefix of the layer's ``order`` and
    the slice is by rows (``rows_per_unit``), it is a prefix of the layer's one ordered copy, so engines
    of different widths share bytes. Every graph variant calls this, so they share the same bytes too.
    """
    if name in inits:
        return inits[name]
    if make is None:
        make = functools.partial(engine_tensor, cfg, sd, layer, what)
    prefix = bool(rows_per_unit) and is_prefix(units, order)
    stored = order if prefix else units
    key = f"blocks.{layer}.{what}[{','.join(map(str, stored))}]"
    tp = store.ref(name, key, lambda: make(stored), len(units) * rows_per_unit if prefix else None)
    inits[name] = tp
    return tp


def build_graph(
    cfg: ModelConfig, sd: Mapping[str, torch.Tensor], group: GroupPlan, store: WeightStore, variant: str,
    orders: tuple[list[list[int]], list[list[int]]] | None = None,
) -> onnx.ModelProto:
    """The ONNX model of one group's engine (``variant`` 'std' or 'trt').

    ``orders``: per layer, the shared order of heads and of channel groups (``slice.unit_orders`` of
    all the bundle's groups); a group whose units are a prefix of it references the shared tensor.
    Without it the group's own units are the order.
    """
    if variant not in VARIANTS:
        raise DycError(f"unknown ONNX variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    if variant == "cuda":
        from .export_cuda import build_cuda_graph

        return build_cuda_graph(cfg, sd, group, store, orders)
    g = _Graph(store.onnx_dtype)
    dt = store.onnx_dtype
    c, n, p, d = cfg.hidden_size, cfg.num_tokens, cfg.patch_size, cfg.head_dim
    grid, oc = cfg.input_size // p, cfg.out_channels
    inits: dict[str, TensorProto] = {}

    def w(name: str) -> TensorProto:
        """An unsliced checkpoint tensor, stored once per bundle under its own name."""
        if name not in inits:
            inits[name] = store.ref(name, name, lambda: sd[name])
        return inits[name]

    inputs = [
        helper.make_tensor_value_info("x", dt, ["batch", cfg.in_channels, cfg.input_size, cfg.input_size]),
        helper.make_tensor_value_info("t", TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info("y", TensorProto.INT64, ["batch"]),
    ]
    if group.needs_head_mask:
        inputs.append(helper.make_tensor_value_info("head_mask", dt, ["batch", cfg.depth, group.head_slots]))
    if group.needs_channel_mask:
        inputs.append(helper.make_tensor_value_info("channel_mask", dt, ["batch", cfg.depth, group.channel_slots]))

    # ---- embeddings --------------------------------------------------------------------
    g.scope = "embed"
    conv_in = ["x", w("x_embedder.proj.weight").name, w("x_embedder.proj.bias").name]
    if dt == TensorProto.BFLOAT16:  # opset-17 Conv has no bf16: patchify in fp32 (a tiny kernel)
        conv_in = [g.op("Cast", [v], to=TensorProto.FLOAT) for v in conv_in]
    xe = g.op("Conv", conv_in, kernel_shape=[p, p], strides=[p, p])
    if dt == TensorProto.BFLOAT16:
        xe = g.op("Cast", [xe], to=dt)
    xe = g.op("Transpose", [g.op("Reshape", [xe, g.i64([0, c, n])])], perm=[0, 2, 1])
    x = g.op("Add", [xe, w("pos_embed").name])
    half = FREQ_DIM // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)  # as the eager model
    tf = g.op("Unsqueeze", [g.op("Cast", ["t"], to=TensorProto.FLOAT), g.i64([1])])
    args = g.op("Mul", [tf, g.const(freqs.numpy()[None], TensorProto.FLOAT)])
    temb = g.op("Concat", [g.op("Cos", [args]), g.op("Sin", [args])], axis=1)
    if dt != TensorProto.FLOAT:
        temb = g.op("Cast", [temb], to=dt)
    temb = _silu(g, _linear(g, temb, w("t_embedder.mlp.0.weight"), w("t_embedder.mlp.0.bias")))
    temb = _linear(g, temb, w("t_embedder.mlp.2.weight"), w("t_embedder.mlp.2.bias"))
    yemb = g.op("Gather", [w("y_embedder.embedding_table.weight").name, "y"], axis=0)
    cond = _silu(g, g.op("Add", [temb, yemb]))  # every adaLN starts with SiLU(c)

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

        # ---- attention on the union heads ---------------------------------------------
        g.scope = pre + "attn"
        h = _modulate(g, _layernorm(g, x, c), shift1, scale1)
        qkv_w = sw(pre + "attn.qkv.weight", "qkv_w", heads, h_order, 3 * d)  # rows head-major: [hn, 3, Dh]
        qkv_b = sw(pre + "attn.qkv.bias", "qkv_b", heads, h_order, 3 * d)
        qkv = _linear(g, g.op("Reshape", [h, g.i64([-1, c])]), qkv_w, qkv_b)
        qkv = g.op("Transpose", [g.op("Reshape", [qkv, g.i64([-1, n, hn, 3, d])])], perm=[3, 0, 2, 1, 4])
        q, k, v = (g.op("Squeeze", [s, g.i64([0])]) for s in g.op("Split", [qkv, g.i64([1, 1, 1])], n_out=3, axis=0))
        q = g.op("Mul", [q, g.const(1.0 / math.sqrt(d))])  # scale q first: keeps fp16 scores in range
        scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
        if dt != TensorProto.FLOAT:  # softmax in fp32
            attn = g.op("Cast", [g.op("Softmax", [g.op("Cast", [scores], to=TensorProto.FLOAT)], axis=-1)], to=dt)
        else:
            attn = g.op("Softmax", [scores], axis=-1)
        o = g.op("MatMul", [attn, v])  # [B, hn, N, Dh]
        if group.vary_head[l]:
            hm = g.op("Reshape", [_mask_slice(g, "head_mask", l, hn), g.i64([-1, hn, 1, 1])])
            o = g.op("Mul", [o, hm])
        o = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), g.i64([-1, hn * d])])
        proj_w = sw(pre + "attn.proj.weight", "proj_w", heads, h_order, None)  # [C, hn·Dh]: per group
        o = g.op("Reshape", [_linear(g, o, proj_w, w(pre + "attn.proj.bias")), g.i64([-1, n, c])])
        x = g.op("Add", [x, g.op("Mul", [g.op("Unsqueeze", [gate1, g.i64([1])]), o])])

        cm = _mask_slice(g, "channel_mask", l, gn) if group.vary_channel[l] else None
        gs = cfg.group_size
        fc1w = sw(pre + "mlp.fc1.weight", "fc1_w", chans, c_order, gs)
        fc1b = sw(pre + "mlp.fc1.bias", "fc1_b", chans, c_order, gs)
        fc2w = sw(pre + "mlp.fc2.weight", "fc2_w", chans, c_order, None)  # [C, Hs]: SdtMlp's layout, per group
        fc2b = w(pre + "mlp.fc2.bias")
        hs = gn * cfg.group_size
        if not cfg.dynamic:  # plain DiT: dense MLP on every token
            g.scope = pre + "mlp"
            h = _modulate(g, _layernorm(g, x, c), shift2, scale2)
            f = _gelu_tanh(g, _linear(g, g.op("Reshape", [h, g.i64([-1, c])]), fc1w, fc1b))
            f = g.op("Reshape", [_linear(g, f, fc2w, fc2b), g.i64([-1, n, c])])
            x = g.op("Add", [x, g.op("Mul", [g.op("Unsqueeze", [gate2, g.i64([1])]), f])])
            continue

        # ---- SDT token router (standard ops in both variants) ----------------------------
        g.scope = pre + "token_selection"
        r = _linear(g, g.op("Reshape", [x, g.i64([-1, c])]), w(pre + "token_selection.mlp_head.0.weight"),
                    w(pre + "token_selection.mlp_head.0.bias"))
        r = _linear(g, g.op("Relu", [r]), w(pre + "token_selection.mlp_head.2.weight"),
                    w(pre + "token_selection.mlp_head.2.bias"))
        keep = g.op("Greater", [g.op("Sigmoid", [g.op("Reshape", [r, g.i64([-1, n])])]), g.const(0.5)])  # [B, N]

        g.scope = pre + "mlp"
        if variant == "trt":
            ins = [x, shift2, scale2, gate2, g.op("Cast", [keep], to=dt), fc1w.name, fc1b.name, fc2w.name, fc2b.name]
            if cm is not None:
                ins.append(cm)
            x = g.op("SdtMlp", ins, domain=CUSTOM_DOMAIN, group_size=cfg.group_size, eps=1e-6)
            g.value_info.append(helper.make_tensor_value_info(x, dt, ["batch", n, c]))
            continue
        # decomposed: gather kept tokens -> MLP -> gated scatter-add; the token count stays on the device
        h = _modulate(g, _layernorm(g, x, c), shift2, scale2)
        idx = g.op("Transpose", [g.op("NonZero", [keep])], perm=[1, 0])  # [K, 2] (batch, token)
        bidx = g.op("Gather", [idx, g.i64(0)], axis=1)  # [K] batch of each kept token
        f = _linear(g, g.op("GatherND", [h, idx]), fc1w, fc1b)  # [K, hs]
        if cm is not None:
            cmk = g.op("Unsqueeze", [g.op("Gather", [cm, bidx], axis=0), g.i64([2])])  # [K, gn, 1]
            f = g.op("Reshape", [f, g.i64([-1, gn, cfg.group_size])])
            f = g.op("Reshape", [g.op("Mul", [f, cmk]), g.i64([-1, hs])])
        f = _linear(g, _gelu_tanh(g, f), fc2w, fc2b)  # [K, C]
        f = g.op("Mul", [f, g.op("Gather", [gate2, bidx], axis=0)])
        # x[kept] += f as gather-add-scatter: ScatterND's reduction='add' has no fp16 kernel in ORT's CPU EP
        x = g.op("ScatterND", [x, idx, g.op("Add", [g.op("GatherND", [x, idx]), f])])

    # ---- final layer -------------------------------------------------------------------
    g.scope = "final.adaLN"
    fm = _linear(g, cond, w("final_layer.adaLN_modulation.1.weight"), w("final_layer.adaLN_modulation.1.bias"))
    g.scope = "final"
    shift, scale = g.op("Split", [fm, g.i64([c, c])], n_out=2, axis=1)
    h = _modulate(g, _layernorm(g, x, c), shift, scale)
    o = _linear(g, g.op("Reshape", [h, g.i64([-1, c])]), w("final_layer.linear.weight"), w("final_layer.linear.bias"))
    o = g.op("Transpose", [g.op("Reshape", [o, g.i64([-1, grid, grid, p, p, oc])])], perm=[0, 5, 1, 3, 2, 4])
    g.nodes.append(helper.make_node("Reshape", [o, g.i64([-1, oc, grid * p, grid * p])], ["out"], name="final/out"))

    outputs = [helper.make_tensor_value_info("out", dt, ["batch", oc, cfg.input_size, cfg.input_size])]
    graph = helper.make_graph(g.nodes, f"{cfg.name}-group{group.index}-{variant}", inputs, outputs,
                              initializer=list(inits.values()) + g.inits, value_info=g.value_info)
    opsets = [helper.make_opsetid("", OPSET)]
    if variant == "trt" and cfg.dynamic:
        opsets.append(helper.make_opsetid(CUSTOM_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="dyc")
    model.ir_version = 8  # opset 17 era: readable by every ORT ≥ 1.13 and TensorRT 8.6+/10
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write the graph only (its initializers already point into the weights file)."""
    Path(path).write_bytes(model.SerializeToString())
