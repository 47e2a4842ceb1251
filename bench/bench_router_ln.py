"""The attention branch's glue kernels at DiT-XL size (GPU): gated residual + SDT token router, and
LayerNorm + modulate. Device time per call (torch.profiler), bf16, 32 x 256 tokens, C = 1152.

  python bench/bench_router_ln.py

router rows: (a) unfused, as eager PyTorch runs it (inductor's fused residual, then two cuBLAS
GEMMs and the gate's elementwise kernels); (b) inductor's residual, then the Triton router GEMM
with the gate in its epilogue (what the torch backend runs). An earlier fused kernel that also
did the residual (one pass over h) measured 40.4 µs against 27.8 (a) and 21.8 (b) on an H200 and
was dropped.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_dydit import kernel_times  # noqa: E402

from dyc.backends.torch_sliced import _fused, gate_residual, ln_modulate  # noqa: E402
from dyc.kernels import ln_modulate as LN  # noqa: E402
from dyc.kernels import token_router as TR  # noqa: E402


def main() -> None:
    b, n, c, r = 32, 256, 1152, 72
    dt, dev = torch.bfloat16, "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(b, n, c, device=dev, generator=g).to(dt)
    y = torch.randn(b, n, c, device=dev, generator=g).to(dt)
    mods = torch.randn(6, b, c, device=dev, generator=g).to(dt)
    w0 = (torch.randn(r, c, device=dev, generator=g) / c**0.5).to(dt)
    b0 = torch.zeros(r, device=dev, dtype=dt)
    w2 = torch.randn(1, r, device=dev, generator=g).to(dt)
    b2 = torch.zeros(1, device=dev, dtype=dt)
    gate_res = _fused(gate_residual)

    def unfused():
        hn = gate_res(h, mods[2], y)
        logit = F.linear(F.relu(F.linear(hn, w0, b0)), w2, b2).squeeze(-1)
        return hn, (torch.sigmoid(logit) > 0.5).to(dt)

    def split():
        hn = gate_res(h, mods[2], y)
        return hn, TR.router_keep(hn, w0, b0, w2, b2)

    want_h, want_k = unfused()
    print(f"# {torch.cuda.get_device_name()}  bf16  [{b}, {n}, {c}]; device µs per call")
    for name, fn in (("router (a) unfused", unfused), ("router (b) residual + Triton router", split)):
        got_h, got_k = fn()
        agree = (got_k == want_k).float().mean().item()
        herr = ((got_h.float() - want_h.float()).norm() / want_h.float().norm()).item()
        us = kernel_times(fn, iters=20)
        print(f"{name:<38} {sum(us.values()):7.1f} µs  ({len(us)} kernels)  keep agrees {agree:.4f}  "
              f"h rel err {herr:.1e}")
    ref = ln_modulate(h.float(), mods[0].float(), mods[1].float())
    for name, fn in (("LN+modulate inductor", _fused(ln_modulate)), ("LN+modulate Triton", LN.ln_modulate)):
        out = fn(h, mods[0], mods[1])
        err = ((out.float() - ref).norm() / ref.norm()).item()
        us = sum(kernel_times(lambda fn=fn: fn(h, mods[0], mods[1]), iters=20).values())
        print(f"{name:<38} {us:7.1f} µs  rel err {err:.1e}")


if __name__ == "__main__":
    main()
