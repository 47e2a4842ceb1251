"""The step-level batcher without the server: its policy, and every chain's result against ``dyc.Pipeline``."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from serve_fixtures import assert_matches, digits_bundle, reference

from dyc.errors import DycError
from dyc.serve.batcher import StepBatcher, Waiting, pick_batch, row_buckets
from dyc.serve.request import BadRequest, GenerationRequest, parse_request


# ---- the policy ----------------------------------------------------------------------------------
def w(key, rows, since, order):
    return Waiting(key, rows, since, order)


def test_policy_takes_the_group_with_most_rows_oldest_first():
    waiting = [w("a", 2, 0.00, 0), w("b", 2, 0.01, 1), w("b", 2, 0.02, 2), w("a", 1, 0.03, 3), w("b", 2, 0.04, 4)]
    assert pick_batch(waiting, now=0.05, deadline_s=1.0, max_rows=64) == [1, 2, 4]
    # capped by max_rows: the oldest of the key first, then whatever still fits (first fit)
    assert pick_batch(waiting, now=0.05, deadline_s=1.0, max_rows=4) == [1, 2]
    waiting[2] = w("b", 8, 0.02, 2)
    assert pick_batch(waiting, now=0.05, deadline_s=1.0, max_rows=5) == [1, 4]  # the 8-row chain waits
    # rows past max_rows do not count: a tie at the cap goes to the key whose oldest waited longest
    tie = [w("a", 4, 0.0, 0), w("b", 4, 0.1, 1), w("b", 4, 0.2, 2)]
    assert pick_batch(tie, now=0.3, deadline_s=1.0, max_rows=4) == [0]
    assert pick_batch([], now=0.0, deadline_s=0.0, max_rows=4) == []


def test_policy_deadline_runs_the_oldest_group():
    waiting = [w("small", 1, 0.0, 0), *[w("big", 2, 0.05 + i * 1e-3, i + 1) for i in range(5)]]
    assert pick_batch(waiting, now=0.08, deadline_s=0.1, max_rows=64) == [1, 2, 3, 4, 5]  # not yet due
    assert pick_batch(waiting, now=0.11, deadline_s=0.1, max_rows=64) == [0]  # due: it runs now
    assert pick_batch(waiting, now=0.0, deadline_s=0.0, max_rows=64) == [1, 2, 3, 4, 5]  # waited 0, not > 0


def simulate(deadline_s: float, turns: int = 200) -> int | None:
    """A busy group refilled every turn and one lone chain elsewhere: the turn the lone chain runs, or None."""
    busy = [w("busy", 2, 0.0, i) for i in range(4)]
    lone = w("lone", 1, 0.0, 99)
    now, order = 0.0, 100
    for turn in range(turns):
        chosen = pick_batch(busy + [lone], now, deadline_s, max_rows=8)
        now += 0.01  # one engine call
        if len(busy) in chosen:
            return turn
        busy = [b for i, b in enumerate(busy) if i not in chosen]
        busy += [w("busy", 2, now, order + k) for k in range(4 - len(busy))]  # stepped chains wait again
        order += 4
    return None


def test_policy_deadline_prevents_starvation():
    assert simulate(deadline_s=float("inf")) is None  # greedy alone starves the lone chain
    turn = simulate(deadline_s=0.05)
    assert turn is not None and turn <= 6  # it runs within the deadline (+ one call)


def test_row_buckets():
    assert row_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert row_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert row_buckets(1) == [1]


# ---- the scheduler's stacked inputs -------------------------------------------------------------------
def test_scheduler_batch_inputs_keep_each_rows_t_and_masks():
    import torch

    from dyc.runtime.scheduler import GroupSpec, Scheduler

    heads = [[0, 2], [0, 1, 3]]  # 2 layers, 4 heads: union layouts
    specs = [GroupSpec(i, lo, hi, heads, heads, ("x", "t", "y", "head_mask"))
             for i, (lo, hi) in enumerate([(0, 499), (500, 999)])]
    hm = np.zeros((1000, 2, 4), dtype=np.float32)
    hm[:, :, 0] = 1
    hm[800, 0, [0, 2]] = 1  # t = 800 and 801 switch on group 1's whole union
    hm[800, 1, [0, 1, 3]] = 1
    hm[801] = hm[800]
    hm[700, 1, 3] = 1
    s = Scheduler(specs, hm, hm)
    x1, x2 = torch.zeros(2, 4, 8, 8), torch.ones(1, 4, 8, 8)
    y1, y2 = torch.tensor([1, 2]), torch.tensor([3])
    g, f = s.batch_inputs([(700, x1, y1), (800, x2, y2)])
    assert g.index == 1 and f["t"].tolist() == [700, 700, 800] and f["y"].tolist() == [1, 2, 3]
    assert torch.equal(f["x"], torch.cat([x1, x2]))
    assert f["head_mask"][0].tolist() == [[1, 0, 0], [1, 0, 1]] == f["head_mask"][1].tolist()
    assert f["head_mask"][2].tolist() == [[1, 1, 0], [1, 1, 1]]
    # a mask input is left out only when it is all ones for every row
    assert "head_mask" in s.batch_inputs([(700, x1, y1), (800, x2, y2)], omit_full_masks=True)[1]
    assert "head_mask" not in s.batch_inputs([(800, x1, y1), (801, x2, y2)], omit_full_masks=True)[1]
    # one chain: exactly what inputs() gives
    one, ref = s.batch_inputs([(700, x1, y1)])[1], s.inputs(700, x1, y1)[1]
    assert one.keys() == ref.keys() and all(torch.equal(one[k], ref[k]) for k in ref)
    with pytest.raises(DycError, match="different groups"):
        s.batch_inputs([(700, x1, y1), (300, x2, y2)])


# ---- requests --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    import dyc

    p = dyc.Pipeline.load(digits_bundle(), backend="onnxruntime")
    yield p
    p.close()


def req(classes, seed, steps, sampler="ddim", cfg=4.0):
    return GenerationRequest(tuple(classes), seed, sampler, steps, cfg)


def test_parse_request_defaults_and_errors(pipe):
    cfg, sched = pipe.config, pipe.scheduler
    r = parse_request({"class_ids": np.array([3, 7])}, cfg, sched, max_rows=8)
    assert r == GenerationRequest((3, 7), 0, "ddim", 50, 4.0, "latents") and r.rows == 4
    r = parse_request({"class_ids": np.array([1]), "seed": np.array([9]), "steps": np.array([7], np.int32),
                       "sampler": np.array([b"dpm-solver++"], object), "cfg": np.array([1.0], np.float32),
                       "format": np.array([b"png"], object)}, cfg, sched, max_rows=8)
    assert (r.seed, r.sampler, r.steps, r.cfg, r.format, r.rows) == (9, "dpm-solver++", 7, 1.0, "png", 1)
    bad = [
        ({"class_ids": np.array([10])}, "class id 10 is out of range: this model has classes 0..9"),
        ({"class_ids": np.array([], np.int64)}, "non-empty"),
        ({"class_ids": np.array([1.5])}, "must be integers"),
        ({"class_ids": np.array([1]), "steps": np.array([0], np.int32)}, "steps must be positive"),
        ({"class_ids": np.array([1]), "steps": np.array([5, 6], np.int32)}, "exactly one value"),
        ({"class_ids": np.array([1]), "sampler": np.array([b"euler"], object)}, "unknown sampler 'euler'"),
        ({"class_ids": np.array([1]), "cfg": np.array([np.nan], np.float32)}, "cfg must be a finite number"),
        ({"class_ids": np.array([1]), "seed": np.array([-1])}, "seed must be a non-negative"),
        ({"class_ids": np.array([1]), "format": np.array([b"jpeg"], object)}, "format 'jpeg' is not one of"),
        ({"class_ids": np.array([1, 2, 3, 4, 5])}, "need 10 rows per step, more than this server's --max-batch 8"),
        ({"class_ids": np.array([1]), "noise": np.array([1.0])}, "unknown inputs ['noise']"),
        ({"seed": np.array([1])}, "class_ids is missing"),
    ]
    for inputs, message in bad:
        with pytest.raises(BadRequest, match=None) as e:
            parse_request(inputs, cfg, sched, max_rows=8)
        assert message in str(e.value), (inputs, str(e.value))


# ---- the batcher -----------------------------------------------------------------------------------
class Recording:
    """A backend wrapper that records each call's timesteps and can fail chosen calls."""

    def __init__(self, inner, mixed_timesteps=True, fail_on=()):
        self.inner, self.mixed_timesteps, self.fail_on = inner, mixed_timesteps, set(fail_on)
        self.name, self.optional_masks = inner.name, inner.optional_masks
        self.calls: list[list[int]] = []
        self.inputs: list[tuple[int, tuple[str, ...]]] = []

    @property
    def device(self):
        return self.inner.device

    def run_group(self, group, inputs):
        self.calls.append(inputs["t"].tolist())
        self.inputs.append((group, tuple(sorted(inputs))))
        if len(self.calls) in self.fail_on:
            raise RuntimeError("engine exploded")
        return self.inner.run_group(group, inputs)


