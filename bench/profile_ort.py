"""Where an ONNX Runtime CUDA step's GPU time and memory go (issue 16), for a compiled bundle.

Kernels: every group's engine at its first timestep of the schedule, ``2·batch`` rows (CFG), run
without CUDA graphs so that torch.profiler (CUPTI sees every kernel of the process, ONNX Runtime's
included) can name each kernel; weighted by the steps each group serves, as ``dyc bench`` times them.
Memory (``--memory``): device memory of the backend's K sessions at load and after one call per
group, and host RSS at load, per configuration, each in a fresh process (ONNX Runtime does not give
device memory back).
Usage (GPU, onnxruntime-gpu and libdyc_ort_ops.so):
    python bench/profile_ort.py BUNDLE [--batch 16] [--steps 50] [--json OUT] [--memory]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_dydit as P  # noqa: E402

from dyc.bundle import Bundle  # noqa: E402
from dyc.compiler.group import group_of  # noqa: E402
from dyc.timesteps import sampler_timesteps  # noqa: E402

CATEGORIES = [  # first match wins
    ("SdtMlp (dyc plugin)", r"gemm_kept_rows|gemm_persistent|compact_kernel|gather_ln_kernel|finalize_kernel|sdt_|dyc"),
    ("attention", r"flash|fmha|Fmha|attention|Attention|softmax|Softmax|mha"),
    ("GEMM", r"gemm|Gemm|nvjet|sm90_xmma|cutlass|cublas"),
    ("LayerNorm", r"LayerNorm|layer_norm|layernorm"),
    ("transpose/copy", r"Transpose|transpose|copy|Copy|Concat|Split|Slice|Gather"),
    ("elementwise", r"."),
]


def _feeds(b: Bundle, t: int, rows: int, dev: torch.device) -> dict[str, torch.Tensor]:
    cfg = b.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    y = torch.randint(0, cfg.num_classes, (rows,), generator=g)
    y[rows // 2:] = cfg.num_classes  # CFG: the null class for the second half
    f = {"x": x, "t": torch.full((rows,), t), "y": y}
    f.update({k: torch.from_numpy(v) for k, v in b.mask_inputs(t, rows).items()})
    return {k: v.to(dev) for k, v in f.items()}


def kernels(bundle: str, batch: int, steps: int) -> dict:
    from dyc.backends.onnxruntime import OnnxRuntimeBackend

    b = Bundle.load(bundle, verify_checksums=False)
    dev = torch.device("cuda")
    schedule = sampler_timesteps("ddim", steps)
    uses = Counter(group_of(b.groups, t).index for t in schedule)
    out: dict = {"device": torch.cuda.get_device_name(), "rows": 2 * batch, "groups": {}}
    weighted: Counter[str] = Counter()
    be = OnnxRuntimeBackend(b, device=dev, cuda_graphs=False)
    for gi, n in sorted(uses.items()):
        t = next(t for t in schedule if group_of(b.groups, t).index == gi)
        feeds = _feeds(b, t, 2 * batch, dev)
        agg = P.kernel_times(lambda gi=gi, feeds=feeds: be.run_group(gi, feeds))
        out["groups"][gi] = P.summarize(f"onnxruntime group {gi} (t={t}, {n} of {steps} steps)", agg, CATEGORIES)
        for k, v in agg.items():
            weighted[k] += v * n / steps
    out["mean"] = P.summarize("onnxruntime, mean over the schedule", dict(weighted), CATEGORIES)
    # the same calls as CUDA-graph replays, timed: what `dyc bench` sees
    be = OnnxRuntimeBackend(b, device=dev, cuda_graphs=True)
    ms: dict[int, float] = {}
    for gi in sorted(uses):
        t = next(t for t in schedule if group_of(b.groups, t).index == gi)
        feeds = _feeds(b, t, 2 * batch, dev)
        for _ in range(3):
            be.run_group(gi, feeds)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        s.record()
        for _ in range(20):
            be.run_group(gi, feeds)
        e.record()
        torch.cuda.synchronize()
        ms[gi] = s.elapsed_time(e) / 20
    out["graph_ms"] = ms
    out["graph_ms_mean"] = sum(ms[g] * n for g, n in uses.items()) / steps
    print(f"\nCUDA-graph replay per call: {out['graph_ms_mean']:.3f} ms (schedule mean); per group {ms}")
    return out


def memory_one(bundle: str, batch: int, config: str) -> dict:
    """One configuration, this process: device bytes of the sessions at load and after a call per group."""
    from dyc.backends.onnxruntime import OnnxRuntimeBackend

    def rss() -> int:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))

    b = Bundle.load(bundle, verify_checksums=False)
    dev = torch.device("cuda")
    torch.cuda.init()
    torch.cuda.synchronize()
    r0, (f0, _) = rss(), torch.cuda.mem_get_info()
    be = OnnxRuntimeBackend(b, device=dev, share_arena=config == "shared-arena")
    torch.cuda.synchronize()
    r1, (f1, _) = rss(), torch.cuda.mem_get_info()
    outs = []
    for g in b.groups:
        outs.append(be.run_group(g.index, _feeds(b, g.t_lo, 2 * batch, dev)).float().cpu())
    torch.cuda.synchronize()
    f2, _ = torch.cuda.mem_get_info()
    w = b.manifest["files"]["weights.bin"]["bytes"]
    return {"config": config, "groups": len(b.groups), "weights_bytes": w, "load_x": (f0 - f1) / w,
            "after_calls_x": (f0 - f2) / w, "host_rss_load_x": (r1 - r0) / w,
            "out_checksum": float(sum(o.double().abs().sum() for o in outs))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--batch", type=int, default=16, help="images; CFG doubles the rows")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--json")
    ap.add_argument("--memory", action="store_true", help="device memory per configuration (subprocesses)")
    ap.add_argument("--memory-config", help=argparse.SUPPRESS)  # one configuration, in this process
    a = ap.parse_args()
    if a.memory_config:
        print(json.dumps(memory_one(a.bundle, a.batch, a.memory_config)))
        return
    out = kernels(a.bundle, a.batch, a.steps)
    if a.memory:
        out["memory"] = []
        for config in ("per-session-arena", "shared-arena"):
            r = subprocess.run([sys.executable, __file__, a.bundle, "--batch", str(a.batch), "--memory-config", config],
                               capture_output=True, text=True)
            line = (r.stdout.strip().splitlines() or [""])[-1]
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                m = {"config": config, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
            out["memory"].append(m)
            print(f"memory {config}: {m}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
