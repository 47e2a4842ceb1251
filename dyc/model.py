"""The eager DiT/DyDiT model with the official masked semantics (DESIGN.md §1).

This is the reference every compiled path is checked against. It computes everything and
multiplies by masks, exactly as the official code does; it is never the fast path.
Module and parameter names follow the official state-dict layout so checkpoints load as-is.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

FREQ_DIM = 256  # sinusoid width fed to the timestep MLP


def timestep_embedding(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's sinusoidal timestep features: [cos(t·f), sin(t·f)], f_k = max_period^(-k/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """DiT/MAE fixed 2-D sin-cos position embedding, [grid², embed_dim] (float64)."""

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # w first, as DiT does
    emb_h = one_d(embed_dim // 2, grid[0])
    emb_w = one_d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def threshold_gate(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The inference gate of every router: sigmoid(logit) > 0.5, as a 0/1 float mask."""
    return (torch.sigmoid(logits) > 0.5).to(logits.dtype)


# A gate maps router logits to a 0/1 (or, in training, relaxed) mask; kind is "head", "channel"
# or "token". Training swaps it for Gumbel-Sigmoid + straight-through (dyc/recipes/).
Gate = Callable[[torch.Tensor, str], torch.Tensor]


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_ch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # last row: the null class (CFG)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, head_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, H, N, Dh]
        if head_mask is not None:  # zero whole heads before proj
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
        if channel_mask is not None:  # zero whole channel groups after fc1
            b, n, d = h.shape
            h = (h.reshape(b, n, self.groups, d // self.groups) * channel_mask[:, None, :, None]).reshape(b, n, d)
        return self.fc2(F.gelu(h, approximate="tanh"))


class Router(nn.Module):
    """TDW router: Linear C -> H-1 on the timestep embedding (one logit per maskable head/group)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.router = nn.Linear(dim, heads - 1)

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        return self.router(temb)


class TokenSelection(nn.Module):
    """SDT router: Linear C -> C/16, ReLU, Linear -> 1 per token."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp_head = nn.Sequential(nn.Linear(dim, dim // 16), nn.ReLU(), nn.Linear(dim // 16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(x).squeeze(-1)  # [B, N] logits


def _with_head_zero(logits: torch.Tensor, gate: Gate, kind: str) -> torch.Tensor:
    """Gate the H-1 router logits and prepend head/group 0, which is always on."""
    m = gate(logits, kind)
    return torch.cat([torch.ones_like(m[..., :1]), m], dim=-1)


class DiTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, h = cfg.hidden_size, cfg.num_heads
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(c, h)
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(c, cfg.mlp_hidden, h)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.dynamic = cfg.dynamic
        if cfg.dynamic:
            self.attn_rate = Router(c, h)
            self.mlp_rate = Router(c, h)
            self.token_selection = TokenSelection(c)

    def tdw_masks(self, temb: torch.Tensor, gate: Gate, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Head and channel-group masks [B, H] from the timestep embedding (never from c)."""
        mh = _with_head_zero(self.attn_rate(temb) - offset, gate, "head")
        mc = _with_head_zero(self.mlp_rate(temb) - offset, gate, "channel")
        return mh, mc

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor, *, complete: bool, gate: Gate,
        offset: float = 0.0, record: dict | None = None, masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        mh = mc = mt = None
        if self.dynamic and not complete:
            mh, mc = self.tdw_masks(temb, gate, offset) if masks is None else (m.to(x.dtype) for m in masks)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), mh)
        if self.dynamic and not complete:
            mt = gate(self.token_selection(x), "token")  # on x after the attention residual
        y = gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2), mc)
        if mt is not None:
            y = y * mt.unsqueeze(-1)
        if record is not None and mh is not None:
            record.setdefault("head", []).append(mh)
            record.setdefault("channel", []).append(mc)
            record.setdefault("token", []).append(mt)
        return x + y


class FinalLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.hidden_size
        self.norm_final = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(c, cfg.patch_size**2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TimestepRouted:
    """What every model family shares around its routers: TDW masks and router logits from the time
    embedding alone, and the per-block masks a forward pass returns. A model mixes this in and gives
    ``time_embed(t)``, the embedding its routers read."""

    config: ModelConfig
    blocks: nn.ModuleList
    time_embed: Callable[[torch.Tensor], torch.Tensor]

    @torch.no_grad()
    def tdw_masks(self, t: torch.Tensor, threshold_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Head and channel-group masks for timesteps t, each [len(t), L, H] of 0/1.

        Masks depend on t alone (routers read temb), so this needs no image input.
        """
        cfg = self.config
        if not cfg.dynamic:
            ones = torch.ones(len(t), cfg.depth, cfg.num_heads)
            return ones, ones.clone()
        temb = self.time_embed(t)
        pairs = [b.tdw_masks(temb, threshold_gate, threshold_offset) for b in self.blocks]
        return torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)

    @torch.no_grad()
    def router_logits(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw TDW router logits [len(t), L, H-1] for heads and channel groups."""
        temb = self.time_embed(t)
        return (torch.stack([b.attn_rate(temb) for b in self.blocks], 1),
                torch.stack([b.mlp_rate(temb) for b in self.blocks], 1))

    def recorded_masks(self, batch: int, record: dict) -> dict[str, torch.Tensor]:
        """The masks a forward pass recorded, [B, depth, ·] each; all ones when none were (a static model
        or complete_model)."""
        cfg = self.config
        if not record:
            ones = torch.ones(batch, cfg.depth, cfg.num_heads)
            return {"head": ones, "channel": ones.clone(), "token": torch.ones(batch, cfg.depth, cfg.num_tokens)}
        return {key: torch.stack(v, dim=1) for key, v in record.items()}


class DyDiT(TimestepRouted, nn.Module):
    """DiT (``cfg.dynamic=False``) or DyDiT with the official masked forward.

    ``model(x, t, y)`` -> output [B, out_ch, H, W]. Keyword options:
    ``complete_model=True`` runs the full-width DiT (every head, group and token on; the
    official flag of the same name); ``return_masks=True`` also returns the masks of the call
    (``head``/``channel`` [B, L, H] and ``token`` [B, L, N], 0/1 floats).
    ``threshold_offset`` is subtracted from the TDW router logits (the compiler's budget knob).
    ``tdw_masks=(head, channel)``, each [B, L, H], replaces the TDW routers' decisions (e.g. with
    masks decided in fp32 while the model runs in bf16, as a compiled bundle does).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.hidden_size), requires_grad=False)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.gate: Gate = threshold_gate
        if self.pos_embed.device.type != "meta":  # meta: weights come from a checkpoint (assign=True)
            grid = cfg.input_size // cfg.patch_size
            self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed(cfg.hidden_size, grid)).float()[None])

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        p, c, g = cfg.patch_size, cfg.out_channels, cfg.input_size // cfg.patch_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        """Token embeddings, conditioning c and timestep embedding temb."""
        temb = self.t_embedder(t)
        return self.x_embedder(x) + self.pos_embed, temb + self.y_embedder(y), temb

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, complete_model: bool = False,
        return_masks: bool = False, threshold_offset: float = 0.0,
        tdw_masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        h, c, temb = self.embed(x, t, y)
        record: dict | None = {} if return_masks else None
        for l, block in enumerate(self.blocks):
            masks = None if tdw_masks is None else (tdw_masks[0][:, l], tdw_masks[1][:, l])
            h = block(h, c, temb, complete=complete_model, gate=self.gate, offset=threshold_offset, record=record,
                      masks=masks)
        out = self.unpatchify(self.final_layer(h, c))
        if not return_masks:
            return out
        return out, self.recorded_masks(x.shape[0], record)

    def time_embed(self, t: torch.Tensor) -> torch.Tensor:
        return self.t_embedder(t)
