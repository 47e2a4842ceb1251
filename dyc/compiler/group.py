"""Pass 3, group: at most K engines, each a contiguous t-interval of 0..999.

A group's engine computes the union of its members' heads/groups and multiplies by per-t masks
where members differ, so results stay exact; what grouping costs is FLOPs. The partition
minimises the expected MHSA+MLP MACs over the requested schedule (SDT keep rates included):
t is first compressed into maximal runs of one architecture, then dynamic programming over
contiguous segments of runs (O(K·R²), R runs; R ≤ 1000) finds the optimum for every K.
Groups cover all of 0..999 (a bundle serves any sampler); t's outside the schedule cost nothing
in the objective but still belong to the interval that contains them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from ..errors import DycError
from ..flops import _fixed_parts, attn_flops_per_head, mlp_flops_per_group
from .plan import GroupPlan

MAX_DEFAULT_GROUPS = 8
DEFAULT_TOLERANCE = 0.02  # default K: within 2% of one engine per distinct architecture


@dataclass
class Runs:
    """Maximal runs of consecutive t with one architecture."""

    start: np.ndarray  # [R] first t
    end: np.ndarray  # [R] last t (inclusive)
    arch: np.ndarray  # [R]


def runs_of(arch_of_t: np.ndarray) -> Runs:
    a = np.asarray(arch_of_t)
    cut = np.flatnonzero(np.diff(a)) + 1
    start = np.concatenate([[0], cut])
    end = np.concatenate([cut - 1, [len(a) - 1]])
    return Runs(start, end, a[start])


def segment_costs(
    cfg: ModelConfig, runs: Runs, arch_head: np.ndarray, arch_channel: np.ndarray, keep: np.ndarray,
    schedule: Sequence[int],
) -> np.ndarray:
    """cost[i, j]: schedule-summed MHSA+MLP MACs of one engine covering runs i..j (inf for j < i)."""
    r = len(runs.start)
    sched = np.asarray(list(schedule), dtype=np.int64)
    run_of_t = np.repeat(np.arange(r), runs.end - runs.start + 1)
    steps = np.bincount(run_of_t[sched], minlength=r).astype(np.float64)  # schedule steps per run
    keepsum = np.zeros((r, cfg.depth))
    np.add.at(keepsum, run_of_t[sched], keep[sched])
    csteps = np.concatenate([[0.0], np.cumsum(steps)])
    ckeep = np.concatenate([np.zeros((1, cfg.depth)), np.cumsum(keepsum, axis=0)])
    fh, fg = attn_flops_per_head(cfg), mlp_flops_per_group(cfg)
    heads = arch_head[runs.arch]  # [R, L, H]
    chans = arch_channel[runs.arch]
    cost = np.full((r, r), np.inf)
    for i in range(r):
        uh = np.logical_or.accumulate(heads[i:], axis=0).sum(-1)  # [R-i, L] union head counts
        uc = np.logical_or.accumulate(chans[i:], axis=0).sum(-1)
        n = csteps[i + 1:] - csteps[i]  # schedule steps in runs i..j
        ks = ckeep[i + 1:] - ckeep[i]  # [R-i, L]
        cost[i, i:] = fh * uh.sum(-1) * n + fg * (uc * ks).sum(-1)
    return cost


def best_partitions(cost: np.ndarray, kmax: int) -> tuple[np.ndarray, list[list[int]]]:
    """Optimal ≤k-segment partitions for k = 1..kmax.

    Returns best[k-1] (expected cost) and, per k, the first run index of each segment.
    """
    r = cost.shape[0]
    kmax = min(kmax, r)
    best = np.empty(kmax)
    splits: list[list[int]] = []
    prev = cost[0].copy()  # prev[j]: best cost of runs 0..j with ≤ k segments
    back = [np.zeros(r, dtype=np.int64)]  # start of the last segment
    best[0] = prev[-1]
    for _k in range(1, kmax):
        # cand[i, j] = prev[i-1] + cost[i, j] for i ≥ 1 (last segment starts at run i)
        cand = prev[:-1, None] + cost[1:, :]
        arg = np.argmin(cand, axis=0)
        val = cand[arg, np.arange(r)]
        take = val < prev - 1e-9 * np.abs(prev)  # a new segment only when it strictly helps
        cur = np.where(take, val, prev)
        start = np.where(take, arg + 1, -1)
        back.append(start)
        prev = cur
        best[_k] = prev[-1]
    for k in range(1, kmax + 1):
        starts, j, kk = [], r - 1, k - 1
        while j >= 0:
            while kk > 0 and back[kk][j] < 0:
                kk -= 1  # this prefix was not improved at level kk: same as level kk-1
            s = 0 if kk == 0 else int(back[kk][j])
            starts.append(s)
            j, kk = s - 1, kk - 1
        splits.append(sorted(starts))
    return best, splits


def choose_k(best: np.ndarray, ideal: float, tolerance: float = DEFAULT_TOLERANCE) -> int:
    """Smallest K whose expected cost is within ``tolerance`` of the ideal (else the largest K)."""
    for k, c in enumerate(best, start=1):
        if c <= ideal * (1 + tolerance) * (1 + 1e-12):
            return k
    return len(best)


def partition(
    cfg: ModelConfig, arch_of_t: np.ndarray, arch_head: np.ndarray, arch_channel: np.ndarray, keep: np.ndarray,
    schedule: Sequence[int], max_groups: int | None = None,
) -> list[GroupPlan]:
    """The groups: ``max_groups`` bounds K; None picks the default K (≤ 8, within 2% of ideal)."""
    if max_groups is not None and max_groups < 1:
        raise DycError(f"--groups must be at least 1, got {max_groups}")
    runs = runs_of(arch_of_t)
    cost = segment_costs(cfg, runs, arch_head, arch_channel, keep, schedule)
    kmax = MAX_DEFAULT_GROUPS if max_groups is None else max_groups
    best, splits = best_partitions(cost, kmax)
    ideal = float(np.diag(cost).sum())
    k = choose_k(best, ideal) if max_groups is None else len(best)
    starts = splits[k - 1]
    ends = [s - 1 for s in starts[1:]] + [len(runs.start) - 1]
    sched = np.asarray(list(schedule))
    fixed = sum(_fixed_parts(cfg, dynamic=cfg.dynamic).values()) - (
        2 * cfg.hidden_size * (cfg.num_heads - 1) * cfg.depth if cfg.dynamic else 0  # TDW routers: not in engines
    )
    fh, fg = attn_flops_per_head(cfg), mlp_flops_per_group(cfg)
    groups = []
    for gi, (a, b) in enumerate(zip(starts, ends, strict=True)):
        members = sorted(set(int(x) for x in runs.arch[a:b + 1]))
        uh = arch_head[members].any(0)
        uc = arch_channel[members].any(0)
        vh = [bool((arch_head[members][:, l] != uh[l]).any()) for l in range(cfg.depth)]
        vc = [bool((arch_channel[members][:, l] != uc[l]).any()) for l in range(cfg.depth)]
        t_lo, t_hi = int(runs.start[a]), int(runs.end[b])
        in_g = sched[(sched >= t_lo) & (sched <= t_hi)]
        mean_keep = keep[in_g].mean(0) if len(in_g) else keep[t_lo:t_hi + 1].mean(0)
        blocks = fh * uh.sum() + fg * (uc.sum(-1) * mean_keep).sum()
        groups.append(GroupPlan(
            index=gi, t_lo=t_lo, t_hi=t_hi, architectures=members,
            heads=[np.flatnonzero(uh[l]).tolist() for l in range(cfg.depth)],
            channels=[np.flatnonzero(uc[l]).tolist() for l in range(cfg.depth)],
            vary_head=vh, vary_channel=vc, schedule_steps=len(in_g),
            gflops=float(blocks + fixed) / 1e9, block_gflops=float(blocks) / 1e9,
        ))
    return groups


def engine_block_flops(cfg: ModelConfig, group: GroupPlan, keep_row: np.ndarray) -> float:
    """MHSA+MLP MACs of a group's engine at one t (keep rates [L] of that t)."""
    nh = sum(len(h) for h in group.heads)
    nc = np.array([len(c) for c in group.channels], dtype=np.float64)
    return attn_flops_per_head(cfg) * nh + mlp_flops_per_group(cfg) * float((nc * keep_row).sum())


