"""Where an ONNX Runtime CUDA step's GPU time and memory go (issue 16), for a compiled bundle.

Kernels: every group's engine at its first timestep of the schedule, ``2·batch`` rows (CFG), run
without CUDA graphs so that torch.profiler (CUPTI sees every kernel of the process, ONNX Runtime's
included) can name each kernel; weighted by the steps each group serves, as ``dyc bench`` times them.
Memory (``--memory``): device memory of the backend's K sessions at load (the weights' upload, then
each session as it is created) and after one call per group, and host RSS at load, per configuration
(``MEMORY_CONFIGS``), each in a fresh process (ONNX Runtime does not give device memory back), with
that configuration's CUDA-graph replay time per call (does a setting cost speed?).
Usage (GPU, onnxruntime-gpu and libdyc_ort_ops.so):
    python bench/profile_ort.py BUNDLE [--batch 16] [--steps 50] [--json OUT] [--memory]
"""

from __future__ import annotations

import argparse
import json
import os
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
    out["graph_ms"], out["graph_ms_mean"] = replay_ms(OnnxRuntimeBackend(b, device=dev, cuda_graphs=True), b,
                                                      batch, steps)
    print(f"\nCUDA-graph replay per call: {out['graph_ms_mean']:.3f} ms (schedule mean); per group {out['graph_ms']}")
    return out


def replay_ms(be, b: Bundle, batch: int, steps: int) -> tuple[dict[int, float], float]:
    """Each group's call at its first schedule timestep, 2·batch rows, timed over 20 CUDA-graph
    replays: per group, and the mean over the schedule (weighted by the steps each group serves)."""
    dev = be.device
    schedule = sampler_timesteps("ddim", steps)
    uses = Counter(group_of(b.groups, t).index for t in schedule)
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
    return ms, sum(ms[g] * n for g, n in uses.items()) / steps


MEMORY_CONFIGS = {  # name: (OnnxRuntimeBackend keywords, environment of the process, a torch GEMM first)
    "per-session-arena": ({"share_arena": False}, {}, False),
    # the defaults: one arena; sessions create their cuBLAS handles under CUBLAS_WORKSPACE_CONFIG=:4096:1
    "shared-arena": ({}, {}, False),
    # the same after torch has used cuBLAS in this process (as in `dyc bench`: eager runs first)
    "shared-arena, torch GEMM first": ({}, {}, True),
    "shared-arena, cuBLAS default workspace": ({"cublas_workspace": None}, {}, False),
    # the setting in the environment from the process's start
    "shared-arena, CUBLAS_WORKSPACE_CONFIG=:4096:1 at start": ({}, {"CUBLAS_WORKSPACE_CONFIG": ":4096:1"}, False),
}


def memory_one(bundle: str, batch: int, config: str) -> dict:
    """One configuration, this process: device bytes of the sessions at load (the weights, then each
    session as it is created) and after a call per group."""
    import dyc.backends.onnxruntime as ortb

    def rss() -> int:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))

    def free() -> int:
        torch.cuda.synchronize()
        return torch.cuda.mem_get_info()[0]

    b = Bundle.load(bundle, verify_checksums=False)
    dev = torch.device("cuda")
    torch.cuda.init()
    kw, _, torch_first = MEMORY_CONFIGS[config]
    if torch_first:
        (torch.ones(64, 64, device=dev) @ torch.ones(64, 64, device=dev)).sum().item()
    marks: list[int] = []  # free device bytes after the weights' upload, then after each session
    upload, session = ortb.device_weights, ortb.OnnxRuntimeBackend._session

    def spy_upload(*a, **k):
        out = upload(*a, **k)
        marks.append(free())
        return out

    def spy_session(self, *a, **k):
        out = session(self, *a, **k)
        marks.append(free())
        return out

    ortb.device_weights, ortb.OnnxRuntimeBackend._session = spy_upload, spy_session
    r0, f0 = rss(), free()
    be = ortb.OnnxRuntimeBackend(b, device=dev, **kw)
    r1, f1 = rss(), free()
    outs = []
    for g in b.groups:
        outs.append(be.run_group(g.index, _feeds(b, g.t_lo, 2 * batch, dev)).float().cpu())
    f2 = free()
    graph_ms, graph_ms_mean = replay_ms(be, b, batch, 50)
    w = b.manifest["files"]["weights.bin"]["bytes"]
    used = be.weight_bytes()  # the bytes of weights.bin the sessions reference (one device copy)
    steps = [f0, *marks]
    return {"config": config, "groups": len(b.groups), "weights_bytes": w, "weights_used_bytes": used,
            "load_x": (f0 - f1) / w, "after_calls_x": (f0 - f2) / w, "host_rss_load_x": (r1 - r0) / w,
            "load_x_used": (f0 - f1) / used, "after_calls_x_used": (f0 - f2) / used,
            "weights_upload_bytes": steps[0] - steps[1],
            "session_bytes": [steps[i] - steps[i + 1] for i in range(1, len(steps) - 1)],
            "out_checksum": float(sum(o.double().abs().sum() for o in outs)), "graph_ms_mean": graph_ms_mean,
            "graph_ms": graph_ms}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--batch", type=int, default=16, help="images; CFG doubles the rows")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--json")
    ap.add_argument("--memory", action="store_true", help="device memory per configuration (subprocesses)")
    ap.add_argument("--skip-kernels", action="store_true", help="memory only: no kernel profile")
    ap.add_argument("--memory-config", help=argparse.SUPPRESS)  # one configuration, in this process
    a = ap.parse_args()
    if a.memory_config:
        print(json.dumps(memory_one(a.bundle, a.batch, a.memory_config)))
        return
    out = {} if a.skip_kernels else kernels(a.bundle, a.batch, a.steps)
    if a.memory:
        out["memory"] = []
        for config, (_, env, _) in MEMORY_CONFIGS.items():
            r = subprocess.run([sys.executable, __file__, a.bundle, "--batch", str(a.batch), "--memory-config", config],
                               capture_output=True, text=True, env={**os.environ, **env})
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
