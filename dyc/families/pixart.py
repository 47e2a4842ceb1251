"""PixArt-α (Chen et al., 2023) and DyPixArt-α: the eager model in the official layout, configs, FLOPs.

The official code is github.com/PixArt-alpha/PixArt-alpha ``diffusion/model/nets/PixArt.py`` and
``PixArt_blocks.py``: a DiT whose condition is text. ``y_embedder`` projects the text-encoder
embeddings [B, T, 4096] (T5-XXL, T = 120) with ``y_proj`` (fc1 → GELU-tanh → fc2); its
``y_embedding`` [T, 4096] is the null text for guidance. adaLN-single: one ``t_block`` (SiLU →
Linear C → 6C) of the timestep embedding, plus each block's learned ``scale_shift_table`` [6, C].
A block: self-attention (``attn.qkv``/``attn.proj``) and MLP modulated as DiT's
(``x·(1+scale)+shift``, no-affine LayerNorm eps 1e-6), and between them an ungated
cross-attention (``cross_attn.q_linear`` on x, ``kv_linear`` on the text, ``proj``) in which each
sample attends to its own T text tokens. The final layer modulates with its own table plus the
timestep embedding itself.

Text embeddings are an input here (the text encoder cannot be downloaded): every call takes the
full T tokens (official calls with a mask of all ones; per-token padding masks are not modelled).

DyPixArt-α has no official code. Its routers follow DyDiT's (docs/families.md): ``attn_rate`` /
``mlp_rate`` read the timestep embedding ``t_embedder(t)`` (not ``t_block``'s output), so TDW
masks depend on t alone, and mask the self-attention heads and the MLP channel groups;
``token_selection`` reads x entering the MLP (after the cross-attention residual) and gates the
MLP per token. Cross-attention stays full width: its cost is small next to the rest (its keys
are the T text tokens) and it is the only path of the text into the image tokens.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PIXART_SIZES, ModelConfig
from ..errors import DycError
from ..model import (
    FREQ_DIM,
    Attention,
    Gate,
    Mlp,
    PatchEmbed,
    Router,
    TimestepEmbedder,
    TimestepRouted,
    TokenSelection,
    _with_head_zero,
    sincos_pos_embed,
    threshold_gate,
)
from . import router_flops

TEXT_CHANNELS = 4096  # T5-XXL
TEXT_LEN = 120  # PixArt-α's model_max_length


def parse_name(name: str, image_size: int | None) -> ModelConfig | None:
    """'PixArt-XL/2' (also 'PixArt-α-XL/2', 'PixArt-alpha-XL/2', 'DyPixArt-…') -> config; None otherwise."""
    m = re.fullmatch(r"(Dy)?PixArt(?:-α|-alpha)?-(XL)/2", name.strip(), flags=re.IGNORECASE)
    if not m:
        return None
    image_size = 256 if image_size is None else image_size
    if image_size not in (256, 512, 1024):
        raise DycError(f"PixArt-α has 256, 512 and 1024 px models; got --image-size {image_size}")
    c, l, h = PIXART_SIZES["XL"]
    return ModelConfig(input_size=image_size // 8, patch_size=2, in_channels=4, hidden_size=c, depth=l, num_heads=h,
                       num_classes=0, learn_sigma=True, dynamic=bool(m.group(1)), vae_scale=8, family="pixart",
                       text_channels=TEXT_CHANNELS, text_len=TEXT_LEN).validate()


def infer_config(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> ModelConfig:
    meta = json.loads(metadata["dyc.config"]) if metadata and "dyc.config" in metadata else {}
    try:
        c, in_ch, p, p2 = sd["x_embedder.proj.weight"].shape
        n = sd["pos_embed"].shape[1]
        text_len, text_ch = sd["y_embedder.y_embedding"].shape
        fc1 = sd["blocks.0.mlp.fc1.weight"].shape[0]
        out_rows = sd["final_layer.linear.weight"].shape[0]
    except KeyError as e:
        raise DycError(f"not a PixArt checkpoint: missing key {e.args[0]!r}") from None
    except ValueError:
        raise DycError("not a PixArt checkpoint: embedding weights have unexpected ranks") from None
    grid = math.isqrt(n)
    if p != p2 or grid * grid != n:
        raise DycError(f"shapes fit no PixArt config: {n} position embeddings is not a square grid")
    depth = 0
    while f"blocks.{depth}.attn.qkv.weight" in sd:
        depth += 1
    dynamic = "blocks.0.attn_rate.router.weight" in sd
    if dynamic:
        heads = sd["blocks.0.attn_rate.router.weight"].shape[0] + 1
    elif "num_heads" in meta:
        heads = int(meta["num_heads"])
    elif c == PIXART_SIZES["XL"][0]:
        heads = PIXART_SIZES["XL"][2]
    else:
        raise DycError(f"cannot infer the head count of a PixArt of width {c}: not an official size and no "
                       "'dyc.config' metadata")
    out_ch, rem = divmod(out_rows, p * p)
    if rem or out_ch not in (in_ch, 2 * in_ch):
        raise DycError(f"shapes fit no PixArt config: final layer has {out_rows} rows for patch {p}")
    cfg = ModelConfig(
        input_size=grid * p, patch_size=p, in_channels=in_ch, hidden_size=c, depth=depth, num_heads=heads,
        mlp_ratio=fc1 / c, num_classes=0, learn_sigma=out_ch == 2 * in_ch, dynamic=dynamic,
        vae_scale=int(meta.get("vae_scale", 8)), family="pixart", text_channels=text_ch, text_len=text_len,
    )
    try:
        return cfg.validate()
    except DycError as e:
        raise DycError(f"shapes fit no PixArt config: {e}") from None


# ---- the eager model ---------------------------------------------------------------------------
def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x·(1 + scale) + shift with shift/scale [B, 1, C] (PixArt's form of DiT's modulate)."""
    return x * (1 + scale) + shift


