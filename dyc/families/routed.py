"""What the families' models share around their routers: TDW masks and router logits from the time
embedding alone, and the per-block masks a forward pass returns. A model mixes this in and says
which module embeds the timestep (``time_embed``)."""

from __future__ import annotations

import torch

from ..model import threshold_gate


class TimestepRouted:
    config: object
    blocks: torch.nn.ModuleList

    def time_embed(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def tdw_masks(self, t: torch.Tensor, threshold_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        if not cfg.dynamic:
            ones = torch.ones(len(t), cfg.depth, cfg.num_heads)
            return ones, ones.clone()
        temb = self.time_embed(t)
        pairs = [b.tdw_masks(temb, threshold_gate, threshold_offset) for b in self.blocks]
        return torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)

    @torch.no_grad()
    def router_logits(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        temb = self.time_embed(t)
        return (torch.stack([b.attn_rate(temb) for b in self.blocks], 1),
                torch.stack([b.mlp_rate(temb) for b in self.blocks], 1))

    def recorded_masks(self, batch: int, record: dict) -> dict[str, torch.Tensor]:
        """The masks a forward pass recorded, [B, depth, ·] each; all ones for a static model."""
        cfg = self.config
        if not record:
            ones = torch.ones(batch, cfg.depth, cfg.num_heads)
            return {"head": ones, "channel": ones.clone(), "token": torch.ones(batch, cfg.depth, cfg.num_tokens)}
        return {key: torch.stack(v, dim=1) for key, v in record.items()}
