"""Per-kernel GPU times of one SdtMlp call (torch.profiler), without and with a channel mask, next to
cuBLAS on the same GEMM shapes. Usage: python plugins/scripts/profile_sdt_mlp.py [--kept 0.5] [--variants ...]"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from bench_sdt_mlp import make  # noqa: E402
from profile_dydit import kernel_times  # noqa: E402

from dyc.kernels import sdt_mlp as K  # noqa: E402


def short(name: str) -> str:
    for key in ("gemm_kept_rows", "gemm_persistent", "compact_kernel", "gather_ln_kernel", "finalize_kernel",
                "generic_gemm_kernel"):
        if key in name:
            tag = ""
            if "gemm" in key and "cutlass" in name:
                tag = "[fc1 masked]" if "Sm90ColBroadcast" in name else ("[fc1]" if "GeluTanh" in name else "[fc2]")
            return key + tag
    return name[:90]


def kernel_table(fn, iters=20):
    """Mean µs per call of each kernel, names shortened."""
    agg = {}
    for name, us in kernel_times(fn, iters).items():
        agg[short(name)] = agg.get(short(name), 0.0) + us
    return agg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kept", type=float, default=0.5)
    ap.add_argument("--variants", default="default,masked")
    a = ap.parse_args()
    b, n, c, hs, gs = 32, 256, 1152, 4608, 288
    ts = make(b, n, c, hs, torch.bfloat16, a.kept)
    out = torch.empty_like(ts[0])
    m = int((ts[4] > 0.5).sum().item())
    print(f"# {torch.cuda.get_device_name()} kept rows {m}")
    ones = torch.ones(b, hs // gs, device="cuda", dtype=torch.bfloat16)
    for v in a.variants.split(","):
        cm = ones if v == "masked" else None
        agg = kernel_table(lambda: K.sdt_mlp(*ts, channel_mask=cm, group_size=gs, out=out))  # noqa: B023
        tot = sum(agg.values())
        parts = ", ".join(f"{k} {t:.1f}" for k, t in sorted(agg.items(), key=lambda kv: -kv[1]))
        print(f"[{v}] total {tot:.1f} us: {parts}")
    a1 = torch.randn(m, c, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(m, hs, device="cuda", dtype=torch.bfloat16)
    for name, fn in (("cublas fc1 (M,C)x(C,Hs)+bias", lambda: F.linear(a1, ts[5], ts[6])),
                     ("cublas fc2 (M,Hs)x(Hs,C)+bias", lambda: F.linear(h, ts[7], ts[8])),
                     ("gelu_tanh (M,Hs)", lambda: F.gelu(h, approximate="tanh"))):
        agg = kernel_table(fn)
        tot = sum(agg.values())
        fl = 2 * m * c * hs / (tot * 1e-6) / 1e12 if "cublas" in name else 0
        print(f"{name}: {tot:.1f} us" + (f" ({fl:.0f} TFLOP/s)" if fl else "") + " " + str(list(agg)[:2]))


if __name__ == "__main__":
    main()