class CaptionProjection(nn.Module):
    """timm's Mlp as PixArt uses it for ``y_proj``: fc1 → GELU-tanh → fc2."""

    def __init__(self, in_ch: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_ch, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(y), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.y_proj = CaptionProjection(cfg.text_channels, cfg.hidden_size)
        # the null text (guidance); a buffer in the official code, saved in its state dict
        self.register_buffer("y_embedding", torch.randn(cfg.text_len, cfg.text_channels) / cfg.text_channels**0.5)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class CrossAttention(nn.Module):
    """Each sample's image tokens attend to its own text tokens (the block-diagonal mask of the official
    xformers call), every head on."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.heads
        q = self.q_linear(x).reshape(b, n, self.heads, d).transpose(1, 2)
        kv = self.kv_linear(cond).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, h = cfg.hidden_size, cfg.num_heads
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(c, h)
        self.cross_attn = CrossAttention(c, h)
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(c, cfg.mlp_hidden, h)  # fc1 → GELU-tanh → fc2, channel groups maskable
        self.scale_shift_table = nn.Parameter(torch.randn(6, c) / c**0.5)
        self.dynamic = cfg.dynamic
        if cfg.dynamic:
            self.attn_rate = Router(c, h)
            self.mlp_rate = Router(c, h)
            self.token_selection = TokenSelection(c)

    def tdw_masks(self, temb: torch.Tensor, gate: Gate, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        mh = _with_head_zero(self.attn_rate(temb) - offset, gate, "head")
        mc = _with_head_zero(self.mlp_rate(temb) - offset, gate, "channel")
        return mh, mc

    def forward(self, x: torch.Tensor, cond: torch.Tensor, t0: torch.Tensor, temb: torch.Tensor, *, complete: bool,
                gate: Gate, offset: float = 0.0, record: dict | None = None,
                masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b = x.shape[0]
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table[None] + t0.reshape(b, 6, -1)).chunk(
            6, dim=1)  # each [B, 1, C]
        mh = mc = mt = None
        if self.dynamic and not complete:
            mh, mc = self.tdw_masks(temb, gate, offset) if masks is None else (m.to(x.dtype) for m in masks)
        x = x + gate1 * self.attn(t2i_modulate(self.norm1(x), shift1, scale1), mh)
        x = x + self.cross_attn(x, cond)
        if self.dynamic and not complete:
            mt = gate(self.token_selection(x), "token")  # on x entering the MLP
        y = gate2 * self.mlp(t2i_modulate(self.norm2(x), shift2, scale2), mc)
        if mt is not None:
            y = y * mt.unsqueeze(-1)
        if record is not None and mh is not None:
            record.setdefault("head", []).append(mh)
            record.setdefault("channel", []).append(mc)
            record.setdefault("token", []).append(mt)
        return x + y


class FinalLayer(nn.Module):
    """T2IFinalLayer: modulate with ``scale_shift_table`` [2, C] + the timestep embedding, then linear."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.hidden_size
        self.norm_final = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(c, cfg.patch_size**2 * cfg.out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, c) / c**0.5)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + temb[:, None]).chunk(2, dim=1)
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))


