"""SdtMlp GEMMs against cuBLAS over the number of kept rows (GPU): where the kernel's tiles lose.

  python bench/sweep_sdt_rows.py [--rows 64,256,1024,4096,8192] [--hidden 4608,2304] [--json OUT]

For each kept-row count M (of 32 x 256 tokens, C = 1152) and hidden width Hs: device time per call
of the dyc kernel's fc1 and fc2 GEMMs and its compaction/gather/finalize (torch.profiler), next to
cuBLAS on the same M x C x Hs products (F.linear with bias; GELU not fused). TFLOP/s are counted
on the M kept rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_dydit import kernel_times  # noqa: E402

from dyc.kernels import sdt_mlp as K  # noqa: E402


def split(agg: dict[str, float]) -> dict[str, float]:
    out = {"fc1": 0.0, "fc2": 0.0, "rest": 0.0}
    for k, v in agg.items():
        if "gemm1" in k:
            out["fc1"] += v
        elif "gemm" in k:
            out["fc2"] += v
        else:
            out["rest"] += v
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="32,64,128,256,512,1024,2048,3072,4096,6144,8192")
    ap.add_argument("--hidden", default="4608,2304")
    ap.add_argument("--json")
    a = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    b, n, c = 32, 256, 1152
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(b, n, c, device=dev, generator=g).to(dt)
    mods = (torch.randn(b, 3, c, device=dev, generator=g) * 0.1).to(dt).unbind(1)
    res = []
    print(f"# {torch.cuda.get_device_name()}  bf16  {b}x{n} tokens  C={c}")
    print(f"{'M':>5} {'Hs':>5} | {'dyc fc1':>8} {'fc2':>8} {'rest':>7} | {'cuBLAS fc1':>10} {'fc2':>8} | "
          f"{'TF/s dyc fc1':>12} {'fc2':>6} | {'cuBLAS':>6} {'fc2':>6}")
    for hs in (int(v) for v in a.hidden.split(",")):
        w1 = (torch.randn(hs, c, device=dev, generator=g) / c**0.5).to(dt)
        b1 = torch.zeros(hs, device=dev, dtype=dt)
        w2 = (torch.randn(c, hs, device=dev, generator=g) / hs**0.5).to(dt)
        b2 = torch.zeros(c, device=dev, dtype=dt)
        for m in (int(v) for v in a.rows.split(",")):
            keep = torch.zeros(b * n, device=dev, dtype=dt)
            keep[torch.randperm(b * n, device=dev, generator=g)[:m]] = 1
            keep = keep.view(b, n)
            out = torch.empty_like(x)
            ours = split(kernel_times(partial(K.sdt_mlp, x, *mods, keep, w1, b1, w2, b2, out=out), iters=20))
            xa = torch.randn(m, c, device=dev, generator=g).to(dt)
            ha = torch.randn(m, hs, device=dev, generator=g).to(dt)
            cb1 = sum(v for k, v in kernel_times(partial(F.linear, xa, w1, b1), iters=20).items()
                      if "gemm" in k or "nvjet" in k or "xmma" in k)
            cb2 = sum(v for k, v in kernel_times(partial(F.linear, ha, w2, b2), iters=20).items()
                      if "gemm" in k or "nvjet" in k or "xmma" in k)
            fl = 2 * m * c * hs / 1e6  # MFLOP per GEMM -> TFLOP/s = MFLOP / µs
            row = {"rows": m, "hidden": hs, "dyc_fc1_us": ours["fc1"], "dyc_fc2_us": ours["fc2"],
                   "dyc_rest_us": ours["rest"], "cublas_fc1_us": cb1, "cublas_fc2_us": cb2}
            res.append(row)
            print(f"{m:>5} {hs:>5} | {ours['fc1']:8.1f} {ours['fc2']:8.1f} {ours['rest']:7.1f} | {cb1:10.1f} "
                  f"{cb2:8.1f} | {fl / ours['fc1']:12.0f} {fl / ours['fc2']:6.0f} | {fl / cb1:6.0f} {fl / cb2:6.0f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": res}, indent=1))


if __name__ == "__main__":
    main()
