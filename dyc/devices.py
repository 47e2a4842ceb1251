"""Device names as users give them (``--device``): checked before any work, one clear error."""

from __future__ import annotations

import torch

from .errors import UsageError


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``torch.device(device)``, or a UsageError naming the forms accepted; None stays None (the default)."""
    if device is None or isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"unknown device {device!r}: give cpu, cuda or cuda:N") from None
