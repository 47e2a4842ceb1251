"""The eager backend: the uncompiled model with the official masked semantics (the reference).

It ignores the group structure: every group runs the full masked DyDiT. Over a bundle, the TDW
masks of each t are the bundle's own (decided in fp32 at compile, router threshold offset
included), passed to the model's ``tdw_masks=`` override: in fp32 they are bit-identical to what
the routers decide, and in fp16/bf16 the reference then computes what the engines compute
rather than re-deciding near-threshold routers in low precision. Without a bundle the model's
routers decide. Weights come from the checkpoint the bundle was compiled from (the manifest's
``source``) or from an explicit checkpoint/model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ChecksumMismatch, DycError
from ..model import DyDiT
from .base import Backend

if TYPE_CHECKING:
    from ..bundle import Bundle

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def source_checkpoint(bundle: Bundle) -> Path | None:
    """The checkpoint path a bundle records as its source, if it records one that exists here."""
    src = bundle.manifest.get("source") or {}
    for key in ("path", "checkpoint", "file"):
        p = src.get(key) if isinstance(src, dict) else None
        if p:
            path = Path(p)
            if not path.is_absolute():  # relative to the bundle's directory
                path = (bundle.path.parent / path).resolve()
            return path
    return None


class EagerBackend(Backend):
    """``EagerBackend(bundle, device="cpu", checkpoint=None, model=None, dtype=None)``.

    ``checkpoint`` overrides the bundle's recorded source; ``model`` passes a loaded DyDiT
    directly (``bundle`` may then be None: no threshold offset, the trained routers).
    """

    name = "eager"

    def __init__(self, bundle: Bundle | None = None, *, device: str | torch.device = "cpu",
                 checkpoint: str | os.PathLike | None = None, model: DyDiT | None = None,
                 dtype: str | None = None):
        self._device = torch.device(device)
        self.offset = bundle.threshold_offset if bundle is not None else 0.0
        dtype = dtype or (bundle.dtype if bundle is not None else "fp32")
        if dtype not in _TORCH_DTYPES:
            raise DycError(f"unknown dtype {dtype!r}: choose one of {', '.join(_TORCH_DTYPES)}")
        self.dtype = _TORCH_DTYPES[dtype]
        if model is None:
            model = self._load(bundle, checkpoint)
        if bundle is not None and model.config.to_dict() != bundle.config.to_dict():
            raise DycError(f"the checkpoint is a {model.config.name}, the bundle {bundle.config.name}: "
                           "they do not match")
        self.model = model.to(device=self._device, dtype=self.dtype).eval()
        self.bundle = bundle if bundle is not None and bundle.config.dynamic else None
        self._masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _load(bundle: Bundle | None, checkpoint: str | os.PathLike | None) -> DyDiT:
        """The weights: the bundle's source checkpoint (or ``checkpoint``), refused unless it is the very
        file the bundle was compiled from (the manifest's sha256, checked on the bytes the weights come from)."""
        from ..checkpoint import load_checkpoint

        if checkpoint is None:
            if bundle is None:
                raise DycError("the eager backend needs a bundle, a checkpoint or a model")
            checkpoint = source_checkpoint(bundle)
            if checkpoint is None:
                raise DycError(f"{bundle.path}: the bundle does not record its source checkpoint; "
                               "give the checkpoint explicitly for the eager backend")
            if not Path(checkpoint).exists():
                raise DycError(f"{bundle.path}: its source checkpoint {checkpoint} is not here; "
                               "give the checkpoint explicitly for the eager backend")
        if bundle is None:
            return load_checkpoint(checkpoint).model
        src = bundle.manifest.get("source")
        want = src.get("sha256") if isinstance(src, dict) else None
        if not isinstance(want, str):
            raise DycError(f"{bundle.path}: the manifest records no sha256 of its source checkpoint, so the "
                           "eager backend cannot tell that the weights are the compiled ones; recompile the bundle")
        try:
            return load_checkpoint(checkpoint, num_heads=None if bundle.config.dynamic else bundle.config.num_heads,
                                   expect_sha256=want).model
        except ChecksumMismatch:
            raise DycError(f"{checkpoint} is not the checkpoint {bundle.path.name} was compiled from (its sha256 "
                           "differs: the file changed since the compile, or it is another checkpoint)") from None

    @property
    def device(self) -> torch.device:
        return self._device

    def _bundle_masks(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bundle's head/channel masks [B, L, H] for the timesteps of the batch."""
        for v in {int(v) for v in t.tolist()} - self._masks.keys():
            h, c = (torch.from_numpy(m).float().to(self._device) for m in self.bundle.masks_for_t(v))
            self._masks[v] = (h, c)
        pairs = [self._masks[int(v)] for v in t.tolist()]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    @torch.no_grad()
    def run_group(self, group: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["x"].to(device=self._device, dtype=self.dtype)
        t = inputs["t"].to(self._device)
        masks = self._bundle_masks(t) if self.bundle is not None else None
        return self.model(x, t, inputs["y"].to(self._device), threshold_offset=self.offset, tdw_masks=masks)
