"""cuBLAS vs the split-K Triton GEMM of gemm.py (this folder) on a DiT block's GEMM shapes (GPU).

For each row count (batch x CFG x tokens) and width fraction (a DyDiT engine keeps a fraction of a
layer's heads / channel groups), times cuBLAS and every split-K candidate side by side and reports
the fastest candidate; also the token router (split-K kernel vs the unsplit one). Checks
every Triton result against cuBLAS first (relative L2). Usage:
    python bench/splitk/bench_gemm.py [--rows 512 2048 8192] [--fractions 1 0.5 0.25] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gemm as G  # noqa: E402

from dyc.kernels import token_router as TR  # noqa: E402


def shapes(c: int, heads: int, dh: int, mlp: int, groups: int, frac: float) -> list[tuple[str, int, int, bool]]:
    nh = max(1, round(heads * frac))
    ng = max(1, round(groups * frac))
    gs = mlp // groups
    return [("qkv", 3 * dh * nh, c, False), ("proj", c, dh * nh, False), ("fc1", gs * ng, c, True),
            ("fc2", c, gs * ng, False)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--json")
    a = ap.parse_args()
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    name = torch.cuda.get_device_name()
    print(f"# {name} ({sms} SMs), {a.dtype}; DiT-XL block GEMMs")
    g = torch.Generator(device=dev).manual_seed(0)
    rows_out = []
    for m in a.rows:
        for frac in a.fractions:
            for op, n, k, gelu in shapes(1152, 16, 72, 4608, 16, frac):
                x = torch.randn(m, k, device=dev, dtype=dt, generator=g)
                w = torch.randn(n, k, device=dev, dtype=dt, generator=g) / k ** 0.5
                b = torch.randn(n, device=dev, dtype=dt, generator=g)
                ref = (torch._addmm_activation(b, x, w.t(), use_gelu=True) if gelu else F.linear(x, w, b))
                t_cublas = G.time_ms(lambda: (torch._addmm_activation(b, x, w.t(), use_gelu=True) if gelu  # noqa: B023
                                               else F.linear(x, w, b)))  # noqa: B023
                best, errs = None, []
                for cfg in G.candidates(m, n, k, "gelu" if gelu else "bias", sms):
                    y = G.linear(x, w, b, cfg, gelu=gelu)
                    errs.append(rel(y, ref))
                    t = G.time_ms(lambda cfg=cfg: G.linear(x, w, b, cfg, gelu=gelu))  # noqa: B023
                    if best is None or t < best[0]:
                        best = (t, cfg)
                if max(errs) > 1e-2:
                    raise SystemExit(f"split-K result off cuBLAS's: relative L2 {max(errs):.2e} ({op}, {m} rows)")
                row = {"rows": m, "fraction": frac, "op": op, "n": n, "k": k, "cublas_ms": t_cublas,
                       "triton_ms": best[0], "triton_config": best[1].__dict__, "max_rel_l2": max(errs),
                       "speedup": t_cublas / best[0]}
                rows_out.append(row)
                print(f"M={m:5d} f={frac:4.2f} {op:4s} N={n:5d} K={k:5d}  cuBLAS {1e3 * t_cublas:7.1f} µs  "
                      f"split-K {1e3 * best[0]:7.1f} µs ({best[1].bm}x{best[1].bn}, {best[1].splits} slices)  "
                      f"x{t_cublas / best[0]:.2f}  rel L2 {max(errs):.1e}")
        # the token router (C -> C/16 -> 1 and the gate)
        h = torch.randn(1, m, 1152, device=dev, dtype=dt, generator=g)
        w0 = torch.randn(72, 1152, device=dev, dtype=dt, generator=g) / 34
        b0 = torch.randn(72, device=dev, dtype=dt, generator=g) * 0.1
        w2 = torch.randn(1, 72, device=dev, dtype=dt, generator=g) / 8
        b2 = torch.randn(1, device=dev, dtype=dt, generator=g) * 0.1
        ref = TR.router_keep(h, w0, b0, w2, b2)
        t_old = G.time_ms(lambda: TR.router_keep(h, w0, b0, w2, b2))  # noqa: B023
        best, mism = None, 0
        for cfg in G.candidates(m, 72, 1152, "router", sms):
            keep = G.router_keep(h, w0, b0, w2, b2, cfg)
            mism = max(mism, int((keep != ref).sum()))
            t = G.time_ms(lambda cfg=cfg: G.router_keep(h, w0, b0, w2, b2, cfg))  # noqa: B023
            if best is None or t < best[0]:
                best = (t, cfg)
        if mism > m // 200:  # only tokens within rounding of the gate's threshold may differ
            raise SystemExit(f"split-K router: {mism} of {m} tokens differ from the unsplit kernel")
        rows_out.append({"rows": m, "op": "router", "unsplit_ms": t_old, "split_ms": best[0],
                         "split_config": best[1].__dict__, "mismatched_tokens": mism})
        print(f"M={m:5d} router  unsplit {1e3 * t_old:6.1f} µs  split-K {1e3 * best[0]:6.1f} µs "
              f"({best[1].bm} rows, {best[1].splits} slices)  tokens differing {mism}")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": name, "dtype": a.dtype, "results": rows_out}, indent=1))


if __name__ == "__main__":
    main()
