"""U-ViT (Bao et al., 2023) and DyU-ViT: the eager model in the official layout, configs, FLOPs.

The official code is github.com/baofff/U-ViT ``libs/uvit.py``: the time step (and, class-
conditional, the label) enters as a token; ``in_blocks`` → ``mid_block`` → ``out_blocks``, each
out block first mixing in the matching in block's output through a long skip
(``skip_linear(cat[x, skip])``); blocks are pre-norm ViT blocks (affine LayerNorm, eps 1e-5,
qkv without bias in the official configs, exact GELU); then ``norm``, ``decoder_pred`` on every
token, the extras dropped, unpatchify and (pixel-space configs) a 3x3 conv ``final_layer``.

DyU-ViT has no official code. Its routers follow DyDiT's (docs/families.md): per block
``attn_rate.router`` / ``mlp_rate.router`` (Linear C → H−1) read the time token's embedding
``timestep_embedding(t, C)`` only, so the TDW masks depend on t alone (head/group 0 always on);
``token_selection.mlp_head`` (C → C/16 → 1) reads x after the attention residual and gates the
MLP of every token, the time and label tokens included. Block l counts in order: in_blocks,
mid_block, out_blocks.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UVIT_SIZES, ModelConfig
from ..errors import DycError
from ..model import (
    Gate,
    PatchEmbed,
    Router,
    TimestepRouted,
    TokenSelection,
    _with_head_zero,
    threshold_gate,
    timestep_embedding,
)
from . import router_flops

LN_EPS = 1e-5  # torch's LayerNorm default, which U-ViT uses
_HEADS_BY_WIDTH = {c: h for c, _, h in UVIT_SIZES.values()}


# ---- configs ---------------------------------------------------------------------------------
def _official(size: str, patch: int, image_size: int | None, dynamic: bool) -> ModelConfig:
    c, l, h = UVIT_SIZES[size]
    if size == "S":  # configs/cifar10_uvit.py: unconditional, 32x32 pixels, final conv
        if image_size not in (None, 32):
            raise DycError(f"U-ViT-S/{patch} is the CIFAR-10 config (32 px); got --image-size {image_size}")
        return ModelConfig(input_size=32, patch_size=patch, in_channels=3, hidden_size=c, depth=l, num_heads=h,
                           num_classes=0, learn_sigma=False, dynamic=dynamic, vae_scale=1, family="uvit",
                           qkv_bias=False, final_conv=True).validate()
    # configs/imagenet256_uvit_{large,huge}.py: SD-VAE latents, 1000 classes + the null class, no conv
    image_size = 256 if image_size is None else image_size
    if image_size not in (256, 512):
        raise DycError(f"U-ViT-{size}/{patch} is an ImageNet latent config: --image-size 256 or 512")
    return ModelConfig(input_size=image_size // 8, patch_size=patch, in_channels=4, hidden_size=c, depth=l,
                       num_heads=h, num_classes=1000, learn_sigma=False, dynamic=dynamic, vae_scale=8, family="uvit",
                       qkv_bias=False, final_conv=False).validate()


def parse_name(name: str, image_size: int | None) -> ModelConfig | None:
    """'U-ViT-S/2' (CIFAR-10), 'U-ViT-H/2' (ImageNet 256), 'DyU-ViT-…' -> config; None if not a U-ViT."""
    m = re.fullmatch(r"(Dy)?U-?ViT-(S|M|L|H)/(2|4)", name.strip(), flags=re.IGNORECASE)
    if not m:
        return None
    return _official(m.group(2).upper(), int(m.group(3)), image_size, bool(m.group(1)))


def _prefix(cfg: ModelConfig, l: int) -> str:
    """State-dict prefix of block l (in_blocks, then mid_block, then out_blocks)."""
    k = cfg.depth // 2
    if l < k:
        return f"in_blocks.{l}."
    if l == k:
        return "mid_block."
    return f"out_blocks.{l - k - 1}."


block_prefix = _prefix


def infer_config(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> ModelConfig:
    meta = json.loads(metadata["dyc.config"]) if metadata and "dyc.config" in metadata else {}
    if any(k.startswith("time_embed.") for k in sd):
        raise DycError("U-ViT with mlp_time_embed=True is not supported (the official configs have none)")
    try:
        c, in_ch, p, p2 = sd["patch_embed.proj.weight"].shape
        tokens = sd["pos_embed"].shape[1]
        fc1 = sd["mid_block.mlp.fc1.weight"].shape[0]
        out_rows = sd["decoder_pred.weight"].shape[0]
    except KeyError as e:
        raise DycError(f"not a U-ViT checkpoint: missing key {e.args[0]!r}") from None
    except ValueError:
        raise DycError("not a U-ViT checkpoint: embedding weights have unexpected ranks") from None
    classes = sd["label_emb.weight"].shape[0] - 1 if "label_emb.weight" in sd else 0
    extras = 2 if classes > 0 else 1
    grid = math.isqrt(tokens - extras)
    if p != p2 or grid * grid != tokens - extras:
        raise DycError(f"shapes fit no U-ViT config: {tokens} position embeddings, {extras} extra token(s)")
    k = 0
    while f"in_blocks.{k}.attn.qkv.weight" in sd:
        k += 1
    dynamic = "mid_block.attn_rate.router.weight" in sd
    if dynamic:
        heads = sd["mid_block.attn_rate.router.weight"].shape[0] + 1
    elif "num_heads" in meta:
        heads = int(meta["num_heads"])
    elif c in _HEADS_BY_WIDTH:
        heads = _HEADS_BY_WIDTH[c]
    else:
        raise DycError(f"cannot infer the head count of a U-ViT of width {c}: not an official size and no "
                       "'dyc.config' metadata")
    if out_rows != p * p * in_ch:
        raise DycError(f"shapes fit no U-ViT config: decoder_pred has {out_rows} rows for patch {p}, {in_ch} channels")
    cfg = ModelConfig(
        input_size=grid * p, patch_size=p, in_channels=in_ch, hidden_size=c, depth=2 * k + 1, num_heads=heads,
        mlp_ratio=fc1 / c, num_classes=classes, learn_sigma=False, dynamic=dynamic,
        vae_scale=int(meta.get("vae_scale", 8 if in_ch == 4 else 1)), family="uvit",
        qkv_bias="mid_block.attn.qkv.bias" in sd, final_conv="final_layer.weight" in sd,
    )
    try:
        return cfg.validate()
    except DycError as e:
        raise DycError(f"shapes fit no U-ViT config: {e}") from None


# ---- the eager model ---------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, head_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        # 'B L (K H D) -> K B H L D', as the official rearrange
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        if head_mask is not None:
            o = o * head_mask[:, :, None, None]
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, groups: int):
        super().__init__()
        self.groups = groups
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, channel_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.fc1(x)
        if channel_mask is not None:
            b, n, d = h.shape
            h = (h.reshape(b, n, self.groups, d // self.groups) * channel_mask[:, None, :, None]).reshape(b, n, d)
        return self.fc2(F.gelu(h))  # exact GELU (nn.GELU's default), as U-ViT's Mlp


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, skip: bool):
        super().__init__()
        c, h = cfg.hidden_size, cfg.num_heads
        self.norm1 = nn.LayerNorm(c, eps=LN_EPS)
        self.attn = Attention(c, h, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(c, eps=LN_EPS)
        self.mlp = Mlp(c, cfg.mlp_hidden, h)
        self.skip_linear = nn.Linear(2 * c, c) if skip else None
        self.dynamic = cfg.dynamic
        if cfg.dynamic:
            self.attn_rate = Router(c, h)
            self.mlp_rate = Router(c, h)
            self.token_selection = TokenSelection(c)

    def tdw_masks(self, temb: torch.Tensor, gate: Gate, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        mh = _with_head_zero(self.attn_rate(temb) - offset, gate, "head")
        mc = _with_head_zero(self.mlp_rate(temb) - offset, gate, "channel")
        return mh, mc

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, temb: torch.Tensor, *, complete: bool, gate: Gate,
                offset: float = 0.0, record: dict | None = None,
                masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        mh = mc = mt = None
        if self.dynamic and not complete:
            mh, mc = self.tdw_masks(temb, gate, offset) if masks is None else (m.to(x.dtype) for m in masks)
        x = x + self.attn(self.norm1(x), mh)
        if self.dynamic and not complete:
            mt = gate(self.token_selection(x), "token")
        y = self.mlp(self.norm2(x), mc)
        if mt is not None:
            y = y * mt.unsqueeze(-1)
        if record is not None and mh is not None:
            record.setdefault("head", []).append(mh)
            record.setdefault("channel", []).append(mc)
            record.setdefault("token", []).append(mt)
        return x + y


class UViT(TimestepRouted, nn.Module):
    """U-ViT (``cfg.dynamic=False``) or DyU-ViT, official masked semantics; the interface of ``DyDiT``.

    ``model(x, t, y)``: ``y`` class ids [B] (the null class ``num_classes`` for guidance), ignored by
    an unconditional U-ViT (None allowed). Keywords as ``DyDiT.forward``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        c, k = cfg.hidden_size, cfg.depth // 2
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_channels, c)
        if cfg.num_classes > 0:
            self.label_emb = nn.Embedding(cfg.num_classes + 1, c)  # last row: the null class (CFG)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, c))
        self.in_blocks = nn.ModuleList(Block(cfg, skip=False) for _ in range(k))
        self.mid_block = Block(cfg, skip=False)
        self.out_blocks = nn.ModuleList(Block(cfg, skip=True) for _ in range(k))
        self.norm = nn.LayerNorm(c, eps=LN_EPS)
        self.decoder_pred = nn.Linear(c, cfg.patch_size**2 * cfg.in_channels)
        if cfg.final_conv:
            self.final_layer = nn.Conv2d(cfg.in_channels, cfg.in_channels, 3, padding=1)
        self.gate: Gate = threshold_gate
        if self.pos_embed.device.type != "meta":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @property
    def blocks(self) -> list[Block]:
        """All blocks in layer order: in_blocks, mid_block, out_blocks."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """The time token (no time MLP in the official configs); the TDW routers read it."""
        return timestep_embedding(t, self.config.hidden_size).to(self.pos_embed.dtype)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        temb = self.time_embedding(t)
        tokens = [temb[:, None], self.patch_embed(x)]
        if self.config.num_classes > 0:
            if y is None:
                raise DycError(f"{self.config.name} is class-conditional: give class ids")
            tokens.insert(0, self.label_emb(y)[:, None])
        return torch.cat(tokens, dim=1) + self.pos_embed, temb

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """norm, decoder_pred, drop the extra tokens, unpatchify, final conv."""
        cfg = self.config
        out = self.decoder_pred(self.norm(h))[:, cfg.extra_tokens:]
        p, c, g = cfg.patch_size, cfg.in_channels, cfg.input_size // cfg.patch_size
        out = out.reshape(out.shape[0], g, g, p, p, c)  # 'B (h w) (p1 p2 C) -> B C (h p1) (w p2)'
        out = torch.einsum("nhwpqc->nchpwq", out).reshape(out.shape[0], c, g * p, g * p)
        return self.final_layer(out) if cfg.final_conv else out

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, *, complete_model: bool = False,
        return_masks: bool = False, threshold_offset: float = 0.0,
        tdw_masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        h, temb = self.embed(x, t, y)
        record: dict | None = {} if return_masks else None
        skips: list[torch.Tensor] = []
        k = self.config.depth // 2
        for l, block in enumerate(self.blocks):
            masks = None if tdw_masks is None else (tdw_masks[0][:, l], tdw_masks[1][:, l])
            h = block(h, skips.pop() if l > k else None, temb, complete=complete_model, gate=self.gate,
                      offset=threshold_offset, record=record, masks=masks)
            if l < k:
                skips.append(h)
        out = self.head(h)
        if not return_masks:
            return out
        return out, self.recorded_masks(x.shape[0], record)

    def time_embed(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_embedding(t)


def build(cfg: ModelConfig) -> UViT:
    return UViT(cfg)


# ---- conditioning, synth ------------------------------------------------------------------------
def sample_conditions(model: UViT, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.config
    if cfg.num_classes == 0:  # unconditional: y is ignored; both "halves" are the same model call
        y = torch.zeros(n, dtype=torch.int64)
        return y, y.clone()
    y = torch.randint(0, cfg.num_classes, (n,), generator=generator)
    return y, torch.full_like(y, cfg.num_classes)


def time_feature(model: UViT, num_t: int = 1000) -> tuple[torch.Tensor, int]:
    """A channel of the routers' input that grows monotonically with t over 0..num_t-1, its values.

    The time token is the raw sinusoid: sin(t·f_k) with the largest f_k whose phase stays below π/2.
    """
    half = model.config.hidden_size // 2
    k = next(k for k in range(half) if (num_t - 1) * 10000 ** (-k / half) <= math.pi / 2)
    return model.time_embedding(torch.arange(num_t))[:, half + k].clone(), half + k


# ---- FLOPs ------------------------------------------------------------------------------------
def fixed_flops(cfg: ModelConfig, dynamic: bool) -> dict[str, float]:
    """MACs outside MHSA+MLP: patch embedding, decoder (all tokens) + final conv, skip linears, routers."""
    n, c, p, ch = cfg.num_tokens, cfg.hidden_size, cfg.patch_size, cfg.in_channels
    embed = cfg.num_patches * c * ch * p * p
    final = n * c * p * p * ch + (cfg.input_size**2 * ch * ch * 9 if cfg.final_conv else 0)
    other = (cfg.depth // 2) * n * 2 * c * c
    routers = router_flops(cfg) if dynamic else 0.0
    return {"embed": embed, "adaln": 0.0, "final": final, "routers": routers, "other": other}


def fvcore_gflops(cfg: ModelConfig) -> float:
    """GFLOPs as fvcore counts the official code (how the paper's tables were made): affine LayerNorms
    at 5 per element, and no attention matmuls (U-ViT runs them in ``scaled_dot_product_attention``,
    which fvcore does not count)."""
    from ..flops import static_breakdown

    b = static_breakdown(ModelConfig(**{**cfg.to_dict(), "dynamic": False}))
    matmuls = cfg.depth * 2 * cfg.num_tokens**2 * cfg.hidden_size
    norms = (2 * cfg.depth + 1) * cfg.num_tokens * cfg.hidden_size * 5
    return (b.total - matmuls + norms) / 1e9


__all__ = ["UViT", "block_prefix", "build", "fixed_flops", "fvcore_gflops", "infer_config", "parse_name",
           "sample_conditions", "time_feature"]
