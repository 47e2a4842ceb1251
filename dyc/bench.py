"""``dyc bench``: per-step latency of each backend against eager PyTorch, measured side by side.

Rows: ``eager`` (the full-width DiT, the baseline every speedup is over), ``eager-dydit`` (the
official masked computation), ``torch-static`` (the compiled full-width DiT: the fair baseline
for what compiling alone buys), ``torch`` (compiled DyDiT: sliced groups + SDT kernel + CUDA
graphs), ``onnxruntime`` and ``tensorrt`` (from a bundle). Before timing, each row's output is
checked against its eager reference on the benchmark's own inputs. A row that cannot run here
is reported with the reason, never dropped.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .config import ModelConfig
from .errors import DycError
from .flops import static_breakdown, static_gflops
from .progress import Progress
from .timesteps import check_sampler, sampler_timesteps

ROWS = ("eager", "eager-dydit", "torch-static", "torch", "onnxruntime", "tensorrt")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TOL = {"fp32": 1e-4, "fp16": 3e-2, "bf16": 5e-2}  # relative L2 error against the reference


@dataclass
class Row:
    backend: str
    status: str = "ok"  # "ok", or why the row has no figures
    dtype: str | None = None  # the precision this row computes in (a bundle's own)
    step_ms: float | None = None  # median model call over the schedule, after warm-up
    step_ms_per_t: list[float] = field(default_factory=list)
    s_per_image: float | None = None  # a full sampling loop (model calls + sampler maths) / images
    gflops_per_step: float | None = None  # per image per forward, averaged over the schedule
    speedup_vs_eager: float | None = None
    speedup_vs_static: float | None = None  # over the same backend's full-width DiT
    flops_ideal: float | None = None  # static GFLOPs / this row's GFLOPs
    share_of_ideal: float | None = None  # speedup_vs_static / flops_ideal
    max_rel_err: float | None = None  # max |a-b| / max |b| over the checked steps
    rel_l2_err: float | None = None  # ||a-b|| / ||b||, the pass criterion
    weight_bytes: int | None = None
    peak_activation_bytes: int | None = None
    engines: int | None = None  # compiled DyDiT: how many group engines (K) serve the schedule
    rel_l2_per_t: dict[int, float] = field(default_factory=dict)  # the check, at each t it looked at
    # compiled DyDiT: which MLP form each (engine, batch) graph runs, picked by timing them at capture
    # ("sdt": SdtMlp kernel on the kept tokens; "dense": cuBLAS on every token; "dense-fold": dense with
    # the router finished in the LayerNorm kernel; "hybrid": dense where most tokens are kept; "hybrid-fold":
    # hybrid with dense-fold's router), and those timings (ms)
    mlp_forms: dict[str, int] = field(default_factory=dict)
    mlp_form_ms: dict[str, dict[str, float]] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_call(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Milliseconds of one call (CUDA events on GPU, wall clock on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _storage_bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


@dataclass
class BenchSetup:
    cfg: ModelConfig
    rows_batch: int  # model batch (2 × images with CFG)
    images: int
    schedule: list[int]
    device: torch.device
    dtype: str
    sampler: str = "ddim"
    cfg_scale: float = 1.0


class _Runner:
    """One row: a callable model(x, t_scalar, y) plus its GFLOPs per t and weights."""

    def __init__(self, name: str, call: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor],
                 gflops_of_t: Callable[[int], float], weights: Sequence[torch.Tensor] = ()):
        self.name, self.call, self.gflops_of_t, self.weights = name, call, gflops_of_t, list(weights)
        self.tdw_masks: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.eager_call: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor] | None = None  # no CUDA graph
        self.groups: list | None = None  # the compiler's groups, for the torch DyDiT row
        self.dtype: str | None = None  # the row's own dtype where it differs from the benchmark's (bundles)
        self.graphs = None  # the row's GraphRunner, where it has one


def _eager_runners(ck, setup: BenchSetup) -> tuple[_Runner, _Runner | None, torch.nn.Module]:
    model = copy.deepcopy(ck.model).to(device=setup.device, dtype=_DTYPES[setup.dtype])
    static_g = static_gflops(setup.cfg)

    def full(x, t, y):
        return model(x, torch.full((x.shape[0],), t, device=x.device), y, complete_model=True)

    def masked(x, t, y):
        return model(x, torch.full((x.shape[0],), t, device=x.device), y)

    weights = list(model.parameters())
    eager = _Runner("eager", full, lambda t: static_g, weights)
    dydit = _Runner("eager-dydit", masked, lambda t: static_g, weights) if setup.cfg.dynamic else None
    return eager, dydit, model


def _torch_runners(ck, setup: BenchSetup, calib: int, groups: int | None = None) -> tuple[_Runner, _Runner]:
    from .backends.torch_sliced import GraphRunner, GroupLayout, SharedWeights, SlicedDiT
    from .compiler.analyse import analyse, architectures
    from .compiler.group import group_of, partition
    from .runtime.scheduler import GroupSpec, Scheduler

    cfg, dev, dt = setup.cfg, setup.device, _DTYPES[setup.dtype]
    sd = ck.model.state_dict()  # fp32 on the CPU: sliced and cast once per group
    full = GroupLayout([list(range(cfg.num_heads))] * cfg.depth, [list(range(cfg.num_heads))] * cfg.depth,
                       [False] * cfg.depth, [False] * cfg.depth)
    static_cfg = ModelConfig(**{**cfg.to_dict(), "dynamic": False})
    if cfg.family != "dit":  # U-ViT / PixArt-α engines (dyc.families)
        from .backends.torch_family import build_modules

        static_mod = build_modules(static_cfg, sd, [full], dt, dev)[1][0]
    else:
        static_mod = SlicedDiT(static_cfg, sd, full, dtype=dt, device=dev)
    static_g = static_gflops(cfg)
    use_graphs = dev.type == "cuda"
    static_graph = GraphRunner([static_mod]) if use_graphs else None

    def static_call(x, t, y):
        tt = torch.full((x.shape[0],), t, device=dev)
        return static_graph(0, {"x": x, "t": tt, "y": y}) if use_graphs else static_mod(x, tt, y)

    static_row = _Runner("torch-static", static_call, lambda t: static_g, static_mod.weight_tensors())
    static_row.eager_call = lambda x, t, y: static_mod(x, torch.full((x.shape[0],), t, device=dev), y)
    # the engines and their per-call inputs, for the DeepCache rows (dyc.runtime.deepcache)
    static_row.deepcache = ([static_mod], lambda x, t, y: (0, {"x": x, "t": torch.full((x.shape[0],), t, device=dev),
                                                               "y": y}))
    if not cfg.dynamic:
        return static_row, None
    ana = analyse(ck.model, setup.schedule, calib=calib, progress=lambda m: print(m, file=sys.stderr))
    arch_of_t, ah, ac = architectures(ana.head, ana.channel)
    groups = partition(cfg, arch_of_t, ah, ac, ana.keep, setup.schedule, max_groups=groups)
    layouts = [GroupLayout(g.heads, g.channels, g.vary_head, g.vary_channel) for g in groups]
    if cfg.family != "dit":
        shared, mods = build_modules(cfg, sd, layouts, dt, dev)
    else:
        shared = SharedWeights(cfg, sd, layouts, dtype=dt, device=dev)  # one copy for every group
        mods = [SlicedDiT(cfg, None, lay, dtype=dt, device=dev, shared=shared, shared_masks=True) for lay in layouts]
        for mod, g in zip(mods, groups, strict=True):  # expected keep rates: candidates for the hybrid MLP form
            ts = [t for t in setup.schedule if g.t_lo <= t <= g.t_hi] or list(range(g.t_lo, g.t_hi + 1))
            mod.keep_rates = ana.keep[ts].mean(0).tolist()
    runner = GraphRunner(mods) if use_graphs else None
    # the runtime's scheduler builds each call's inputs (t's group, its mask slots), as `dyc run` does
    specs = [GroupSpec(g.index, g.t_lo, g.t_hi, g.heads, g.channels, ("x", "t", "y", "head_mask", "channel_mask"))
             for g in groups]
    sched = Scheduler(specs, ana.head.astype(np.float32), ana.channel.astype(np.float32))

    def dyn_call(x, t, y, graphs: bool = use_graphs):
        g, feeds = sched.inputs(t, x, y, omit_full_masks=True)  # as TorchBackend takes them
        return runner(g.index, feeds) if graphs else mods[g.index](**feeds)

    gmap = {t: group_of(groups, t).gflops for t in setup.schedule}
    weights = shared.tensors()
    print(f"torch backend: {len(groups)} groups, {ana.num_architectures} distinct architectures", file=sys.stderr)
    row = _Runner("torch", dyn_call, lambda t: gmap[t], weights)
    head, chan = torch.from_numpy(ana.head).to(dev), torch.from_numpy(ana.channel).to(dev)
    row.tdw_masks = lambda t, b: (head[t].expand(b, -1, -1), chan[t].expand(b, -1, -1))  # decided in fp32
    row.eager_call = lambda x, t, y: dyn_call(x, t, y, graphs=False)
    row.groups = groups
    row.graphs = runner
    row.deepcache = (mods, lambda x, t, y: (lambda g, f: (g.index, f))(*sched.inputs(t, x, y, omit_full_masks=True)))
    return static_row, row


@torch.no_grad()
def _sample(runner: _Runner, setup: BenchSetup, x: torch.Tensor, y: torch.Tensor,
            record: dict[int, torch.Tensor] | None = None, tick: Callable[[], None] | None = None) -> None:
    """One sampling loop through the runtime's own sampler and CFG around the row's model calls, as
    a user runs it, from the noise x[:images]; ``record`` keeps each step's model input by t."""
    from .runtime.cfg import cfg_combine
    from .runtime.samplers import make_sampler

    sampler = make_sampler(setup.sampler, len(setup.schedule))
    guided = setup.rows_batch != setup.images
    gen = torch.Generator().manual_seed(0) if sampler.needs_generator else None
    xt = x[: setup.images].float()
    for i, t in enumerate(sampler.timesteps):
        xin = (torch.cat([xt, xt]) if guided else xt).to(x.dtype)
        if record is not None:
            record[int(t)] = xin.clone()
        out = runner.call(xin, t, y).float()
        if guided:
            out = cfg_combine(out, setup.cfg.in_channels, setup.cfg_scale)
        xt = sampler.step(i, xt, out, gen)
        if tick:
            tick()


