"""The compile plan: plain, JSON-serialisable data that flows between the passes.

Every pass is a function over these records (and numpy arrays for the per-t tables), so each
can be run and tested alone. ``Plan.to_dict()`` is what ``manifest.json`` is built from.

Mask encoding: a layer's head (or channel-group) mask is stored as an int bitmask, bit h set
when head h is on; an architecture is ``{"head": [L ints], "channel": [L ints]}``. Masks for
every t in 0..999 are ``arch_of_t[t]`` (an index into ``architectures``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

NUM_T = 1000


def mask_to_bits(mask: np.ndarray) -> list[int]:
    """[L, H] 0/1 -> one int per layer (bit h = head/group h on)."""
    m = np.asarray(mask).astype(bool)
    weights = 1 << np.arange(m.shape[-1], dtype=object)
    return [int(sum(int(w) for w, on in zip(weights, row, strict=True) if on)) for row in m]


def bits_to_mask(bits: list[int], width: int) -> np.ndarray:
    """Inverse of ``mask_to_bits``: one int per layer -> [L, width] bool."""
    return np.array([[(int(b) >> h) & 1 for h in range(width)] for b in bits], dtype=bool)


@dataclass
class Architecture:
    """The TDW masks of one timestep: which heads / channel groups each layer runs."""

    head: list[int]  # bitmask per layer
    channel: list[int]

    def masks(self, num_heads: int) -> tuple[np.ndarray, np.ndarray]:
        return bits_to_mask(self.head, num_heads), bits_to_mask(self.channel, num_heads)


@dataclass
class GroupPlan:
    """One engine: a contiguous t-interval, computing the union of its members' heads/groups.

    ``heads[l]`` / ``channels[l]``: original indices of the union's active heads/groups of layer
    l, in the order the sliced weights store them. ``vary_head[l]`` (``vary_channel[l]``): the
    members differ in that layer, so the engine multiplies by a per-t mask input there.
    """

    index: int
    t_lo: int  # inclusive
    t_hi: int  # inclusive
    architectures: list[int]  # member architecture indices
    heads: list[list[int]]
    channels: list[list[int]]
    vary_head: list[bool]
    vary_channel: list[bool]
    schedule_steps: int = 0  # steps of the grouping schedule that fall in this group
    gflops: float = 0.0  # engine MACs per image per forward (all parts), at the group's mean keep rate
    block_gflops: float = 0.0  # MHSA+MLP part of gflops

    @property
    def head_slots(self) -> int:
        """Width of the head-mask input: the most union heads of any layer."""
        return max(len(h) for h in self.heads)

    @property
    def channel_slots(self) -> int:
        return max(len(c) for c in self.channels)

    @property
    def needs_head_mask(self) -> bool:
        return any(self.vary_head)

    @property
    def needs_channel_mask(self) -> bool:
        return any(self.vary_channel)

    def contains(self, t: int) -> bool:
        return self.t_lo <= t <= self.t_hi

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GroupPlan:
        return cls(**d)


@dataclass
class Plan:
    """Everything the compile decided, before any file is written."""

    config: dict
    dtype: str
    sampler: str
    steps: int
    schedule: list[int]  # original t's of the grouping schedule, in sampling order
    lambda_target: float | None
    lambda_model: float  # ratio of the per-t masks (the paper's λ) over the schedule, SDT included
    lambda_realized: float  # ratio the grouped engines compute (unions), over the schedule
    lambda_trained: float  # ratio at the trained thresholds (offset 0)
    threshold_offset: float
    offset_forced: bool  # the offset is not the trained one: the model was not trained for it
    architectures: list[Architecture]
    arch_of_t: list[int]  # len 1000
    groups: list[GroupPlan]
    calibration: dict = field(default_factory=dict)  # samples, steps, seed, cfg_scale, timesteps, keep rates

    def to_dict(self) -> dict:
        d = asdict(self)
        d["architectures"] = [asdict(a) for a in self.architectures]
        d["groups"] = [g.to_dict() for g in self.groups]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        d = dict(d)
        d["architectures"] = [Architecture(**a) for a in d["architectures"]]
        d["groups"] = [GroupPlan.from_dict(g) for g in d["groups"]]
        return cls(**d)
