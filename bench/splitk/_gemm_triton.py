"""Triton kernel of bench/splitk/gemm.py (Triton resolves a kernel's helpers from its module's globals)."""

import triton
import triton.language as tl

from dyc.kernels._token_router_triton import _gate

EPI_BIAS, EPI_GELU, EPI_ROUTER = 0, 1, 2


@triton.jit
def _gelu_tanh(x):
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + (1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)))


@triton.jit
def splitk_linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, w2_ptr, b2_ptr,
                         M, N, K, k_per_split, splits, sxm, swn, sym,
                         EPI: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y[M, N] = epilogue(x[M, K] · w[N, K]ᵀ + b) with K cut into ``splits`` slices (grid axis 1).

    Each slice's program writes its fp32 partial tile to ``ws``; the program that finishes a tile's
    last slice (a per-tile counter, left at 0 again for the next call) sums the partials in slice
    order, so the result does not depend on which slice finished last. EPI_ROUTER: N is the token
    router's hidden width (one N tile) and y the per-row keep (0/1).
    """
    pid = tl.program_id(0)
    s = tl.program_id(1)
    tiles_m = tl.cdiv(M, BM)
    pm = pid % tiles_m  # neighbouring programs share a weight tile: few rows make the weights the traffic
    pn = pid // tiles_m
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mmask = rm < M
    nmask = rn < N
    k0 = s * k_per_split
    k1 = tl.minimum(K, k0 + k_per_split)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    xp = x_ptr + rm[:, None].to(tl.int64) * sxm
    wp = w_ptr + rn[None, :].to(tl.int64) * swn
    for k in range(k0, k1, BK):
        kk = k + rk
        a = tl.load(xp + kk[None, :], mask=mmask[:, None] & (kk[None, :] < k1), other=0.0)
        b = tl.load(wp + kk[:, None], mask=nmask[None, :] & (kk[:, None] < k1), other=0.0)
        acc = tl.dot(a, b, acc)
    last = True
    if SPLIT:
        tiles = tl.num_programs(0)
        offs = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        tl.store(ws_ptr + (s * tiles + pid).to(tl.int64) * (BM * BN) + offs, acc, cache_modifier=".wt")
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        last = done == splits - 1
        if last:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for j in range(0, splits):
                acc += tl.load(ws_ptr + (j * tiles + pid).to(tl.int64) * (BM * BN) + offs, cache_modifier=".cv")
            tl.atomic_xchg(cnt_ptr + pid, 0)
    if last:
        if EPI == 2:  # EPI_ROUTER
            keep = _gate(acc, b_ptr, w2_ptr, b2_ptr, rn, nmask, x_ptr.dtype.element_ty)
            tl.store(y_ptr + rm, keep.to(y_ptr.dtype.element_ty), mask=mmask)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
            if EPI == 1:  # EPI_GELU
                acc = _gelu_tanh(acc)
            yp = y_ptr + rm[:, None].to(tl.int64) * sym + rn[None, :]
            tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