REQUESTS = [req([3, 7], 0, 8), req([1], 5, 6, "dpm-solver++"), req([0, 2, 4], 9, 10, cfg=1.0),
            req([9], 1, 7, "ddpm", cfg=2.5), req([5], 2, 8), req([6, 6], 3, 9, "dpm-solver++", cfg=1.0)]


def run_all(batcher, requests, stagger=None):
    """Submit from several threads (as the server's instances do); returns results in order."""
    futures = [None] * len(requests)

    def go(i):
        futures[i] = batcher.submit(requests[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [f.result(timeout=120) for f in futures]


def check_against_pipeline(results, requests):
    for r, got in zip(requests, results, strict=True):
        assert_matches(got, reference(r.classes, seed=r.seed, steps=r.steps, sampler=r.sampler, cfg=r.cfg))


@pytest.mark.parametrize("buckets", [None, [1, 2, 4, 8, 16, 32]], ids=["exact-rows", "padded"])
def test_batched_chains_equal_single_request_pipeline(pipe, buckets):
    rec = Recording(pipe.backend)
    with StepBatcher(rec, pipe.scheduler, pipe.config, max_rows=32, deadline_s=0.02, buckets=buckets) as b:
        results = run_all(b, REQUESTS)
        stats = b.snapshot()
    check_against_pipeline(results, REQUESTS)
    assert stats["requests_done"] == len(REQUESTS) and stats["requests_failed"] == 0
    assert stats["multi_request_calls"] > 0  # chains really shared engine calls
    assert stats["mixed_t_calls"] > 0  # ... at different timesteps of one group
    assert stats["calls"] == len(rec.calls) < sum(r.steps for r in REQUESTS)
    for ts in rec.calls:  # one group per call
        assert len({pipe.scheduler.group_of(t).index for t in ts}) == 1
    if buckets:
        assert stats["padded_rows"] > 0 and all(len(ts) in buckets for ts in rec.calls)


def test_backend_without_mixed_timesteps_gets_one_t_per_call(pipe):
    rec = Recording(pipe.backend, mixed_timesteps=False)
    with StepBatcher(rec, pipe.scheduler, pipe.config, max_rows=32, deadline_s=0.02) as b:
        results = run_all(b, REQUESTS)
        stats = b.snapshot()
    check_against_pipeline(results, REQUESTS)
    assert all(len(set(ts)) == 1 for ts in rec.calls) and stats["mixed_t_calls"] == 0


def test_torch_backend_per_row_masks_mixes_timesteps():
    """The torch backend's sliced engines (CPU: eager maths) with per-row masks against its own Pipeline."""
    import dyc

    with dyc.Pipeline.load(digits_bundle(), backend="torch", device="cpu") as shared, \
            dyc.Pipeline.load(digits_bundle(), backend="torch", device="cpu", per_row_masks=True) as per_row:
        assert not shared.backend.mixed_timesteps and per_row.backend.mixed_timesteps
        requests = REQUESTS[:4]
        rec = Recording(per_row.backend)
        rec.mixed_timesteps = True
        b = StepBatcher(rec, per_row.scheduler, per_row.config, max_rows=32, deadline_s=0.02, buckets=[2, 8, 32])
        # warm-up: every group at every size in every set of mask inputs a (mixed-t) call can take
        n = b.warm_up()
        assert n == len(rec.calls) and {len(ts) for ts in rec.calls} == {2, 8, 32}
        sched = per_row.scheduler
        for g in sched.groups:
            masks = [m for m in ("head_mask", "channel_mask") if m in g.inputs]
            seen = {frozenset(names) & set(masks) for gi, names in rec.inputs if gi == g.index}
            want = set()
            for lo in range(0, 1000, 7):  # mixing pairs of timesteps of the group
                for hi in range(lo, 1000, 13):
                    if g.contains(lo) and g.contains(hi):
                        want.add(frozenset(m for m in masks if not (sched.full_width(lo, g, m)
                                                                    and sched.full_width(hi, g, m))))
            assert want <= seen, (g.index, want, seen)
        with b:
            results = run_all(b, requests)
            assert b.snapshot()["mixed_t_calls"] > 0
        for r, got in zip(requests, results, strict=True):
            want = shared(list(r.classes), sampler=r.sampler, steps=r.steps, cfg=r.cfg, seed=r.seed).latents
            # two fp32 computations (masked per row vs sliced), compared after a whole CFG chain: each step's
            # ~1e-6 difference is multiplied by the guidance (1 + 2 x cfg) and carried on; 3.6e-5 of the
            # latents' max seen on one CPU, 1e-5 on another
            assert_matches(got, want, tol=1e-4)


def test_engine_failure_fails_its_requests_only(pipe):
    rec = Recording(pipe.backend, fail_on={3})
    with StepBatcher(rec, pipe.scheduler, pipe.config, max_rows=32, deadline_s=0.02) as b:
        first = [b.submit(r) for r in REQUESTS[:3]]
        outcomes = []
        for f in first:
            try:
                outcomes.append(f.result(timeout=60))
            except DycError as e:
                outcomes.append(e)
        failed = [o for o in outcomes if isinstance(o, DycError)]
        assert failed and all("engine call failed: RuntimeError: engine exploded" in str(e) for e in failed)
        # the server goes on: the others finished correctly, and a new request runs
        for r, o in zip(REQUESTS[:3], outcomes, strict=True):
            if not isinstance(o, DycError):
                assert_matches(o, reference(r.classes, seed=r.seed, steps=r.steps, sampler=r.sampler, cfg=r.cfg))
        again = b.submit(REQUESTS[4]).result(timeout=60)
        assert_matches(again, reference((5,), seed=2, steps=8))
        assert b.snapshot()["requests_failed"] == len(failed)


def test_cancelled_request_is_dropped_and_stop_fails_the_rest(pipe):
    gate = threading.Event()

    class Slow(Recording):
        def run_group(self, group, inputs):
            gate.wait(5)
            return super().run_group(group, inputs)

    b = StepBatcher(Slow(pipe.backend), pipe.scheduler, pipe.config, max_rows=32).start()
    running = b.submit(req([1], 0, 400))  # long enough to be in flight at stop()
    queued = [b.submit(req([2], 0, 5)) for _ in range(2)]
    cancelled = queued[0].cancel()  # pending (the worker waits in the engine call): cancelled
    gate.set()
    assert cancelled and queued[1].result(timeout=60) is not None
    assert b.snapshot()["requests_dropped"] == 1
    b.stop()
    with pytest.raises(DycError, match="shutting down"):
        running.result(timeout=5)
    with pytest.raises(DycError, match="not running"):
        b.submit(req([1], 0, 5))
