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

# a few tile heights / warp counts, picked per shape at the first call (h is restored after each
# trial, as the kernel updates it in place); one program per 64 rows was latency-bound (34 us
# for 32 x 256 tokens of DiT-XL on an H200, where reading and writing h is ~12 us)
configs = [triton.Config({"BM": bm, "BK": bk}, num_warps=w, num_stages=st)
           for bm, bk, w, st in ((16, 128, 4, 3), (32, 64, 4, 3), (32, 128, 4, 3), (32, 128, 8, 3),
                                 (64, 64, 4, 4), (64, 128, 8, 3))]

@triton.jit
def residual_router_kernel(h_ptr, g_ptr, y_ptr, w0_ptr, b0_ptr, w2_ptr, b2_ptr, keep_ptr,
                           rows, tokens, g_stride, C: tl.constexpr, R: tl.constexpr,
                           BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = r < rows
    img = (r // tokens).to(tl.int64)
    j = tl.arange(0, BR)
    jmask = j < R
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, C, BK):
        k = k0 + tl.arange(0, BK)
        kmask = k < C
        m = rmask[:, None] & kmask[None, :]
        offs = r[:, None].to(tl.int64) * C + k[None, :]
        h = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + img[:, None] * g_stride + k[None, :], mask=m, other=0.0).to(tl.float32)
        hn = (h + g * y).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs, hn, mask=m)
        w0 = tl.load(w0_ptr + j[:, None] * C + k[None, :], mask=jmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(hn, tl.trans(w0), acc)
    keep = _gate(acc, b0_ptr, w2_ptr, b2_ptr, j, jmask, h_ptr.dtype.element_ty)
    tl.store(keep_ptr + r, keep.to(keep_ptr.dtype.element_ty), mask=rmask)

keep_configs = [triton.Config({"BM": bm, "BK": bk}, num_warps=w, num_stages=st)
                for bm, bk, w, st in ((32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 8, 3),
                                      (128, 64, 8, 4), (128, 128, 8, 3))]

def kernels(autotune: bool):
    """(residual_router, router_keep) kernels; autotuned on a GPU (the interpreter cannot time trials)."""
    if autotune:
        return (triton.autotune(configs=configs, key=["rows", "C", "R"], restore_value=["h_ptr"])(
            residual_router_kernel),
            triton.autotune(configs=keep_configs, key=["rows", "C", "R"])(router_keep_kernel))
    return residual_router_kernel, router_keep_kernel
