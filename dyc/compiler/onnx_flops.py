"""Count MACs (the papers' FLOPs, DESIGN.md §2) from an exported ONNX graph itself.

Shapes come from ONNX shape inference with the batch fixed to 1 (MACs per image). Counted ops:
Conv, Gemm, MatMul and ``dyc::SdtMlp``. Where a row count is data-dependent (the decomposed SDT
runs its MLP Gemms on the NonZero-gathered kept tokens) or the op is ``SdtMlp``, the MACs are
counted at the given per-layer keep rate: rows = keep[l] · tokens. Each node is attributed to a
model part by the prefix of its name (the naming contract of ``export``), so the result lines up
with ``dyc.flops.FlopsBreakdown``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import shape_inference

from ..errors import DycError

CATEGORIES = ("embed", "adaln", "attn", "mlp", "routers", "final", "other")
# skip (U-ViT's long skips) and cross_attn (PixArt-α) are parts of other families' blocks (dyc.families)
_LAYER = re.compile(r"^blocks\.(\d+)\.(adaLN|attn|mlp|token_selection|skip|cross_attn)/")
_PARTS = {"adaLN": "adaln", "attn": "attn", "mlp": "mlp", "token_selection": "routers", "skip": "other",
          "cross_attn": "other"}


def _category(node_name: str) -> tuple[str, int | None]:
    m = _LAYER.match(node_name)
    if m:
        return _PARTS[m.group(2)], int(m.group(1))
    if node_name.startswith("embed/"):
        return "embed", None
    if node_name.startswith("adaLN/"):  # PixArt-α's t_block
        return "adaln", None
    if node_name.startswith("text/"):  # PixArt-α's text projection
        return "other", None
    if node_name.startswith("final.adaLN/"):
        return "adaln", None
    if node_name.startswith("final/"):
        return "final", None
    raise DycError(f"ONNX node {node_name!r} does not follow dyc's naming: cannot attribute its MACs")


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in list(m.graph.input) + list(m.graph.value_info):  # MACs per image: batch 1
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param == "batch":
                dim.dim_value = 1
    m = shape_inference.infer_shapes(m, data_prop=True)
    out: dict[str, list[int | None]] = {}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    for init in m.graph.initializer:
        out[init.name] = list(init.dims)
    return out


def count_macs(
    model: onnx.ModelProto | str | os.PathLike, keep: Sequence[float] | np.ndarray | None = None,
) -> dict[str, float]:
    """MACs per image of one forward, by part (``CATEGORIES``) plus ``blocks`` = attn + mlp.

    ``keep``: SDT keep rate per layer (needed when the graph has SDT; 1.0 for every layer if None).
    """
    return _count(model, keep)[0]


def count_macs_by_layer(
    model: onnx.ModelProto | str | os.PathLike, depth: int, keep: Sequence[float] | np.ndarray | None = None,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``count_macs`` plus the attention and MLP MACs of each block: ({part: MACs}, {"attn"|"mlp": [L]})."""
    totals, layers = _count(model, keep)
    return totals, {k: [layers.get((k, l), 0.0) for l in range(depth)] for k in ("attn", "mlp")}


def _count(
    model: onnx.ModelProto | str | os.PathLike, keep: Sequence[float] | np.ndarray | None,
) -> tuple[dict[str, float], dict[tuple[str, int], float]]:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    shapes = _shapes(model)
    init_dims = {i.name: list(i.dims) for i in model.graph.initializer}
    tokens = init_dims.get("pos_embed", [1, 0, 0])[1]
    totals = dict.fromkeys(CATEGORIES, 0.0)
    layers: dict[tuple[str, int], float] = {}

    def rate(layer: int | None) -> float:
        if keep is None or layer is None:
            return 1.0
        return float(np.asarray(keep, dtype=np.float64)[layer])

    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul", "SdtMlp"):
            continue
        part, layer = _category(node.name)
        a = shapes.get(node.input[0])
        if a is None:
            raise DycError(f"ONNX node {node.name}: no shape for input {node.input[0]!r}")
        if node.op_type == "SdtMlp":
            fc1 = init_dims[node.input[5]]  # [Hs, C]
            macs = rate(layer) * a[1] * 2 * fc1[0] * fc1[1]
        elif node.op_type == "Conv":
            wshape = shapes[node.input[1]]  # [Cout, Cin/groups, kh, kw]
            out = shapes[node.output[0]]
            macs = float(np.prod(out)) * float(np.prod(wshape[1:]))
        elif node.op_type == "Gemm":
            b = shapes[node.input[1]]
            attrs = {x.name: x.i for x in node.attribute}
            m_rows = a[1] if attrs.get("transA", 0) else a[0]
            k = a[0] if attrs.get("transA", 0) else a[1]
            n_cols = b[0] if attrs.get("transB", 0) else b[1]
            if m_rows is None:  # rows gathered by NonZero: the kept tokens of this layer
                m_rows = rate(layer) * tokens
            macs = float(m_rows) * k * n_cols
        else:  # MatMul, batched: prod(output) · K
            out = shapes[node.output[0]]
            if any(x is None for x in out) or a[-1] is None:
                raise DycError(f"ONNX node {node.name}: MatMul with unknown shape {out}")
            macs = float(np.prod(out)) * a[-1]
        totals[part] += macs
        if layer is not None:
            layers[(part, layer)] = layers.get((part, layer), 0.0) + macs
    totals["blocks"] = totals["attn"] + totals["mlp"]
    totals["total"] = sum(totals[c] for c in CATEGORIES)
    return totals, layers