def compiled_ratio(cfg: ModelConfig, groups: Sequence[GroupPlan], keep: np.ndarray, schedule: Sequence[int]) -> float:
    """λ the engines realise: union widths of each t's group, averaged over the schedule."""
    from ..flops import static_breakdown

    static = static_breakdown(cfg).blocks
    vals = [engine_block_flops(cfg, group_of(groups, t), keep[t]) / static for t in schedule]
    return float(np.mean(vals))


def group_of(groups: Sequence[GroupPlan], t: int) -> GroupPlan:
    for g in groups:
        if g.contains(t):
            return g
    raise DycError(f"timestep {t} is in no group")


def format_table(cfg: ModelConfig, groups: Sequence[GroupPlan], total_steps: int) -> str:
    """The table the CLI prints: group, t-range, active heads/groups, GFLOPs, share of steps."""
    lh = cfg.depth * cfg.num_heads
    rows = [f"{'group':>5}  {'t-range':>9}  {'archs':>5}  {'heads':>9}  {'ch.groups':>9}  {'GFLOPs':>8}  "
            f"{'steps':>11}"]
    for g in groups:
        nh = sum(len(h) for h in g.heads)
        nc = sum(len(c) for c in g.channels)
        share = g.schedule_steps / total_steps if total_steps else 0.0
        rows.append(
            f"{g.index:>5}  {f'{g.t_lo}-{g.t_hi}':>9}  {len(g.architectures):>5}  {f'{nh}/{lh}':>9}  "
            f"{f'{nc}/{lh}':>9}  {g.gflops:>8.4g}  {f'{g.schedule_steps} ({100 * share:.0f}%)':>11}"
        )
    return "\n".join(rows)
