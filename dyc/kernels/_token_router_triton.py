"""Triton kernels of dyc.kernels.token_router (imported only where Triton is installed: Triton
resolves a kernel's helpers from its module's globals)."""

import triton
import triton.language as tl


@triton.jit
def _gate(acc, b0_ptr, w2_ptr, b2_ptr, j, jmask, dt: tl.constexpr):
    """[rows, R] hidden pre-activations (fp32) -> 0/1 keep, rounded as the unfused path in dt."""
    b0 = tl.load(b0_ptr + j, mask=jmask, other=0.0).to(tl.float32)
    z = tl.maximum((acc + b0[None, :]).to(dt).to(tl.float32), 0.0)
    w2 = tl.load(w2_ptr + j, mask=jmask, other=0.0).to(tl.float32)
    logit = tl.sum(z * w2[None, :], axis=1) + tl.load(b2_ptr).to(tl.float32)
    # the unfused gate in dt: logit and sigmoid rounded, then > 0.5 (a logit just above 0 whose
    # sigmoid rounds to 0.5 is dropped there, so it is here)
    lg = logit.to(dt).to(tl.float32)
    sg = (1.0 / (1.0 + tl.exp(-lg))).to(dt).to(tl.float32)
    return tl.where(sg > 0.5, 1.0, 0.0)


@triton.jit
def router_keep_kernel(h_ptr, w0_ptr, b0_ptr, w2_ptr, b2_ptr, keep_ptr, rows, C: tl.constexpr,
                       R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = r < rows
    j = tl.arange(0, BR)
    jmask = j < R
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, C, BK):
        k = k0 + tl.arange(0, BK)
        kmask = k < C
        h = tl.load(h_ptr + r[:, None].to(tl.int64) * C + k[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0.0)
        w0 = tl.load(w0_ptr + j[:, None] * C + k[None, :], mask=jmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w0), acc)
    keep = _gate(acc, b0_ptr, w2_ptr, b2_ptr, j, jmask, h_ptr.dtype.element_ty)
    tl.store(keep_ptr + r, keep.to(keep_ptr.dtype.element_ty), mask=rmask)


# tile heights / K steps / warps, picked per shape at the first call
keep_configs = [triton.Config({"BM": bm, "BK": bk}, num_warps=w, num_stages=st)
                for bm, bk, w, st in ((32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 8, 3),
                                      (128, 64, 8, 4), (128, 128, 8, 3))]


def kernel(autotune: bool):
    """The router kernel; autotuned on a GPU (Triton's interpreter cannot time trials)."""
    return triton.autotune(configs=keep_configs, key=["rows", "C", "R"])(router_keep_kernel) if autotune \
        else router_keep_kernel
