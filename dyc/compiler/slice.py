"""Pass 4, slice: cut the weights of one group's engine down to its active heads and groups.

Inactive heads lose their qkv rows and proj columns, inactive channel groups their fc1 rows
(and bias entries) and fc2 columns; nothing is zero-padded, so no zero head is ever
materialised. The kept heads/groups stay in ascending original order, which is the order of
the per-t mask inputs (``GroupPlan.heads[l]``).

Everything outside the blocks' attention and MLP (embeddings, adaLN, token routers, final layer)
is shared by every group unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..config import ModelConfig


def qkv_rows(cfg: ModelConfig, heads: Sequence[int]) -> torch.Tensor:
    """Row indices of qkv.weight for the given heads, laid out [3 (q,k,v), len(heads), Dh]."""
    c, d = cfg.hidden_size, cfg.head_dim
    return torch.tensor([s * c + h * d + i for s in range(3) for h in heads for i in range(d)], dtype=torch.long)


def head_cols(cfg: ModelConfig, heads: Sequence[int]) -> torch.Tensor:
    """Column indices of proj.weight (its input features) for the given heads."""
    d = cfg.head_dim
    return torch.tensor([h * d + i for h in heads for i in range(d)], dtype=torch.long)


def group_units(cfg: ModelConfig, groups: Sequence[int]) -> torch.Tensor:
    """Hidden-unit indices (fc1 rows, fc2 columns) of the given channel groups."""
    gs = cfg.group_size
    return torch.tensor([g * gs + i for g in groups for i in range(gs)], dtype=torch.long)


def slice_layer(
    cfg: ModelConfig, sd: Mapping[str, torch.Tensor], layer: int, heads: Sequence[int], groups: Sequence[int],
) -> dict[str, torch.Tensor]:
    """Sliced attention/MLP weights of one block, keyed by their official names."""
    p = f"blocks.{layer}."
    rows, cols, units = qkv_rows(cfg, heads), head_cols(cfg, heads), group_units(cfg, groups)
    return {
        p + "attn.qkv.weight": sd[p + "attn.qkv.weight"].index_select(0, rows),
        p + "attn.qkv.bias": sd[p + "attn.qkv.bias"].index_select(0, rows),
        p + "attn.proj.weight": sd[p + "attn.proj.weight"].index_select(1, cols),
        p + "attn.proj.bias": sd[p + "attn.proj.bias"],
        p + "mlp.fc1.weight": sd[p + "mlp.fc1.weight"].index_select(0, units),
        p + "mlp.fc1.bias": sd[p + "mlp.fc1.bias"].index_select(0, units),
        p + "mlp.fc2.weight": sd[p + "mlp.fc2.weight"].index_select(1, units),
        p + "mlp.fc2.bias": sd[p + "mlp.fc2.bias"],
    }


def shared_names(cfg: ModelConfig) -> list[str]:
    """Weights every group's engine uses unchanged (the TDW routers are not among them: masks are inputs)."""
    names = ["x_embedder.proj.weight", "x_embedder.proj.bias", "pos_embed", "t_embedder.mlp.0.weight",
             "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
             "y_embedder.embedding_table.weight", "final_layer.adaLN_modulation.1.weight",
             "final_layer.adaLN_modulation.1.bias", "final_layer.linear.weight", "final_layer.linear.bias"]
    for l in range(cfg.depth):
        p = f"blocks.{l}."
        names += [p + "adaLN_modulation.1.weight", p + "adaLN_modulation.1.bias", p + "attn.proj.bias",
                  p + "mlp.fc2.bias"]
        if cfg.dynamic:
            names += [p + f"token_selection.mlp_head.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]
    return names


# ---- shared storage across groups ------------------------------------------------------------
# The engines' own layout (export): qkv rows head-major ([h, 3 (q,k,v), Dh] per head, so a run of
# heads is a run of rows) and fc1 rows per channel group. With one order of the units per layer in
# which each group's union is a prefix, every group's qkv / fc1 is a prefix of one stored tensor:
# groups share one copy. proj and fc2 keep torch's [out, in] layout (fc2 [C, Hs] is what the
# dyc::SdtMlp contract fixes; TensorRT tooling reads proj as [C, h·Dh]), so their column slices are
# stored per distinct unit set.


def unit_orders(groups: Sequence, depth: int) -> tuple[list[list[int]], list[list[int]]]:
    """Per layer, an order of the heads (channel groups) any group uses: most-shared first.

    When the groups' unions are nested (the usual case: contiguous t-intervals of routers that
    widen with t), ordering by how many groups use a unit makes every union a prefix.
    """
    orders: tuple[list[list[int]], list[list[int]]] = ([], [])
    for kind, out in (("heads", orders[0]), ("channels", orders[1])):
        for l in range(depth):
            sets = [set(getattr(g, kind)[l]) for g in groups]
            used = set().union(*sets)
            out.append(sorted(used, key=lambda u, _s=sets: (-sum(u in s for s in _s), u)))
    return orders


def reorder_groups(groups: Sequence, depth: int) -> list:
    """The same groups with each layer's units listed in the shared order (the slot order of mask inputs)."""
    from dataclasses import replace

    ho, co = unit_orders(groups, depth)
    return [replace(g, heads=[[u for u in ho[l] if u in set(g.heads[l])] for l in range(depth)],
                    channels=[[u for u in co[l] if u in set(g.channels[l])] for l in range(depth)]) for g in groups]


def is_prefix(units: Sequence[int], order: Sequence[int]) -> bool:
    return list(units) == list(order[: len(units)])


def qkv_rows_head_major(cfg: ModelConfig, heads: Sequence[int]) -> torch.Tensor:
    """qkv.weight rows for the given heads laid out [len(heads), 3 (q,k,v), Dh]."""
    c, d = cfg.hidden_size, cfg.head_dim
    return torch.tensor([s * c + h * d + i for h in heads for s in range(3) for i in range(d)], dtype=torch.long)


def engine_tensor(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], layer: int, what: str,
                  units: Sequence[int]) -> torch.Tensor:
    """One sliced tensor in the engine layout: ``what`` in qkv_w, qkv_b, proj_w, fc1_w, fc1_b, fc2_w."""
    p = f"blocks.{layer}."
    if what in ("qkv_w", "qkv_b"):
        src = sd[p + ("attn.qkv.weight" if what == "qkv_w" else "attn.qkv.bias")]
        return src.index_select(0, qkv_rows_head_major(cfg, units))
    if what == "proj_w":
        return sd[p + "attn.proj.weight"].index_select(1, head_cols(cfg, units))
    if what in ("fc1_w", "fc1_b"):
        src = sd[p + ("mlp.fc1.weight" if what == "fc1_w" else "mlp.fc1.bias")]
        return src.index_select(0, group_units(cfg, units))
    if what == "fc2_w":
        return sd[p + "mlp.fc2.weight"].index_select(1, group_units(cfg, units))
    raise ValueError(what)
