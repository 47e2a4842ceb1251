"""The one interface every backend implements (eager, onnxruntime, torch, tensorrt)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class Backend(ABC):
    """Runs the group engines of one bundle on one device.

    Engines run one after another (the scheduler switches them per sampling step), so a backend
    may share activation memory between groups. ``run_group`` takes the group's graph inputs by
    name (``x``, ``t``, ``y`` and the mask inputs the manifest lists for that group) and returns
    the model output ``[B, out_ch, H, W]`` on ``self.device``.
    """

    name: ClassVar[str]
    # True when run_group may be given a group's inputs without a mask that is all ones for the
    # step (Scheduler.inputs(omit_full_masks=True)): the engine then runs its mask-free form
    optional_masks: ClassVar[bool] = False
    # True when the rows of one run_group call may be at different timesteps (of the same group): each
    # row then takes its own t and mask rows (Scheduler.batch_inputs; the server batches requests so)
    mixed_timesteps: ClassVar[bool] = True

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether this backend can run on this machine, and if not, why (one line)."""
        return True, ""

    @abstractmethod
    def run_group(self, group: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    def close(self) -> None:  # noqa: B027 - an optional hook: most backends hold nothing to release
        """Release engines and device memory."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
