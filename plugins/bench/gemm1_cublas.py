"""cuBLAS figures for the GEMM1 sweep (gemm1_sweep.cu), same shape and GPU: fc1 with cuBLASLt's fused
bias + GELU epilogue (torch._addmm_activation) and the plain GEMM + bias (F.linear).
Usage: python plugins/bench/gemm1_cublas.py [M N K]"""

import sys

import torch
import torch.nn.functional as F

M, N, K = (int(v) for v in sys.argv[1:4]) if len(sys.argv) > 3 else (4096, 4608, 1152)
a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.03
b = torch.randn(N, device="cuda", dtype=torch.bfloat16) * 0.1


def time_us(fn, iters=50):
    for _ in range(5):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    e.synchronize()
    return 1e3 * s.elapsed_time(e) / iters


flop = 2.0 * M * N * K
for name, fn in [("cublasLt_gelu_bias", lambda: torch._addmm_activation(b, a, w.t(), use_gelu=True)),
                 ("cublas_linear_bias", lambda: F.linear(a, w, b))]:
    t = time_us(fn)
    print(f"{name:<28} {t:8.1f} us {flop / t * 1e-6:7.1f} TFLOP/s")
