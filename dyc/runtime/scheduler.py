"""Per-step engine switching: original t -> the bundle's group -> that group's graph inputs.

A group's engine computes the union of its member architectures and takes per-t masks where the
members differ (DESIGN.md §4): ``head_mask`` [B, L, Hu] whose slot j of layer l is t's mask of
head ``heads[l][j]`` (slots past the layer's count are 0 and ignored), ``channel_mask`` likewise
for the channel groups. Which mask inputs a group takes is what the manifest says; masks of t
come from the bundle's per-t tables, never from the model, so every backend sees the same ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DycError


@dataclass(frozen=True)
class GroupSpec:
    """What the runtime needs of one group: its t-interval, its union layout and its mask inputs."""

    index: int
    t_lo: int  # inclusive
    t_hi: int  # inclusive
    heads: list[list[int]]  # per layer, original head indices the engine keeps, in slot order
    channels: list[list[int]]
    inputs: tuple[str, ...] = ("x", "t", "y")  # graph inputs; head_mask / channel_mask when it takes them

    @property
    def head_slots(self) -> int:
        return max((len(h) for h in self.heads), default=0)

    @property
    def channel_slots(self) -> int:
        return max((len(c) for c in self.channels), default=0)

    def contains(self, t: int) -> bool:
        return self.t_lo <= t <= self.t_hi


def _slot_masks(per_t: np.ndarray, layout: Sequence[Sequence[int]], slots: int) -> np.ndarray:
    """[L, H] 0/1 of one t -> [L, slots]: slot j of layer l is the mask of unit layout[l][j]."""
    out = np.zeros((len(layout), slots), dtype=np.float32)
    for l, units in enumerate(layout):
        if units:
            out[l, : len(units)] = per_t[l, list(units)]
    return out


class Scheduler:
    """Maps sampler steps to groups and builds each call's inputs.

    ``head_masks`` / ``channel_masks``: the bundle's TDW masks, [T, L, H] 0/1 for t = 0..T-1
    (None for a plain DiT: no group takes mask inputs).
    """

    def __init__(self, groups: Sequence[GroupSpec], head_masks: np.ndarray | None = None,
                 channel_masks: np.ndarray | None = None, num_timesteps: int = 1000):
        if not groups:
            raise DycError("the bundle has no groups")
        self.groups = sorted(groups, key=lambda g: g.t_lo)
        self.head_masks = None if head_masks is None else np.asarray(head_masks)
        self.channel_masks = None if channel_masks is None else np.asarray(channel_masks)
        # interval lookup table: t -> position in self.groups (-1: no group)
        self._of_t = np.full(num_timesteps, -1, dtype=np.int64)
        for pos, g in enumerate(self.groups):
            if g.t_lo < 0 or g.t_hi >= num_timesteps or g.t_lo > g.t_hi:
                raise DycError(f"group {g.index} has an invalid t-interval {g.t_lo}..{g.t_hi}")
            span = self._of_t[g.t_lo: g.t_hi + 1]
            if (span >= 0).any():
                raise DycError(f"group {g.index}'s t-interval {g.t_lo}..{g.t_hi} overlaps another group")
            span[:] = pos
            for name, table in (("head_mask", self.head_masks), ("channel_mask", self.channel_masks)):
                if name in g.inputs and table is None:
                    raise DycError(f"group {g.index} takes {name} but the bundle has no per-t masks")
        self._cache: dict[tuple[int, str], np.ndarray] = {}
        self._full: dict[tuple[int, str], bool] = {}  # (t, mask name) -> every slot of the union on
        # the same masks as call inputs, [B, L, slots] on the device: built once per (t, batch, ...)
        self._feeds: dict[tuple, torch.Tensor] = {}

    def group_of(self, t: int) -> GroupSpec:
        t = int(t)
        pos = int(self._of_t[t]) if 0 <= t < len(self._of_t) else -1
        if pos < 0:
            covered = ", ".join(f"{g.t_lo}..{g.t_hi}" for g in self.groups)
            raise DycError(f"timestep {t} is outside every group of this bundle (it covers {covered})")
        return self.groups[pos]

    def check_schedule(self, timesteps: Sequence[int]) -> list[int]:
        """The group index of every step; fails before sampling starts if any t has no group."""
        return [self.group_of(t).index for t in timesteps]

    def masks_of(self, t: int, g: GroupSpec, name: str) -> np.ndarray:
        key = (t, name)
        if key not in self._cache:
            if name == "head_mask":
                self._cache[key] = _slot_masks(self.head_masks[t], g.heads, g.head_slots)
            else:
                self._cache[key] = _slot_masks(self.channel_masks[t], g.channels, g.channel_slots)
        return self._cache[key]

    def full_width(self, t: int, g: GroupSpec, name: str) -> bool:
        """True when t switches on every unit of ``g``'s union in that mask (it computes the whole engine)."""
        key = (int(t), name)
        if key not in self._full:
            m = self.masks_of(int(t), g, name)
            units = g.heads if name == "head_mask" else g.channels
            self._full[key] = all(bool(m[l, : len(u)].all()) for l, u in enumerate(units))
        return self._full[key]

    def inputs(self, t: int, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None = None,
               omit_full_masks: bool = False) -> tuple[GroupSpec, dict[str, torch.Tensor]]:
        """t's group and its graph inputs for latents ``x`` [B, C, S, S] and labels ``y`` [B].

        ``omit_full_masks``: leave out a mask input that is all ones for t (for backends whose
        engines have a mask-free form, e.g. the torch backend: it then skips the masking work).
        """
        g = self.group_of(t)
        dtype = dtype or x.dtype
        b = x.shape[0]
        feeds: dict[str, torch.Tensor] = {
            "x": x.to(dtype),
            "t": torch.full((b,), int(t), dtype=torch.int64, device=x.device),
            # class ids, or (PixArt-α) text embeddings in the engine's dtype
            "y": y.to(device=x.device, dtype=dtype if y.is_floating_point() else torch.int64),
        }
        for name in ("head_mask", "channel_mask"):
            if name in g.inputs and not (omit_full_masks and self.full_width(int(t), g, name)):
                feeds[name] = self._mask_feed(int(t), g, name, b, x.device, dtype)
        return g, feeds

    def _mask_feed(self, t: int, g: GroupSpec, name: str, b: int, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
        """t's mask input for ``b`` rows, [b, L, slots] on the device."""
        key = (t, name, b, device, dtype)
        if key not in self._feeds:  # a sampler revisits each t once per batch: keep them ready
            m = torch.from_numpy(self.masks_of(t, g, name)).to(device=device, dtype=dtype)
            self._feeds[key] = m.unsqueeze(0).expand(b, -1, -1).contiguous()
        return self._feeds[key]

    def batch_inputs(self, items: Sequence[tuple[int, torch.Tensor, torch.Tensor]], dtype: torch.dtype | None = None,
                     omit_full_masks: bool = False) -> tuple[GroupSpec, dict[str, torch.Tensor]]:
        """One engine call over several chains, each ``(t, x [b_i, C, S, S], y [b_i])``, every t in one group.

        The rows are stacked in order: ``t`` [Σ b_i] holds each row's own t and the mask inputs
        [Σ b_i, L, slots] each row's own masks, so one call may mix timesteps of a group (for a
        backend whose ``mixed_timesteps`` allows it). With ``omit_full_masks`` a mask input is left
        out only when it is all ones for every row. One item gives exactly what ``inputs`` gives.
        """
        if not items:
            raise DycError("an engine call needs at least one chain")
        if len(items) == 1:
            t, x, y = items[0]
            return self.inputs(t, x, y, dtype=dtype, omit_full_masks=omit_full_masks)
        ts = [int(t) for t, _, _ in items]
        g = self.group_of(ts[0])
        for t in ts[1:]:
            if self.group_of(t).index != g.index:
                raise DycError(f"timesteps {ts[0]} and {t} belong to different groups: one call runs one group")
        dev = items[0][1].device
        dtype = dtype or items[0][1].dtype
        counts = [int(x.shape[0]) for _, x, _ in items]
        feeds: dict[str, torch.Tensor] = {
            "x": torch.cat([x.to(device=dev, dtype=dtype) for _, x, _ in items]),
            "t": torch.tensor([t for t, b in zip(ts, counts, strict=True) for _ in range(b)], dtype=torch.int64,
                              device=dev),
            "y": torch.cat([y.to(device=dev, dtype=torch.int64) for _, _, y in items]),
        }
        for name in ("head_mask", "channel_mask"):
            if name in g.inputs and not (omit_full_masks and all(self.full_width(t, g, name) for t in ts)):
                feeds[name] = torch.cat([self._mask_feed(t, g, name, 1, dev, dtype).expand(b, -1, -1)
                                         for t, b in zip(ts, counts, strict=True)])
        return g, feeds
