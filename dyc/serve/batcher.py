"""Step-level (continuous) batching: many sampling chains share each engine call.

Every request in flight is a chain with its own sampler state, generator, latents and step.
One worker thread owns the backend; each turn it picks the chains whose *current* timestep
maps to one bundle group (``pick_batch``), stacks their rows (CFG doubles each) into one call
of that group's engine with per-row t and masks (``Scheduler.batch_inputs``), splits the output
and advances each chain one step. A new request joins at its first step on the next turn; a
finished one leaves. A chain runs exactly the maths of ``dyc.Pipeline`` on that request alone
(same noise, same per-step updates), so its result is the same up to how the engine's GEMMs
block a different number of rows.

For a backend whose engines serve one t per call (``Backend.mixed_timesteps`` False) only
chains at the same t share a call.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..backends.base import Backend
from ..config import ModelConfig
from ..errors import DycError
from ..runtime.cfg import cfg_combine, cfg_inputs
from ..runtime.samplers import Sampler, make_sampler
from ..runtime.scheduler import Scheduler
from .request import GenerationRequest

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---- the policy ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Waiting:
    """A chain whose next step is ready, as the policy sees it."""

    key: Hashable  # chains with equal keys may share an engine call (the group; with t if it must match)
    rows: int  # engine rows its step takes
    since: float  # when this step became ready (seconds, monotonic)
    order: int  # arrival order: ties go to the earlier request


def pick_batch(waiting: Sequence[Waiting], now: float, deadline_s: float, max_rows: int) -> list[int]:
    """Which waiting chains run in the next engine call (indices into ``waiting``).

    The key: the oldest chain's once it has waited longer than ``deadline_s`` (so none starves),
    else the key with the most waiting rows (counted up to ``max_rows``, what one call can take;
    ties to the key whose oldest chain waited longest). Within the key, oldest first, every chain
    that still fits under ``max_rows``. A chain larger than ``max_rows`` alone still runs alone.
    """
    if not waiting:
        return []
    age = sorted(range(len(waiting)), key=lambda i: (waiting[i].since, waiting[i].order))
    oldest = waiting[age[0]]
    if now - oldest.since > deadline_s:
        key = oldest.key
    else:
        rows: dict[Hashable, int] = defaultdict(int)
        first: dict[Hashable, int] = {}
        for rank, i in enumerate(age):
            rows[waiting[i].key] += waiting[i].rows
            first.setdefault(waiting[i].key, rank)
        key = max(rows, key=lambda k: (min(rows[k], max_rows), -first[k]))
    chosen, used = [], 0
    for i in age:
        w = waiting[i]
        if w.key == key and (not chosen or used + w.rows <= max_rows):
            chosen.append(i)
            used += w.rows
    return chosen


def row_buckets(max_rows: int) -> list[int]:
    """Padded call sizes for engines that want few distinct batch sizes (CUDA graphs): 1, 2, 4, …, max_rows."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    return out + [max_rows]


# ---- the chains ----------------------------------------------------------------------------------
@dataclass(eq=False)
class Chain:
    """One request in flight: its sampler state, generator, latents and where it is."""

    id: int
    request: GenerationRequest
    future: Future
    arrived: float
    sampler: Sampler | None = None
    generator: torch.Generator | None = None
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    step: int = 0
    since: float = 0.0

    @property
    def t(self) -> int:
        return self.sampler.timesteps[self.step]


@dataclass
class BatcherStats:
    """Counters of the engine calls so far (what ``dyc_stats`` reports)."""

    calls: int = 0
    rows: int = 0
    padded_rows: int = 0  # rows added to reach a bucket size
    requests_submitted: int = 0
    requests_done: int = 0
    requests_failed: int = 0
    requests_dropped: int = 0  # cancelled before they finished
    engine_s: float = 0.0
    requests_per_call: Counter = field(default_factory=Counter)
    mixed_t_calls: int = 0  # calls whose rows were at different timesteps

    def to_dict(self) -> dict:
        multi = sum(n for k, n in self.requests_per_call.items() if k > 1)
        return {"calls": self.calls, "rows": self.rows, "padded_rows": self.padded_rows,
                "requests_submitted": self.requests_submitted, "requests_done": self.requests_done,
                "requests_failed": self.requests_failed, "requests_dropped": self.requests_dropped,
                "engine_s": round(self.engine_s, 4), "multi_request_calls": multi,
                "max_requests_per_call": max(self.requests_per_call, default=0),
                "requests_per_call": {str(k): v for k, v in sorted(self.requests_per_call.items())},
                "mixed_t_calls": self.mixed_t_calls}


