"""What the torch-backend engines of the other families (U-ViT, PixArt-α) share: one device copy of
the weights with each layer's heads / channel groups in one shared order (as ``SharedWeights`` does
for DiT, so a group whose units are a prefix takes views), the sliced self-attention, and the
entry point ``TorchBackend`` calls for a non-DiT bundle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .torch_sliced import GroupLayout, SharedWeights, unit_order


class FamilyWeights(SharedWeights):
    """Device copies of a family model's weights, shared by every group's engine.

    ``prefix(l)``: state-dict prefix of block l. ``extra(l, get)``: the layer's other tensors by
    name (norms, skip, cross-attention, ...), ``get(key)`` reading the state dict. ``common``:
    the unsliced tensors outside the blocks, by state-dict name. Layer views and the tensor list
    are SharedWeights' (qkv bias optional; a layer's other tensors pass through unsliced).
    """

    def __init__(self, cfg: ModelConfig, sd: Mapping[str, torch.Tensor], layouts: Sequence[GroupLayout],
                 prefix: Callable[[int], str], common: Sequence[str],
                 extra: Callable[[int, Callable[[str], torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        h, c, dh, gs = cfg.num_heads, cfg.hidden_size, cfg.head_dim, cfg.group_size

        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=self.device, dtype=dtype).contiguous()

        self.common = {k: dev(sd[k]) for k in common}
        self.head_order: list[list[int]] = []
        self.group_order: list[list[int]] = []
        self.layers: list[dict[str, torch.Tensor]] = []
        self.copies: list[torch.Tensor] = []
        for l in range(cfg.depth):
            p = prefix(l)
            ho = unit_order([lay.heads[l] for lay in layouts], h)
            go = unit_order([lay.channels[l] for lay in layouts], h)
            self.head_order.append(ho)
            self.group_order.append(go)
            hi, gi = torch.tensor(ho), torch.tensor(go)
            layer = {
                "qkv_w": sd[p + "attn.qkv.weight"].view(3, h, dh, c).permute(1, 0, 2, 3)[hi].reshape(-1, c),
                "proj_w": sd[p + "attn.proj.weight"].view(c, h, dh)[:, hi].reshape(c, -1),
                "proj_b": sd[p + "attn.proj.bias"],
                "fc1_w": sd[p + "mlp.fc1.weight"].view(h, gs, c)[gi].reshape(-1, c),
                "fc1_b": sd[p + "mlp.fc1.bias"].view(h, gs)[gi].reshape(-1),
                "fc2_w": sd[p + "mlp.fc2.weight"].view(c, h, gs)[:, gi].reshape(c, -1),
                "fc2_b": sd[p + "mlp.fc2.bias"],
            }
            if p + "attn.qkv.bias" in sd:
                layer["qkv_b"] = sd[p + "attn.qkv.bias"].view(3, h, dh).permute(1, 0, 2)[hi].reshape(-1)
            if cfg.dynamic:
                for i in (0, 2):
                    layer[f"tok{i}_w"] = sd[f"{p}token_selection.mlp_head.{i}.weight"]
                    layer[f"tok{i}_b"] = sd[f"{p}token_selection.mlp_head.{i}.bias"]
            if extra is not None:
                layer.update(extra(l, lambda k, _p=p: sd[_p + k]))
            self.layers.append({k: dev(v) for k, v in layer.items()})


class SlicedLayers(torch.nn.Module):
    """Per-layer weight views of one group's engine and the mask-slot picks, for any family."""

    def __init__(self, cfg: ModelConfig, layout: GroupLayout, shared: FamilyWeights, shared_masks: bool):
        super().__init__()
        self.cfg, self.layout, self.shared, self.shared_masks = cfg, layout, shared, shared_masks
        self.layers: list[dict[str, torch.Tensor]] = []
        self.head_pick: list[torch.Tensor | None] = []
        self.group_pick: list[torch.Tensor | None] = []
        for l in range(cfg.depth):
            layer, hu, gu = shared.layer_views(l, layout.heads[l], layout.channels[l])
            self.layers.append(layer)
            hp = [list(layout.heads[l]).index(u) for u in hu]
            gp = [list(layout.channels[l]).index(u) for u in gu]
            self.head_pick.append(None if hp == sorted(hp) else torch.tensor(hp, device=shared.device))
            self.group_pick.append(None if gp == sorted(gp) else torch.tensor(gp, device=shared.device))

    def weight_tensors(self) -> list[torch.Tensor]:
        return self.shared.tensors()

    def mlp_modes(self) -> tuple[str, ...]:
        """One MLP form (GraphRunner times the forms of engines that have several; ``mlp_mode`` is ignored):
        SDT through the kernel where it runs, else every token."""
        return ("sdt",)

    def attention(self, l: int, a: torch.Tensor, head_mask: torch.Tensor | None) -> torch.Tensor:
        """Self-attention of layer l on its union heads, then proj: [B, N, C] (no residual)."""
        lay, layer, dh = self.layout, self.layers[l], self.cfg.head_dim
        b = a.shape[0]
        nh = len(lay.heads[l])
        qkv = F.linear(a, layer["qkv_w"], layer["qkv_b"])  # head-major: [B, N, nh, 3, Dh]
        q, k, v = qkv.view(b, -1, nh, 3, dh).permute(3, 0, 2, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        proj_w = layer["proj_w"]
        if lay.vary_head[l] and head_mask is not None:
            hm = head_mask[:, l, :nh] if self.head_pick[l] is None else head_mask[:, l, self.head_pick[l]]
            if self.shared_masks:  # one mask for all rows (one t per call): zero the off heads' proj columns
                proj_w = proj_w * hm[0].to(proj_w.dtype).repeat_interleave(dh)
            else:
                o = o * hm[:, None, :, None].to(o.dtype)
        return F.linear(o.reshape(b, -1, nh * dh), proj_w, layer["proj_b"])

    def channel_mask(self, l: int, channel_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """Layer l's channel-group mask in the stored group order: [1, G] (shared) or [B, G], or None."""
        lay = self.layout
        if not (lay.vary_channel[l] and channel_mask is not None):
            return None
        rows = slice(0, 1) if self.shared_masks else slice(None)
        ng, pick = len(lay.channels[l]), self.group_pick[l]
        return (channel_mask[rows, l, :ng] if pick is None else channel_mask[rows, l, pick]).to(dtype)

    def keep(self, l: int, h: torch.Tensor, router: Callable | None) -> torch.Tensor:
        """SDT decision of layer l's token router on h: [B, N] 0/1 in h's dtype."""
        layer = self.layers[l]
        args = (layer["tok0_w"], layer["tok0_b"], layer["tok2_w"], layer["tok2_b"])
        if router is not None:
            return router(h, *args)
        logit = F.linear(F.relu(F.linear(h, args[0], args[1])), args[2], args[3]).squeeze(-1)
        return (torch.sigmoid(logit) > 0.5).to(h.dtype)


def mlp_masked(x: torch.Tensor, w1, b1, w2, b2, channel_mask: torch.Tensor | None, group_size: int,
               exact_gelu: bool) -> torch.Tensor:
    """fc2(GELU(mask ⊙ fc1(x))) on every row of x (the reference maths; channel_mask [1 or B, G])."""
    h = F.linear(x, w1, b1)
    if channel_mask is not None:
        b, n, d = h.shape
        h = (h.view(b, n, d // group_size, group_size) * channel_mask[:, None, :, None]).view(b, n, d)
    return F.linear(F.gelu(h) if exact_gelu else F.gelu(h, approximate="tanh"), w2, b2)


def build_modules(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], layouts: Sequence[GroupLayout],
                  dtype: torch.dtype, device: torch.device) -> tuple[FamilyWeights, list[torch.nn.Module]]:
    """The shared weights and one engine per group of a non-DiT bundle (``TorchBackend``'s hook)."""
    import importlib

    mod = importlib.import_module(f"dyc.backends.torch_{cfg.family}")
    shared = mod.family_weights(cfg, sd, layouts, dtype, device)
    engine = mod.ENGINE
    return shared, [engine(cfg, lay, shared, shared_masks=True) for lay in layouts]  # one t per call