def trajectory_inputs(runner: _Runner, setup: BenchSetup, x: torch.Tensor, y: torch.Tensor,
                      tick: Callable[[], None] | None = None) -> dict[int, torch.Tensor]:
    """The model inputs of each step of one sampling run of ``runner`` from noise x, by t.

    Per-step figures are taken on these, not on one noise tensor at every t: SDT's work depends on
    the input (a DyDiT keeps far more tokens of pure noise at small t than of the latents the
    sampler really has there), so a fixed input would time calls the sampler never makes.
    """
    xs: dict[int, torch.Tensor] = {}
    _sample(runner, setup, x, y, record=xs, tick=tick)
    return xs


def _measure(runner: _Runner, setup: BenchSetup, xs: dict[int, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             repeats: int, tick: Callable[[], None] | None = None) -> Row:
    """Per-step times on the trajectory inputs ``xs`` and the end-to-end time from the noise x, of a
    row that has had its ``_warm_up``."""
    dev = setup.device
    row = Row(runner.name, engines=len(runner.groups) if runner.groups else None)
    with torch.no_grad():
        per_t = {t: [] for t in setup.schedule}
        for _ in range(repeats):
            for t in setup.schedule:
                per_t[t].append(_time_call(lambda t=t: runner.call(xs[t], t, y), dev))
                if tick:  # outside the timed call
                    tick()
        _sync(dev)
        t0 = time.perf_counter()
        _sample(runner, setup, x, y)
        _sync(dev)
        row.s_per_image = (time.perf_counter() - t0) / setup.images
    meds = [statistics.median(per_t[t]) for t in setup.schedule]
    row.step_ms_per_t = [round(m, 4) for m in meds]
    row.step_ms = float(statistics.median([v for t in setup.schedule for v in per_t[t]]))
    row.gflops_per_step = float(np.mean([runner.gflops_of_t(t) for t in setup.schedule]))
    row.weight_bytes = _storage_bytes(runner.weights) if runner.weights else None
    return row


def _warm_up(runner: _Runner, setup: BenchSetup, xs: dict[int, torch.Tensor], y: torch.Tensor,
             tick: Callable[[], None] | None = None) -> int | None:
    """One pass over the schedule (every group once, CUDA graphs captured); returns its peak
    activation bytes on the GPU, None elsewhere.

    The peak is taken over this first pass: CUDA graphs take their memory at capture, from a pool
    every later replay reuses, so a peak taken after the warm-up would miss it.
    """
    dev = setup.device
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    with torch.no_grad():
        for t in setup.schedule:
            runner.call(xs[t], t, y)
            if tick:
                tick()
    _sync(dev)
    return int(torch.cuda.max_memory_allocated(dev) - base) if dev.type == "cuda" else None


def _check(runner: _Runner, ref: _Runner, setup: BenchSetup, xs: dict[int, torch.Tensor], y
           ) -> tuple[float, float, dict[int, float]]:
    """Max and relative-L2 error against the reference row at a few t of the schedule (and the
    relative L2 error at each of them).

    In bf16/fp16 a router logit within rounding of its threshold can flip a token or head
    between two correct implementations; such a flip moves a few elements a lot and the L2
    error a little, so the pass criterion is the relative L2 error.
    """
    ts = setup.schedule[:: max(1, len(setup.schedule) // 8)] + [setup.schedule[-1]]
    worst = 0.0
    per_t: dict[int, float] = {}
    with torch.no_grad():
        for t in ts:
            a, b = runner.call(xs[t], t, y).float(), ref.call(xs[t], t, y).float()
            worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-6)))
            per_t[int(t)] = float((a - b).norm() / b.norm().clamp_min(1e-12))
    return worst, max(per_t.values()), per_t