class StepBatcher:
    """Runs submitted requests on one backend with step-level batching, in one worker thread.

    ``submit(request)`` returns a Future of the final latents [n, C, S, S] float32 (CPU). ``max_rows``
    caps the rows of one engine call; ``deadline_s`` bounds how long a ready step may wait while
    other groups run; ``buckets`` pads each call's rows up to the next of these sizes (repeating
    the last row; the extra outputs are dropped) so engines see few batch sizes.
    """

    def __init__(self, backend: Backend, scheduler: Scheduler, config: ModelConfig, *, dtype: str = "fp32",
                 max_rows: int = 64, deadline_s: float = 0.05, buckets: Sequence[int] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if max_rows < 1:
            raise DycError(f"max batch must be at least 1 row, got {max_rows}")
        if deadline_s < 0:
            raise DycError(f"the deadline must be ≥ 0, got {deadline_s}")
        self.backend, self.scheduler, self.config = backend, scheduler, config
        self.dtype = _TORCH_DTYPES[dtype]
        self.max_rows, self.deadline_s = int(max_rows), float(deadline_s)
        self.buckets = sorted(set(buckets)) if buckets else None
        if self.buckets and self.buckets[-1] < self.max_rows:
            raise DycError(f"the largest bucket {self.buckets[-1]} is below the max batch {self.max_rows}")
        self.mixed_timesteps = bool(getattr(backend, "mixed_timesteps", True))
        self.clock = clock
        self.stats = BatcherStats()
        self._inbox: list[Chain] = []
        self._active: list[Chain] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._next_id = 0
        self._thread: threading.Thread | None = None

    # ---- life cycle -------------------------------------------------------------------------
    def start(self) -> StepBatcher:
        self._thread = threading.Thread(target=self._loop, name="dyc-step-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the worker; requests still in flight fail with a clear error."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for c in self._inbox + self._active:
            if not c.future.done():
                c.future.set_exception(DycError("the server is shutting down"))
        self._inbox, self._active = [], []

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> StepBatcher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def submit(self, request: GenerationRequest) -> Future:
        """Queue a validated request; its Future gets the final latents, or the error that stopped it."""
        fut: Future = Future()
        with self._cv:
            if self._stopping or not self.alive:
                raise DycError("the step batcher is not running")
            chain = Chain(self._next_id, request, fut, self.clock())
            self._next_id += 1
            self._inbox.append(chain)
            self.stats.requests_submitted += 1
            self._cv.notify()
        return fut

    def snapshot(self) -> dict:
        with self._cv:
            d = self.stats.to_dict()
            d.update(in_flight=len(self._active) + len(self._inbox), max_rows=self.max_rows,
                     deadline_ms=self.deadline_s * 1e3, buckets=self.buckets, mixed_timesteps=self.mixed_timesteps,
                     backend=self.backend.name)
        return d

    # ---- the worker ---------------------------------------------------------------------------
    def _key(self, c: Chain) -> Hashable:
        g = self.scheduler.group_of(c.t).index
        return g if self.mixed_timesteps else (g, c.t)

    def _begin(self, c: Chain) -> None:
        """The chain's initial state, drawn as ``Pipeline`` draws it: noise first from a CPU generator."""
        r, cfg = c.request, self.config
        c.sampler = make_sampler(r.sampler, r.steps)
        c.generator = torch.Generator().manual_seed(r.seed)
        noise = torch.randn((len(r.classes), cfg.in_channels, cfg.input_size, cfg.input_size), generator=c.generator)
        dev = self.backend.device
        c.x = noise.to(dev)
        c.y = torch.tensor(r.classes, dtype=torch.int64, device=dev)
        c.since = self.clock()

    def _loop(self) -> None:
        with torch.no_grad():  # grad mode is per thread
            while True:
                with self._cv:
                    while not self._inbox and not self._active and not self._stopping:
                        self._cv.wait()
                    if self._stopping:
                        return
                    new, self._inbox = self._inbox, []
                for c in new:
                    if c.future.set_running_or_notify_cancel():
                        try:
                            self._begin(c)
                        except Exception as e:  # noqa: BLE001 - the request fails, the server goes on
                            self._fail([c], e)
                            continue
                        self._active.append(c)
                    else:
                        self.stats.requests_dropped += 1
                if self._active:
                    try:
                        self._turn()
                    except Exception as e:  # noqa: BLE001 - a bug here fails the chains in flight, not the server
                        self._fail(self._active, e)
                        self._active = []

    def _turn(self) -> None:
        live = [c for c in self._active if not c.future.done()]  # a future failed elsewhere: drop it
        self.stats.requests_dropped += len(self._active) - len(live)
        self._active = live
        if not live:
            return
        waiting = [Waiting(self._key(c), c.request.rows, c.since, c.id) for c in live]
        chosen = [live[i] for i in pick_batch(waiting, self.clock(), self.deadline_s, self.max_rows)]
        try:
            self._run(chosen)
        except Exception as e:  # noqa: BLE001 - an engine failure fails its requests, not the server
            self._fail(chosen, e)
        self._active = [c for c in self._active if not c.future.done()]

    def _fail(self, chains: Sequence[Chain], e: Exception) -> None:
        err = e if isinstance(e, DycError) else DycError(f"the engine call failed: {type(e).__name__}: {e}")
        for c in chains:
            if not c.future.done():
                c.future.set_exception(err)
                self.stats.requests_failed += 1

    def _run(self, chains: Sequence[Chain]) -> None:
        items = []
        for c in chains:
            x, y = c.x, c.y
            if c.request.cfg != 1.0:
                x, y = cfg_inputs(x, y, self.config.num_classes)
            items.append((c.t, x, y))
        g, feeds = self.scheduler.batch_inputs(items, dtype=self.dtype, omit_full_masks=self.backend.optional_masks)
        rows = int(feeds["x"].shape[0])
        size = next((b for b in self.buckets if b >= rows), rows) if self.buckets else rows
        if size > rows:  # repeat the last row: every row is computed on its own, the copies are dropped
            feeds = {k: torch.cat([v, v[-1:].expand(size - rows, *v.shape[1:])]) for k, v in feeds.items()}
        t0 = time.perf_counter()
        out = self.backend.run_group(g.index, feeds)[:rows].to(device=self.backend.device, dtype=torch.float32)
        lo = 0
        for c, (_, x, _) in zip(chains, items, strict=True):
            o = out[lo: lo + x.shape[0]]
            lo += x.shape[0]
            if c.request.cfg != 1.0:
                o = cfg_combine(o, self.config.in_channels, c.request.cfg, False)
            c.x = c.sampler.step(c.step, c.x, o, c.generator)
            c.step += 1
            if c.step == len(c.sampler):
                latents = c.x.float().cpu()
                if not c.future.done():
                    c.future.set_result(latents)
                    self.stats.requests_done += 1
        engine_s = time.perf_counter() - t0
        now = self.clock()
        for c in chains:
            c.since = now
        with self._cv:
            s = self.stats
            s.calls += 1
            s.rows += rows
            s.padded_rows += size - rows
            s.engine_s += engine_s
            s.requests_per_call[len(chains)] += 1
            s.mixed_t_calls += len({t for t, _, _ in items}) > 1

    # ---- warm-up ------------------------------------------------------------------------------
    def warm_up(self, progress: Callable[[str], None] | None = None) -> int:
        """Run every group once per bucket size and mask form, before serving (CUDA graphs, compiled
        kernels and autotuning then happen here, not in a request's latency). Returns the calls made."""
        sizes = self.buckets or [self.max_rows]
        cfg, dev, n = self.config, self.backend.device, 0
        with torch.no_grad():
            for g in self.scheduler.groups:
                forms = self._mask_forms(g)
                for ts in forms:
                    for b in sizes:
                        x = torch.zeros((b, cfg.in_channels, cfg.input_size, cfg.input_size), device=dev)
                        y = torch.full((b,), cfg.num_classes, dtype=torch.int64, device=dev)
                        k = min(len(ts), b)  # the rows split among the form's timesteps
                        cuts = [round(i * b / k) for i in range(k + 1)]
                        items = [(t, x[lo:hi], y[lo:hi]) for t, lo, hi in zip(ts, cuts[:-1], cuts[1:], strict=False)]
                        _, feeds = self.scheduler.batch_inputs(items, dtype=self.dtype,
                                                               omit_full_masks=self.backend.optional_masks)
                        self.backend.run_group(g.index, feeds)
                        n += 1
                if progress:
                    progress(f"warmed up group {g.index}: {len(forms)} mask form(s) x {len(sizes)} batch size(s)")
        return n

    def _mask_forms(self, g) -> list[list[int]]:
        """Timesteps that together give each set of mask inputs a call of group ``g`` can take.

        A backend with ``optional_masks`` leaves a mask out when every row's t switches on the whole
        union; a call mixing timesteps keeps it if any row needs it, so forms come from sets of t.
        """
        names = [m for m in ("head_mask", "channel_mask") if m in g.inputs]
        ts = range(g.t_lo, g.t_hi + 1)
        if not (self.backend.optional_masks and names):
            return [[g.t_lo]]
        full = {t: {m for m in names if self.scheduler.full_width(t, g, m)} for t in ts}
        forms = []
        for omit in ({*c} for r in range(len(names) + 1) for c in itertools.combinations(names, r)):
            pool = [t for t in ts if omit <= full[t]]  # rows that allow leaving out these masks
            keep = [m for m in names if m not in omit]
            pick = [next((t for t in pool if m not in full[t]), None) for m in keep]
            if pool and all(t is not None for t in pick):
                chosen = sorted(set(pick)) or pool[:1]
                if self.mixed_timesteps or len(chosen) == 1:
                    forms.append(chosen)
        return forms
