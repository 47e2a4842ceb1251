"""The torch backend's engine for a PixArt-α / DyPixArt-α group (``dyc.families.pixart``'s semantics).

As ``SlicedDiT``: weights sliced once (views into ``FamilyWeights``), self-attention on the
group's union heads, SDT through the SdtMlp kernel on CUDA, which takes PixArt's adaLN-single rows
(table + ``t_block``) as its per-row shift/scale/gate. Cross-attention runs full width through
SDPA; the text projection once per call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..families.pixart import block_prefix
from ..model import timestep_embedding
from .torch_family import FamilyWeights, SlicedLayers
from .torch_sliced import (
    GroupLayout,
    _fast_ln_modulate,
    _fast_router,
    _fused,
    _sdt_mlp_op,
    gate_residual,
    ln_modulate,
    patch_tokens,
    sdt_mlp_torch,
)


def family_weights(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], layouts: Sequence[GroupLayout],
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> FamilyWeights:
    common = ["x_embedder.proj.weight", "x_embedder.proj.bias", "pos_embed", "t_embedder.mlp.0.weight",
              "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", "t_block.1.weight",
              "t_block.1.bias", "y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc1.bias",
              "y_embedder.y_proj.fc2.weight", "y_embedder.y_proj.fc2.bias", "final_layer.scale_shift_table",
              "final_layer.linear.weight", "final_layer.linear.bias"]

    def extra(l: int, get) -> dict[str, torch.Tensor]:
        return {"table": get("scale_shift_table"),
                "q_w": get("cross_attn.q_linear.weight"), "q_b": get("cross_attn.q_linear.bias"),
                "kv_w": get("cross_attn.kv_linear.weight"), "kv_b": get("cross_attn.kv_linear.bias"),
                "xproj_w": get("cross_attn.proj.weight"), "xproj_b": get("cross_attn.proj.bias")}

    return FamilyWeights(cfg, sd, layouts, lambda l: block_prefix(cfg, l), common, extra, dtype, device)


class SlicedPixArt(SlicedLayers):
    """One group's engine: inputs as the group's ONNX graph (``x``, ``t``, ``y`` text embeddings, masks)."""

    def __init__(self, cfg: ModelConfig, layout: GroupLayout, shared: FamilyWeights, shared_masks: bool = False,
                 use_kernel: bool = True, fuse: bool | None = None):
        super().__init__(cfg, layout, shared, shared_masks)
        dev, dt = shared.device, shared.dtype
        kernel, _ = _sdt_mlp_op()
        self.kernel = kernel if (use_kernel and dev.type == "cuda") else None
        fuse = dev.type == "cuda" if fuse is None else fuse
        self.ln_mod = _fast_ln_modulate()[0] if fuse else ln_modulate
        self.gate_res = _fused(gate_residual) if fuse else gate_residual
        self.router = _fast_router(dev, dt) if (fuse and cfg.dynamic) else None
        # every block's adaLN table, stacked: [L, 6, C]
        self.tables = torch.stack([layer["table"] for layer in self.layers])

    def _cross(self, l: int, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cfg, layer = self.cfg, self.layers[l]
        b, n, c = h.shape
        hh, d = cfg.num_heads, cfg.head_dim
        q = F.linear(h, layer["q_w"], layer["q_b"]).view(b, n, hh, d).transpose(1, 2)
        k, v = F.linear(cond, layer["kv_w"], layer["kv_b"]).view(b, -1, 2, hh, d).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return F.linear(o, layer["xproj_w"], layer["xproj_b"])

    def _mlp(self, l: int, h, shift, scale, gate, keep, cmask):
        cfg, layer = self.cfg, self.layers[l]
        args = (h, shift, scale, gate, keep, layer["fc1_w"], layer["fc1_b"], layer["fc2_w"], layer["fc2_b"])
        if self.kernel is not None:
            return self.kernel(*args, channel_mask=cmask, group_size=cfg.group_size, out=h)
        return sdt_mlp_torch(*args, cmask, cfg.group_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, head_mask: torch.Tensor | None = None,
                channel_mask: torch.Tensor | None = None, *, mlp_mode: str | None = None) -> torch.Tensor:
        cfg, cm = self.cfg, self.shared.common
        dt = cm["pos_embed"].dtype
        b, c = x.shape[0], cfg.hidden_size
        h = (patch_tokens(x, cm["x_embedder.proj.weight"], cm["x_embedder.proj.bias"], cfg.patch_size)
             + cm["pos_embed"]).contiguous()
        temb = F.linear(F.silu(F.linear(timestep_embedding(t).to(dt), cm["t_embedder.mlp.0.weight"],
                                        cm["t_embedder.mlp.0.bias"])), cm["t_embedder.mlp.2.weight"],
                        cm["t_embedder.mlp.2.bias"])
        t0 = F.linear(F.silu(temb), cm["t_block.1.weight"], cm["t_block.1.bias"]).view(1, b, 6, c)
        # [L, 6, B, C]: every layer's shift/scale/gate a contiguous [B, C] (the kernels take them as is)
        mods = (self.tables[:, None] + t0).permute(0, 2, 1, 3).contiguous()
        cond = F.linear(y.to(dt), cm["y_embedder.y_proj.fc1.weight"], cm["y_embedder.y_proj.fc1.bias"])
        cond = F.linear(F.gelu(cond, approximate="tanh"), cm["y_embedder.y_proj.fc2.weight"],
                        cm["y_embedder.y_proj.fc2.bias"])
        for l in range(cfg.depth):
            sh1, sc1, g1, sh2, sc2, g2 = mods[l].unbind(0)
            h = self.gate_res(h, g1, self.attention(l, self.ln_mod(h, sh1, sc1), head_mask))
            h = h + self._cross(l, h, cond)
            cmask = self.channel_mask(l, channel_mask, dt)
            if cfg.dynamic:
                h = self._mlp(l, h.contiguous(), sh2, sc2, g2, self.keep(l, h, self.router), cmask)
            else:
                layer = self.layers[l]
                u = F.linear(F.gelu(F.linear(self.ln_mod(h, sh2, sc2), layer["fc1_w"], layer["fc1_b"]),
                                    approximate="tanh"), layer["fc2_w"], layer["fc2_b"])
                h = self.gate_res(h, g2, u)
        shift, scale = (cm["final_layer.scale_shift_table"][None] + temb[:, None]).unbind(1)
        out = F.linear(self.ln_mod(h, shift.contiguous(), scale.contiguous()), cm["final_layer.linear.weight"],
                       cm["final_layer.linear.bias"])
        p, oc, g = cfg.patch_size, cfg.out_channels, cfg.input_size // cfg.patch_size
        out = torch.einsum("nhwpqc->nchpwq", out.view(b, g, g, p, p, oc))
        return out.reshape(b, oc, g * p, g * p)


ENGINE = SlicedPixArt
