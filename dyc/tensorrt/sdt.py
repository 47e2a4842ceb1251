"""The three forms in which a TensorRT engine can compute SDT (the per-token MLP skip).

* ``plugin``: the bundle's ``trt`` graphs, whose ``dyc::SdtMlp`` nodes become the ``SdtMlp`` TensorRT
  plugin (gather kept tokens -> MLP -> gated scatter-add in one kernel; the MLP runs on kept tokens only).
* ``gather``: the bundle's ``std`` graphs as exported: NonZero -> GatherND -> MLP -> ScatterND.
  The MLP runs on kept tokens only, but NonZero gives a data-dependent shape, so TensorRT synchronises
  on it and the engine cannot be captured into a CUDA graph. Datacenter TensorRT only: TensorRT-RTX
  has no NonZero (its parser asks for a ``NonZero`` plugin that it does not ship).
* ``dense``: the ``std`` graphs rewritten here so that every token goes through the (TDW-sliced) MLP
  and the residual update is taken only where the token router keeps the token (``Where(keep, x + f,
  x)``). Same values as the other forms (a skipped token keeps exactly x even if its MLP overflowed), no
  data-dependent shapes, so it builds with TensorRT-RTX and is capturable; it does not save the MLP
  FLOPs of skipped tokens. The fallback when the plugin is not built.

TDW slicing (narrow qkv/proj/fc1/fc2) is in the weights of all three forms.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ..errors import DycError
from .common import PLUGIN_OP, SDT_FORMS

__all__ = ["PLUGIN_OP", "SDT_FORMS", "count_sdt_ops", "densify_sdt"]

_ITEMSIZE = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def count_sdt_ops(model: onnx.ModelProto) -> dict[str, int]:
    """How many SDT blocks a graph has in each form (NonZero per gather-SDT, SdtMlp per plugin-SDT)."""
    ops = [n.op_type for n in model.graph.node]
    return {"nonzero": ops.count("NonZero"), "plugin": ops.count(PLUGIN_OP), "scatternd": ops.count("ScatterND")}


def densify_sdt(model: onnx.ModelProto, num_tokens: int) -> onnx.ModelProto:
    """Rewrite every gather-SDT block of a ``std`` graph into the dense form (see module doc).

    Matches the exporter's decomposition exactly (``dyc/compiler/export.py``) and fails loudly on
    anything else, so a change there cannot silently produce a wrong engine. Returns a new model whose
    initializers still point at the bundle's external weights file (parse it with the original path).
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    x_in = next((i for i in g.input if i.name == "x"), None)
    if x_in is None:
        raise DycError("SDT rewrite: the group graph has no input 'x'")
    dt = x_in.type.tensor_type.elem_type
    if dt not in _ITEMSIZE:
        raise DycError(f"SDT rewrite: unsupported activation dtype {TensorProto.DataType.Name(dt)}")
    cons = _consumers(g)
    remove: set[int] = set()
    replace: dict[int, list[onnx.NodeProto]] = {}
    extra_inits: list[TensorProto] = []
    zero = "dyc_trt/zero"
    expand_shape = "dyc_trt/expand_tokens"
    unsq_axis1, unsq_axis2 = "dyc_trt/axis1", "dyc_trt/axis2"
    n_blocks = 0
    used_zero = False

    def fail(what: str) -> DycError:
        return DycError(f"SDT rewrite: unexpected graph around {what}: the exporter's decomposition changed; "
                        "update dyc/tensorrt/sdt.py or build with the plugin form")

    for nz in [n for n in g.node if n.op_type == "NonZero"]:
        n_blocks += 1
        scope = nz.name.rsplit("/", 1)[0]
        keep = nz.input[0]
        tr = cons.get(nz.output[0], [])
        if len(tr) != 1 or tr[0].op_type != "Transpose" or list(_attr(tr[0], "perm", [])) != [1, 0]:
            raise fail(nz.name)
        idx = tr[0].output[0]
        remove.update(id(n) for n in (nz, tr[0]))
        for use in cons.get(idx, []):
            if use.op_type == "Gather" and _attr(use, "axis", 0) == 1:  # batch index of each kept token
                remove.add(id(use))
                for bu in cons.get(use.output[0], []):
                    if bu.op_type != "Gather" or _attr(bu, "axis", 0) != 0 or bu.input[1] != use.output[0]:
                        raise fail(bu.name)
                    # per-sample rows [B, K] -> one row per token [B*N, K]
                    u = helper.make_node("Unsqueeze", [bu.input[0], unsq_axis1], [bu.output[0] + "/u"],
                                         name=f"{scope}/dense_rows_unsqueeze_{n_blocks}_{len(replace)}")
                    e = helper.make_node("Expand", [u.output[0], expand_shape], [bu.output[0] + "/e"],
                                         name=f"{scope}/dense_rows_expand_{n_blocks}_{len(replace)}")
                    f = helper.make_node("Flatten", [e.output[0]], [bu.output[0]], axis=2,
                                         name=f"{scope}/dense_rows_flatten_{n_blocks}_{len(replace)}")
                    replace[id(bu)] = [u, e, f]
            elif use.op_type == "GatherND" and use.input[1] == idx:  # kept tokens -> every token [B*N, C]
                replace[id(use)] = [helper.make_node("Flatten", [use.input[0]], [use.output[0]], axis=2,
                                                     name=f"{scope}/dense_tokens_{n_blocks}_{len(replace)}")]
            elif use.op_type == "ScatterND" and use.input[1] == idx:
                x, f, o = use.input[0], use.input[2], use.output[0]
                reduction = _attr(use, "reduction", b"none")
                reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
                if reduction not in ("none", "add"):
                    raise fail(use.name)
                nodes = [
                    helper.make_node("Shape", [x], [o + "/shape"], name=f"{scope}/dense_shape_{n_blocks}"),
                    helper.make_node("Reshape", [f, o + "/shape"], [o + "/upd"],
                                     name=f"{scope}/dense_unflatten_{n_blocks}"),
                    helper.make_node("Unsqueeze", [keep, unsq_axis2], [o + "/keep"],
                                     name=f"{scope}/dense_keep_{n_blocks}"),
                ]
                if reduction == "none":  # x[kept] = upd[kept]: kept tokens take the update, the others keep x
                    nodes.append(helper.make_node("Where", [o + "/keep", o + "/upd", x], [o],
                                                  name=f"{scope}/dense_select_{n_blocks}"))
                else:  # x[kept] += upd; Where, not Mul by keep: a skipped token gets exactly +0 even on overflow
                    used_zero = True
                    nodes += [helper.make_node("Where", [o + "/keep", o + "/upd", zero], [o + "/sel"],
                                               name=f"{scope}/dense_select_{n_blocks}"),
                              helper.make_node("Add", [x, o + "/sel"], [o], name=f"{scope}/dense_residual_{n_blocks}")]
                replace[id(use)] = nodes
            else:
                raise fail(use.name)
    if not n_blocks:
        return m
    if used_zero:
        extra_inits.append(helper.make_tensor(zero, dt, [], b"\0" * _ITEMSIZE[dt], raw=True))
    extra_inits += [
        helper.make_tensor(expand_shape, TensorProto.INT64, [3], [1, int(num_tokens), 1]),
        helper.make_tensor(unsq_axis1, TensorProto.INT64, [1], [1]),
        helper.make_tensor(unsq_axis2, TensorProto.INT64, [1], [2]),
    ]
    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        if id(n) in remove:
            continue
        nodes.extend(replace.get(id(n), [n]))
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(extra_inits)
    # value_info of removed intermediates would describe tensors that no longer exist
    live = {o for n in nodes for o in n.output}
    keep_vi = [vi for vi in g.value_info if vi.name in live]
    del g.value_info[:]
    g.value_info.extend(keep_vi)
    left = count_sdt_ops(m)
    if left["nonzero"] or left["scatternd"]:
        raise DycError("SDT rewrite: NonZero/ScatterND left in the graph after the rewrite")
    return m
