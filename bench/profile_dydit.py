"""Where a compiled step's GPU time goes: per-kernel times of one model call (torch.profiler),
for the compiled static DiT and compiled DyDiT rows of ``dyc bench``, by category.

The modules run without CUDA graphs here (the profiler sees each kernel); the kernels are the
ones the graphs replay. Usage (GPU):
    python bench/profile_dydit.py CKPT [--batch 16] [--dtype bf16] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dyc import bench as B  # noqa: E402
from dyc.checkpoint import load_checkpoint  # noqa: E402
from dyc.compiler.group import group_of  # noqa: E402
from dyc.timesteps import check_sampler, sampler_timesteps  # noqa: E402

CATEGORIES = [  # first match wins
    ("sdt: fc1 (CUTLASS)", r"gemm_kept_rows|gemm_persistent.*GeluTanh"),
    ("sdt: fc2 (CUTLASS)", r"gemm_persistent"),
    ("sdt: compact/gather/finalize", r"compact_kernel|gather_ln_kernel|finalize_kernel|sdt_"),
    ("attention (SDPA)", r"flash|fmha|attention|softmax"),
    ("GEMM (cuBLAS)", r"gemm|nvjet|sm90_xmma|cutlass|cublas"),
    ("LayerNorm+modulate (Triton; with the deferred residual add)", r"ln_modulate_kernel"),
    ("token router (Triton)", r"router_keep_kernel"),
    ("fused elementwise (inductor)", r"triton"),
    ("copies", r"copy|Copy|cat|index"),
    ("other elementwise", r"."),
]


def categorize(name: str, categories: list[tuple[str, str]] = CATEGORIES) -> str:
    for cat, pat in categories:
        if re.search(pat, name):
            return cat
    return "other elementwise"


def kernel_times(fn, iters: int = 5) -> dict[str, float]:
    """Mean µs per call of each kernel name (key "#launches": kernels per call)."""
    cuda = torch.cuda.is_available()
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
        if cuda:
            torch.cuda.synchronize()
    agg: Counter[str] = Counter()
    launches = 0
    for e in prof.events():
        if not cuda or e.device_type == torch.autograd.DeviceType.CUDA:
            agg[e.name] += (e.device_time if cuda else e.self_cpu_time_total) / iters
            launches += 1
    return {**agg, "#launches": launches / iters}


def summarize(title: str, agg: dict[str, float], categories: list[tuple[str, str]] = CATEGORIES) -> dict:
    agg = dict(agg)
    launches = agg.pop("#launches", None)
    total = sum(agg.values())
    cats: Counter[str] = Counter()
    for k, v in agg.items():
        cats[categorize(k, categories)] += v
    print(f"\n## {title}: {total / 1e3:.3f} ms of kernels per call"
          + (f", {launches:.0f} kernels" if launches is not None else ""))
    for c, v in cats.most_common():
        print(f"  {c:<32} {v:9.1f} µs  {100 * v / total:5.1f}%")
    print("  top kernels:")
    for k, v in sorted(agg.items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {v:8.1f} µs  {k[:110]}")
    return {"total_us": total, "launches": launches, "categories": dict(cats), "kernels": agg}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--batch", type=int, default=16, help="images; CFG doubles the rows")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--groups", type=int, default=None, help="at most K engines (default: the compiler's)")
    ap.add_argument("--mlp-mode", choices=("sdt", "dense", "dense-fold", "hybrid", "hybrid-fold"), default=None,
                    help="the DyDiT engines' MLP form (default: sdt where the kernel is built)")
    ap.add_argument("--json")
    a = ap.parse_args()
    ck = load_checkpoint(a.ckpt)
    cfg, dev = ck.config, torch.device(a.device)
    schedule = sampler_timesteps("ddim", a.steps)
    setup = B.BenchSetup(cfg, 2 * a.batch, a.batch, schedule, dev, a.dtype, check_sampler("ddim"), 4.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * a.batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    x = x.to(dev, B._DTYPES[a.dtype])
    y = torch.randint(0, cfg.num_classes, (a.batch,), generator=g)
    y = torch.cat([y, torch.full((a.batch,), cfg.num_classes)]).to(dev)  # CFG: the null class
    eager, dydit, _ = B._eager_runners(ck, setup)
    xs = B.trajectory_inputs(dydit or eager, setup, x, y)  # each t's input as `dyc bench` times it
    del eager, dydit
    static, dyn = B._torch_runners(ck, setup, calib=2, groups=a.groups)
    if dyn is not None and a.mlp_mode and dyn.graphs is not None:
        for m in dyn.graphs.modules:
            m.mlp_mode = a.mlp_mode
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"# {name}  {cfg.name}  {a.dtype}  {2 * a.batch} rows  MLP form {a.mlp_mode or 'default'}")
    out = {"device": name, "rows": 2 * a.batch}
    with torch.no_grad():
        mid = schedule[len(schedule) // 2]
        out["static"] = summarize("torch-static", kernel_times(lambda: static.eager_call(xs[mid], mid, y)))
        if dyn is not None:
            # every group at its first timestep, weighted by how many steps it serves
            groups = dyn.groups
            uses = Counter(group_of(groups, t).index for t in schedule)
            weighted: Counter[str] = Counter()  # "#launches" too: kernels per call, weighted
            out["groups"] = {}
            for gi, n in sorted(uses.items()):
                t = next(t for t in schedule if group_of(groups, t).index == gi)
                agg = kernel_times(lambda t=t: dyn.eager_call(xs[t], t, y))
                out["groups"][gi] = summarize(f"torch DyDiT group {gi} (t={t}, {n} of {len(schedule)} steps)", agg)
                for k, v in agg.items():
                    weighted[k] += v * n / len(schedule)
            out["dydit_mean"] = summarize("torch DyDiT, mean over the schedule", dict(weighted))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
