"""One small SdtMlp call per path and dtype, for `compute-sanitizer --tool memcheck` (and racecheck)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dyc.kernels import sdt_mlp as K  # noqa: E402


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for generic in (False, True):
            for b, n, c, groups, gs, rate in ((2, 64, 1152, 3, 288, 0.5), (1, 17, 1152, 2, 288, 0.0),
                                              (2, 33, 100, 3, 30, 1.0)):
                hs = groups * gs

                def r(*s, dt=dtype):
                    return torch.randn(*s, generator=g, device="cuda").to(dt)

                keep = (torch.rand(b, n, generator=g, device="cuda") < rate).to(dtype)
                w1, w2 = r(hs, c) * c**-0.5, r(c, hs) * hs**-0.5
                # per-image mask (group-batched GEMM1), shared [1, G] mask (column mask), none (plain)
                for cm in (torch.ones(b, groups, device="cuda", dtype=dtype),
                           torch.ones(1, groups, device="cuda", dtype=dtype), None):
                    y = K.sdt_mlp(r(b, n, c), r(b, c), r(b, c), r(b, c), keep, w1, r(hs), w2, r(c), channel_mask=cm,
                                  group_size=gs, force_generic=generic)
                    torch.cuda.synchronize()
                    assert torch.isfinite(y).all()
    # DiT-XL size, Hopper path: kept counts on both sides of GEMM2's few-rows threshold (2048 rows)
    b, n, c, groups, gs = 32, 256, 1152, 16, 288
    for rate in (0.05, 0.5):
        dtype = torch.bfloat16
        x = torch.randn(b, n, c, generator=g, device="cuda").to(dtype)
        keep = (torch.rand(b, n, generator=g, device="cuda") < rate).to(dtype)
        hs = groups * gs
        w1 = (torch.randn(hs, c, generator=g, device="cuda") * c**-0.5).to(dtype)
        w2 = (torch.randn(c, hs, generator=g, device="cuda") * hs**-0.5).to(dtype)
        mods = [torch.randn(b, c, generator=g, device="cuda").to(dtype) for _ in range(3)]
        for cm in (torch.ones(1, groups, device="cuda", dtype=dtype), None):
            y = K.sdt_mlp(x, *mods, keep, w1, torch.zeros(hs, device="cuda", dtype=dtype), w2,
                          torch.zeros(c, device="cuda", dtype=dtype), channel_mask=cm, group_size=gs)
            torch.cuda.synchronize()
            assert torch.isfinite(y).all()
    print("sanitize_case: done")


if __name__ == "__main__":
    main()
