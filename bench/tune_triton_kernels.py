"""Every configuration of the Triton router and LN+modulate kernels at DiT-XL size (GPU), timed
apart (median of CUDA-event times over many launches), to fix the fastest instead of autotuning
per process (autotune's pick varied between runs). Usage: python bench/tune_triton_kernels.py"""

import statistics
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dyc.kernels import _token_router_triton as TR  # noqa: E402
from dyc.kernels import ln_modulate as LN  # noqa: E402


def time_us(fn, iters=200):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    runs = []
    for _ in range(5):
        s.record()
        for _ in range(iters):
            fn()
        e.record()
        e.synchronize()
        runs.append(1e3 * s.elapsed_time(e) / iters)
    return statistics.median(runs)


def main():
    b, n, c, r = 32, 256, 1152, 72
    dt = torch.bfloat16
    h = torch.randn(b, n, c, device="cuda", dtype=dt)
    w0, b0 = torch.randn(r, c, device="cuda", dtype=dt), torch.zeros(r, device="cuda", dtype=dt)
    w2, b2 = torch.randn(1, r, device="cuda", dtype=dt), torch.zeros(1, device="cuda", dtype=dt)
    keep = torch.empty(b, n, device="cuda", dtype=dt)
    print(f"# {torch.cuda.get_device_name()}  [{b}, {n}, {c}] bf16, µs per launch")
    for cfg in TR.keep_configs:
        bm = cfg.kwargs["BM"]
        t = time_us(lambda cfg=cfg, bm=bm: TR.router_keep_kernel[(triton.cdiv(b * n, bm),)](
            h, w0, b0, w2, b2, keep, b * n, C=c, R=r, BR=128, **cfg.kwargs, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages))
        print(f"router {cfg.kwargs} warps {cfg.num_warps} stages {cfg.num_stages}: {t:6.1f}")
    mods = torch.randn(b, 6, c, device="cuda", dtype=dt)
    out = torch.empty_like(h)
    raw = LN._kernel().fn
    for cfg in LN._kernel().configs:
        rows = cfg.kwargs["ROWS"]
        t = time_us(lambda cfg=cfg, rows=rows: raw[(triton.cdiv(b * n, rows),)](
            h, mods[:, 0], mods[:, 1], out, b * n, n, c, mods.stride(0), 1e-6, BLOCK_C=2048, ROWS=rows,
            num_warps=cfg.num_warps))
        print(f"ln {cfg.kwargs} warps {cfg.num_warps}: {t:6.1f}")


if __name__ == "__main__":
    main()
