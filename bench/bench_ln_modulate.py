"""LayerNorm + adaLN modulate at DiT-XL activation size: eager PyTorch, inductor's fusion (what
torch.compile makes of dyc.backends.torch_sliced.ln_modulate) and the Triton kernel
(dyc.kernels.ln_modulate), each checked against fp32. Usage (GPU): python bench/bench_ln_modulate.py"""

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dyc.backends.torch_sliced import ln_modulate  # noqa: E402
from dyc.kernels import ln_modulate as K  # noqa: E402


def time_us(fn, iters=100):
    for _ in range(10):
        fn()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(1e3 * s.elapsed_time(e))
    return statistics.median(ts)


def main():
    b, n, c = 32, 256, 1152
    x = torch.randn(b, n, c, device="cuda", dtype=torch.bfloat16) + 0.3
    mods = torch.randn(b, 6, c, device="cuda", dtype=torch.bfloat16)  # strided rows, as the model slices them
    shift, scale = mods[:, 0], mods[:, 1]
    ref = ln_modulate(x.float(), shift.float(), scale.float())
    moved = 2 * x.numel() * x.element_size()
    print(f"# {torch.cuda.get_device_name()} x [{b}, {n}, {c}] bf16; median us; GB/s counting x read + out written")
    compiled = torch.compile(ln_modulate, dynamic=False, fullgraph=True)
    for name, fn in [("eager", ln_modulate), ("inductor", compiled), ("triton", K.ln_modulate)]:
        out = fn(x, shift, scale)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        t = time_us(lambda fn=fn: fn(x, shift, scale))
        print(f"{name:<9} {t:8.1f} us {moved / t * 1e-3:8.0f} GB/s  rel L2 err vs fp32 {err:.1e}")


if __name__ == "__main__":
    main()
