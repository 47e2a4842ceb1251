"""The torch backend's engine for a U-ViT / DyU-ViT group (``dyc.families.uvit``'s semantics).

As ``SlicedDiT``: weights sliced once (views into ``FamilyWeights``), attention on the group's
union heads, SDT through the SdtMlp kernel on CUDA. The MLP's affine LayerNorm enters the kernel
as shift = bias, scale = weight − 1, gate = 1 (per row). The kernel's GELU is the tanh form while
U-ViT's is exact: their difference (≤ 4.8e-4 absolute) is below fp16/bf16 resolution, so the kernel
runs for fp16/bf16 engines and fp32 keeps the exact PyTorch maths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..families.uvit import LN_EPS, block_prefix
from ..model import timestep_embedding
from .torch_family import FamilyWeights, SlicedLayers, mlp_masked
from .torch_sliced import GroupLayout, _fast_router, _sdt_mlp_op, patch_tokens


def family_weights(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], layouts: Sequence[GroupLayout],
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> FamilyWeights:
    common = ["patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "norm.weight", "norm.bias",
              "decoder_pred.weight", "decoder_pred.bias"]
    if cfg.num_classes > 0:
        common.append("label_emb.weight")
    if cfg.final_conv:
        common += ["final_layer.weight", "final_layer.bias"]
    k = cfg.depth // 2

    def extra(l: int, get) -> dict[str, torch.Tensor]:
        out = {name.replace(".", "_"): get(name) for name in ("norm1.weight", "norm1.bias", "norm2.weight",
                                                               "norm2.bias")}
        out["norm2_scale"] = get("norm2.weight") - 1  # SdtMlp's modulate: LN·(1 + scale) + shift
        if l > k:
            out["skip_w"], out["skip_b"] = get("skip_linear.weight"), get("skip_linear.bias")
        return out

    return FamilyWeights(cfg, sd, layouts, lambda l: block_prefix(cfg, l), common, extra, dtype, device)


class SlicedUViT(SlicedLayers):
    """One group's engine: inputs as the group's ONNX graph (``x``, ``t``, ``y``, optional masks)."""

    def __init__(self, cfg: ModelConfig, layout: GroupLayout, shared: FamilyWeights, shared_masks: bool = False,
                 use_kernel: bool = True, fuse: bool | None = None):
        super().__init__(cfg, layout, shared, shared_masks)
        dev, dt = shared.device, shared.dtype
        kernel, _ = _sdt_mlp_op()
        half = dt in (torch.float16, torch.bfloat16)
        self.kernel = kernel if (use_kernel and dev.type == "cuda" and half) else None
        fuse = dev.type == "cuda" if fuse is None else fuse
        self.router = _fast_router(dev, dt) if (fuse and cfg.dynamic) else None

    def _mlp(self, l: int, h: torch.Tensor, keep: torch.Tensor | None, cmask: torch.Tensor | None) -> torch.Tensor:
        cfg, layer = self.cfg, self.layers[l]
        args = (layer["fc1_w"], layer["fc1_b"], layer["fc2_w"], layer["fc2_b"])
        if self.kernel is not None and keep is not None:
            b, c = h.shape[0], cfg.hidden_size
            return self.kernel(h, layer["norm2_bias"].expand(b, c), layer["norm2_scale"].expand(b, c),
                               torch.ones(b, c, dtype=h.dtype, device=h.device), keep, *args, channel_mask=cmask,
                               group_size=cfg.group_size, eps=LN_EPS, out=h)
        a = F.layer_norm(h, (cfg.hidden_size,), layer["norm2_weight"], layer["norm2_bias"], LN_EPS)
        y = mlp_masked(a, *args, cmask, cfg.group_size, exact_gelu=True)
        return h + (y if keep is None else y * keep.unsqueeze(-1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                head_mask: torch.Tensor | None = None, channel_mask: torch.Tensor | None = None, *,
                mlp_mode: str | None = None) -> torch.Tensor:
        cfg, cm = self.cfg, self.shared.common
        dt = cm["pos_embed"].dtype
        b, c, k = x.shape[0], cfg.hidden_size, cfg.depth // 2
        patches = patch_tokens(x, cm["patch_embed.proj.weight"], cm["patch_embed.proj.bias"], cfg.patch_size)
        tokens = [timestep_embedding(t, c).to(dt)[:, None], patches]
        if cfg.num_classes > 0:
            tokens.insert(0, cm["label_emb.weight"][y][:, None])
        h = torch.cat(tokens, dim=1) + cm["pos_embed"]
        skips: list[torch.Tensor] = []
        for l, layer in enumerate(self.layers):
            if l > k:
                h = F.linear(torch.cat([h, skips.pop()], dim=-1), layer["skip_w"], layer["skip_b"])
            a = F.layer_norm(h, (c,), layer["norm1_weight"], layer["norm1_bias"], LN_EPS)
            h = h + self.attention(l, a, head_mask)
            keep = self.keep(l, h, self.router) if cfg.dynamic else None
            h = self._mlp(l, h.contiguous(), keep, self.channel_mask(l, channel_mask, dt))
            if l < k:
                skips.append(h)
        out = F.linear(F.layer_norm(h, (c,), cm["norm.weight"], cm["norm.bias"], LN_EPS), cm["decoder_pred.weight"],
                       cm["decoder_pred.bias"])[:, cfg.extra_tokens:]
        p, ch, g = cfg.patch_size, cfg.in_channels, cfg.input_size // cfg.patch_size
        out = torch.einsum("nhwpqc->nchpwq", out.reshape(b, g, g, p, p, ch)).reshape(b, ch, g * p, g * p)
        if cfg.final_conv:
            out = F.conv2d(out, cm["final_layer.weight"], cm["final_layer.bias"], padding=1)
        return out


ENGINE = SlicedUViT