def run_bench(
    ckpt: str | Path, *, backends: Sequence[str] = ("eager", "eager-dydit", "torch"), batch: int = 16,
    cfg_scale: float | None = 4.0, sampler: str = "ddim", steps: int = 50, dtype: str = "bf16",
    device: str | None = None, repeats: int = 3, calib: int = 2, seed: int = 0, bundle: str | Path | None = None,
    groups: int | None = None, deepcache: Sequence[int] = (), deepcache_shallow: int = 1,
) -> dict:
    """Measure the requested rows side by side in this process; returns a JSON-able report."""
    unknown = [b for b in backends if b not in ROWS]
    if unknown:
        raise DycError(f"unknown backend(s) {', '.join(unknown)}: choose from {', '.join(ROWS)}")
    if dtype not in _DTYPES:
        raise DycError(f"--dtype must be one of {', '.join(_DTYPES)}")
    if batch <= 0:
        raise DycError(f"--batch must be positive, got {batch}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu" and dtype != "fp32":
        print(f"note: {dtype} on CPU is slow and unrepresentative; using fp32", file=sys.stderr)
        dtype = "fp32"
    ck = load_checkpoint(ckpt)
    cfg = ck.config
    schedule = sampler_timesteps(sampler, steps)
    if not cfg.conditional:
        cfg_scale = None  # an unconditional model has nothing to guide by
    rows_batch = batch * (2 if cfg_scale else 1)
    setup = BenchSetup(cfg, rows_batch, batch, schedule, dev, dtype, check_sampler(sampler), cfg_scale or 1.0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows_batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    if cfg.family != "dit":  # U-ViT / PixArt-α conditions (dyc.families); an unconditional model: no CFG
        from .families import sample_conditions

        y, null = sample_conditions(ck.model, batch, g)
        y = torch.cat([y, null]) if cfg_scale else y
    else:
        y = torch.randint(0, cfg.num_classes, (batch,), generator=g)
        if cfg_scale:
            y = torch.cat([y, torch.full((batch,), cfg.num_classes)])
    x, y = x.to(dev, _DTYPES[dtype]), y.to(dev, _DTYPES[dtype] if y.is_floating_point() else torch.int64)

    report: dict = {
        "checkpoint": str(ckpt), "model": cfg.name, "untrained": ck.metadata.get("dyc.untrained") == "true",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": dtype, "batch": batch, "cfg": bool(cfg_scale), "model_batch": rows_batch,
        "sampler": sampler, "steps": len(schedule), "static_gflops": static_gflops(cfg),
        "dense_weight_bytes": int(sum(v.numel() for v in ck.model.state_dict().values()) * _DTYPES[dtype].itemsize),
        "command": ("dyc " + " ".join(sys.argv[1:])) if sys.argv and sys.argv[0].endswith(("dyc", "cli.py")) else None,
    }
    rows: dict[str, Row] = {}
    runners: dict[str, _Runner] = {}
    eager, dydit, eager_model = _eager_runners(ck, setup)
    runners["eager"] = eager
    if dydit:
        runners["eager-dydit"] = dydit
    # every row's per-step inputs: the latents of one guided sampling run of the model itself
    # (the official masked DyDiT for a DyDiT checkpoint), by t
    with Progress(len(schedule), f"step inputs: {(dydit or eager).name} {sampler} trajectory") as bar:
        xs = trajectory_inputs(dydit or eager, setup, x, y, tick=bar.update)
    report["step_inputs"] = f"{(dydit or eager).name} {sampler} trajectory from seed {seed}"
    want = list(dict.fromkeys(["eager", *backends]))
    if "torch" in want and "torch-static" not in want:
        want.insert(want.index("torch"), "torch-static")
    for name in want:
        if name in ("torch", "torch-static") and name not in runners:
            # on CPU: the sliced modules without CUDA graphs or the kernel (the reference maths)
            st, dy = _torch_runners(ck, setup, calib, groups)
            runners["torch-static"] = st
            if dy:
                runners["torch"] = dy
    for name in want:
        if name in ("onnxruntime", "tensorrt"):
            got = _bundle_runner(name, bundle, ckpt, setup)
            if isinstance(got, str):
                rows[name] = Row(name, status=got)
                continue
            runners[name] = got
        if name not in runners:
            rows[name] = Row(name, status="plain DiT checkpoint: no DyDiT row")
            continue
        r = runners[name]
        # each row against its own eager semantics: compiled DyDiT vs the masked model, static vs full
        # width. A bundle decides TDW masks in fp32; the reference takes the same masks, else a router
        # logit within bf16 rounding of its threshold flips a whole head between the two.
        # A bundle row is checked against the eager model in the bundle's own dtype (an fp16 bundle
        # against fp16 eager): across dtypes, SDT decisions near the threshold differ by rounding alone.
        ref = runners["eager"]
        ref_dtype = r.dtype or dtype
        ref_model = eager_model if ref_dtype == dtype else copy.deepcopy(eager_model).to(_DTYPES[ref_dtype])
        if r.tdw_masks is not None:
            def ref_call(xx, t, yy, _m=r.tdw_masks, _model=ref_model, _dt=_DTYPES[ref_dtype]):
                tt = torch.full((xx.shape[0],), t, device=xx.device)
                return _model(xx.to(_dt), tt, yy, tdw_masks=_m(t, xx.shape[0]))

            ref = _Runner("eager-dydit", ref_call, dydit.gflops_of_t)
        # steps counted: the warm-up pass and the timed passes (the check and one sampling loop run between)
        with Progress(len(schedule) * (1 + repeats), f"{name}: warm-up, check, {repeats} timed passes") as bar:
            peak = _warm_up(r, setup, xs, y, tick=bar.update)
            err, l2, l2_t = _check(r, ref, setup, xs, y) if name not in ("eager", "eager-dydit") else (0.0, 0.0, {})
            del ref_model
            row = _measure(r, setup, xs, x, y, repeats, tick=bar.update)
        row.peak_activation_bytes = peak
        row.max_rel_err, row.rel_l2_err, row.rel_l2_per_t, row.dtype = err, l2, l2_t, ref_dtype
        if r.graphs is not None and r.graphs.timings:
            for mode in r.graphs.modes.values():
                row.mlp_forms[mode] = row.mlp_forms.get(mode, 0) + 1
            row.mlp_form_ms = {f"group{k[0]}/rows{k[1]}": {m: round(v, 4) for m, v in tm.items()}
                               for k, tm in r.graphs.timings.items()}
        if l2 > _TOL[ref_dtype]:  # measured, but flagged: a figure of a wrong computation is no result
            row.status = f"CHECK FAILED: relative L2 error {l2:.2e} > {_TOL[ref_dtype]:.0e} (max {err:.2e})"
        rows[name] = row
        print(f"{name}: {row.step_ms:.3f} ms/step, {row.s_per_image:.4f} s/image, rel L2 {l2:.1e}", file=sys.stderr)
    base = rows.get("eager")
    static = rows.get("torch-static")
    sg = static_gflops(cfg)
    for row in rows.values():
        if row.step_ms is None:
            continue
        if base and base.step_ms:
            row.speedup_vs_eager = base.step_ms / row.step_ms
        row.flops_ideal = sg / row.gflops_per_step
        ref = static if row.backend == "torch" else (base if row.backend == "eager-dydit" else None)
        if ref and ref.status == "ok" and ref.step_ms:
            row.speedup_vs_static = ref.step_ms / row.step_ms
            row.share_of_ideal = row.speedup_vs_static / row.flops_ideal
    report["blocks_static_gflops"] = static_breakdown(cfg).blocks / 1e9
    report["rows"] = [asdict(r) for r in rows.values()]
    if deepcache:  # extra speedup and drift of DeepCache over the compiled engines (dyc.runtime.deepcache)
        from .runtime.deepcache import bench_deepcache

        report["deepcache"] = []
        for name in ("torch-static", "torch"):
            if name in runners and rows.get(name) and rows[name].status == "ok":
                print(f"timing {name} with DeepCache {list(deepcache)} ...", file=sys.stderr)
                dc_rows = bench_deepcache(name, *runners[name].deepcache, setup, x, y, list(deepcache),
                                          deepcache_shallow, repeats)
                st = rows.get("torch-static")
                for r in dc_rows:
                    r["speedup_vs_static"] = (st.s_per_image / r["s_per_image"]) if st and st.s_per_image else None
                report["deepcache"] += dc_rows
    return report


def _bundle_runner(name: str, bundle_path: str | Path | None, ckpt, setup: BenchSetup) -> _Runner | str:
    """A row from a compiled bundle through a runtime backend, or why there is none."""
    if bundle_path is None:
        return "needs --bundle BUNDLE (dyc compile of this checkpoint)"
    from .backends import get_backend
    from .bundle import Bundle

    bundle = Bundle.load(bundle_path)
    if bundle.config.to_dict() != setup.cfg.to_dict():
        raise DycError(f"{bundle_path} was compiled from a {bundle.config.name}, not this {setup.cfg.name}")
    try:
        backend = get_backend(name)(bundle, device=setup.device)
    except DycError as e:
        return f"cannot run here: {e}"
    dev = setup.device
    from .runtime.pipeline import bundle_scheduler

    sched = bundle_scheduler(bundle)  # the runtime's own per-call inputs, as `dyc run` builds them

    def call(x, t, y):
        g, feeds = sched.inputs(t, x, y)
        return backend.run_group(g.index, feeds)

    runner = _Runner(name, call, lambda t: bundle.group_for_t(t).gflops)
    runner.dtype = bundle.dtype
    head = {t: torch.from_numpy(np.stack(bundle.masks_for_t(t)[0:1]).astype(np.float32)) for t in setup.schedule}
    chan = {t: torch.from_numpy(np.stack(bundle.masks_for_t(t)[1:2]).astype(np.float32)) for t in setup.schedule}
    runner.tdw_masks = lambda t, b: (head[t].to(dev).expand(b, -1, -1), chan[t].to(dev).expand(b, -1, -1))
    return runner


def format_report(rep: dict) -> str:
    lines = [
        f"{rep['model']}{' (untrained)' if rep['untrained'] else ''} on {rep['device']}, {rep['dtype']}, "
        f"batch {rep['batch']}{' with CFG (' + str(rep['model_batch']) + ' rows)' if rep['cfg'] else ''}, "
        f"{rep['sampler']}-{rep['steps']}",
        f"{'backend':<13} {'ms/step':>9} {'s/image':>9} {'GFLOPs':>8} {'vs eager':>9} {'vs static':>9} "
        f"{'ideal':>6} {'share':>6} {'L2 err':>8}",
    ]

    def f(v, fmt, unit=""):
        width = int(fmt.split(".")[0]) + len(unit)
        return (format(v, fmt) + unit) if v is not None else "-".rjust(width)

    for r in rep["rows"]:
        if r["step_ms"] is None:
            lines.append(f"{r['backend']:<13} {r['status']}")
            continue
        lines.append(" ".join([
            f"{r['backend']:<13}", f(r["step_ms"], "9.3f"), f(r["s_per_image"], "9.4f"),
            f(r["gflops_per_step"], "8.2f"), f(r["speedup_vs_eager"], "8.2f", "x"),
            f(r["speedup_vs_static"], "8.2f", "x"), f(r["flops_ideal"], "5.2f", "x"),
            f(r["share_of_ideal"], "6.0%"), f(r["rel_l2_err"], "8.1e"),
        ]) + (f"  ({r['engines']} engines)" if r.get("engines") else "")
            + (f" [MLP forms: {', '.join(f'{k} {v}' for k, v in sorted(r['mlp_forms'].items()))}]"
               if r.get("mlp_forms") else "")
            + ("" if r["status"] == "ok" else f"  <- {r['status']}"))
    if rep.get("deepcache"):
        from .runtime.deepcache import format_rows

        lines += format_rows(rep["deepcache"])
    return "\n".join(lines)


def write_json(rep: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rep, indent=2))


def plot_report(rep: dict, path: Path) -> Path:
    """Per-step latency over the schedule, one line per measured row."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DycError("--plot needs matplotlib: pip install 'dyc[plot]'") from None
    ts = sampler_timesteps(rep["sampler"], rep["steps"])
    fig, ax = plt.subplots(figsize=(9, 4.5), constrained_layout=True)
    for r in rep["rows"]:
        if r["status"] == "ok":
            ax.plot(ts, r["step_ms_per_t"], marker=".", label=f"{r['backend']} ({r['step_ms']:.2f} ms median)")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("ms per model call")
    ax.invert_xaxis()  # sampling order: t from 999 down to 0
    ax.set_title(f"{rep['model']} on {rep['device']}, {rep['dtype']}, {rep['model_batch']} rows per call")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
