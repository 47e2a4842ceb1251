"""Classifier-free guidance as DiT does it: one doubled batch, conditional half first, null class last.

Standard CFG guides every eps channel: eps = eps_u + s·(eps_c − eps_u); the variance channels
(learn_sigma) come from the conditional half. ``official=True`` reproduces DiT's
``forward_with_cfg``: only the first three channels of the model output are guided and the
rest are the conditional half's own (a quirk of the released code, kept for reproducibility).
"""

from __future__ import annotations

import torch


def cfg_inputs(x: torch.Tensor, y: torch.Tensor, null_class: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The doubled batch: (x ‖ x, y ‖ null). ``null_class`` may be a null embedding (PixArt-α's null text,
    broadcast over the batch)."""
    if isinstance(null_class, torch.Tensor):
        return torch.cat([x, x]), torch.cat([y, null_class.to(device=y.device, dtype=y.dtype).expand_as(y)])
    return torch.cat([x, x]), torch.cat([y, torch.full_like(y, null_class)])


def cfg_combine(out: torch.Tensor, in_channels: int, scale: float, official: bool = False) -> torch.Tensor:
    """The model output of the doubled batch -> the guided output of the conditional half."""
    cond, uncond = out.chunk(2)
    k = 3 if official else in_channels
    guided = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1)