class PixArt(TimestepRouted, nn.Module):
    """PixArt-α (``cfg.dynamic=False``) or DyPixArt-α, official masked semantics; the interface of ``DyDiT``.

    ``model(x, t, y)``: ``y`` the text embeddings [B, T, C_text] (``y_embedder.y_embedding`` is the
    null text for guidance). Keywords as ``DyDiT.forward``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        c = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, c)
        self.t_embedder = TimestepEmbedder(c)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.y_embedder = CaptionEmbedder(cfg)
        self.register_buffer("pos_embed", torch.zeros(1, cfg.num_tokens, c))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.gate: Gate = threshold_gate
        if self.pos_embed.device.type != "meta":  # lewei_scale 1, base_size = grid: DiT's grid
            grid = cfg.input_size // cfg.patch_size
            self.pos_embed.copy_(torch.from_numpy(sincos_pos_embed(c, grid)).float()[None])

    @property
    def null_embedding(self) -> torch.Tensor:
        return self.y_embedder.y_embedding

    def check_text(self, y: torch.Tensor) -> None:
        cfg = self.config
        if y is None or y.dim() != 3 or tuple(y.shape[1:]) != (cfg.text_len, cfg.text_channels):
            got = None if y is None else list(y.shape)
            raise DycError(f"{cfg.name} takes text embeddings [B, {cfg.text_len}, {cfg.text_channels}], got {got}")

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, complete_model: bool = False,
        return_masks: bool = False, threshold_offset: float = 0.0,
        tdw_masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.check_text(y)
        cfg = self.config
        h = self.x_embedder(x) + self.pos_embed
        temb = self.t_embedder(t)
        t0 = self.t_block(temb)
        cond = self.y_embedder(y.to(h.dtype))
        record: dict | None = {} if return_masks else None
        for l, block in enumerate(self.blocks):
            masks = None if tdw_masks is None else (tdw_masks[0][:, l], tdw_masks[1][:, l])
            h = block(h, cond, t0, temb, complete=complete_model, gate=self.gate, offset=threshold_offset,
                      record=record, masks=masks)
        out = self.final_layer(h, temb)
        p, oc, g = cfg.patch_size, cfg.out_channels, cfg.input_size // cfg.patch_size
        out = torch.einsum("nhwpqc->nchpwq", out.reshape(out.shape[0], g, g, p, p, oc))
        out = out.reshape(out.shape[0], oc, g * p, g * p)
        if not return_masks:
            return out
        return out, self.recorded_masks(x.shape[0], record)

    def time_embed(self, t: torch.Tensor) -> torch.Tensor:
        return self.t_embedder(t)


def build(cfg: ModelConfig) -> PixArt:
    return PixArt(cfg)


def block_prefix(cfg: ModelConfig, l: int) -> str:
    return f"blocks.{l}."


# ---- conditioning ------------------------------------------------------------------------------
TEXT_STD = 0.15  # about the per-element scale of T5-XXL encoder outputs: stands in for real prompts


def sample_conditions(model: PixArt, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random text embeddings (Gaussian, T5-like scale) and the null text, [n, T, C_text] each."""
    cfg = model.config
    y = TEXT_STD * torch.randn(n, cfg.text_len, cfg.text_channels, generator=generator)
    return y, model.null_embedding.detach().float().cpu().expand(n, -1, -1).clone()


# ---- FLOPs ------------------------------------------------------------------------------------
def cross_flops(cfg: ModelConfig) -> float:
    """One block's cross-attention per image: q_linear, kv_linear (text tokens), two matmuls, proj."""
    n, t, c = cfg.num_tokens, cfg.text_len, cfg.hidden_size
    return 2 * n * c * c + 2 * t * c * c + 2 * n * t * c


def fixed_flops(cfg: ModelConfig, dynamic: bool) -> dict[str, float]:
    """MACs outside MHSA+MLP. ``other``: text projection + every block's cross-attention."""
    n, c, p = cfg.num_tokens, cfg.hidden_size, cfg.patch_size
    embed = n * c * cfg.in_channels * p * p + FREQ_DIM * c + c * c
    adaln = 6 * c * c  # t_block, once (the tables are additions)
    final = n * c * p * p * cfg.out_channels
    text = cfg.text_len * (cfg.text_channels * c + c * c)
    other = text + cfg.depth * cross_flops(cfg)
    routers = router_flops(cfg) if dynamic else 0.0
    return {"embed": embed, "adaln": adaln, "final": final, "routers": routers, "other": other}


def fvcore_gflops(cfg: ModelConfig) -> float:
    """GFLOPs as fvcore counts the official code: LayerNorms (no affine) at 4 per element, and no
    attention matmuls, self or cross (PixArt runs both in xformers' memory-efficient attention,
    which fvcore does not count)."""
    from ..flops import static_breakdown

    b = static_breakdown(ModelConfig(**{**cfg.to_dict(), "dynamic": False}))
    n, t, c = cfg.num_tokens, cfg.text_len, cfg.hidden_size
    matmuls = cfg.depth * (2 * n * n * c + 2 * n * t * c)
    norms = (2 * cfg.depth + 1) * n * c * 4
    return (b.total - matmuls + norms) / 1e9


__all__ = ["PixArt", "block_prefix", "build", "cross_flops", "fixed_flops", "fvcore_gflops", "infer_config",
           "parse_name", "sample_conditions"]
