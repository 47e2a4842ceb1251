"""The attention branch's gated residual and the SDT token router in one Triton kernel.

``residual_router(h, gate, y, w0, b0, w2, b2)`` updates ``h`` in place to ``h + gate[:, None] * y``
(the attention output added back) and returns the token router's decision on the new ``h``:
``keep = sigmoid(w2 · relu(w0 · h + b0) + b2) > 0.5`` as 0/1 in h's dtype, shape [B, N].

Unfused, this is one elementwise pass plus two skinny GEMMs (C -> C/16 -> 1) and four elementwise
kernels per layer; fused, h and y are read once and h written once, and the router's [rows, C/16]
product stays in registers. Rounding follows the unfused bf16/fp16 path where it decides: the new
h and the router's hidden layer are rounded to h's dtype before they are used, and the gate is
the unfused one (the logit and its sigmoid rounded to h's dtype, then > 0.5). Needs Triton on
CUDA (``available()``); with ``TRITON_INTERPRET=1`` it also runs on CPU tensors (how the CPU
tests check it).
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["available", "residual_router"]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available(device: torch.device | str = "cuda") -> bool:
    """True when the kernel can run on ``device`` (CUDA with Triton, or the interpreter on CPU)."""
    dev = torch.device(device)
    if not _have_triton():
        return False
    return (dev.type == "cuda" and torch.cuda.is_available()) or (dev.type == "cpu" and _interpret())


@functools.cache
def _kernel(autotune: bool):
    import triton
    import triton.language as tl

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
        b0 = tl.load(b0_ptr + j, mask=jmask, other=0.0).to(tl.float32)
        z = tl.maximum((acc + b0[None, :]).to(h_ptr.dtype.element_ty).to(tl.float32), 0.0)
        w2 = tl.load(w2_ptr + j, mask=jmask, other=0.0).to(tl.float32)
        logit = tl.sum(z * w2[None, :], axis=1) + tl.load(b2_ptr).to(tl.float32)
        # the unfused gate in h's dtype: logit and sigmoid rounded, then > 0.5 (a logit just above 0
        # whose sigmoid rounds to 0.5 is dropped there, so it is here)
        lg = logit.to(h_ptr.dtype.element_ty).to(tl.float32)
        sg = (1.0 / (1.0 + tl.exp(-lg))).to(h_ptr.dtype.element_ty).to(tl.float32)
        keep = tl.where(sg > 0.5, 1.0, 0.0)
        tl.store(keep_ptr + r, keep.to(keep_ptr.dtype.element_ty), mask=rmask)

    if autotune:  # (Triton's interpreter cannot time trials: a fixed tile there)
        return triton.autotune(configs=configs, key=["rows", "C", "R"], restore_value=["h_ptr"])(
            residual_router_kernel)
    return residual_router_kernel


def residual_router(h: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor,
                    w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """h [B, N, C] (contiguous, updated in place); gate [B, C] (rows may be strided); y [B, N, C];
    w0 [R, C]; b0 [R]; w2 [1, R]; b2 [1]. Returns keep [B, N] (0/1, h's dtype)."""
    import triton

    b, n, c = h.shape
    r = w0.shape[0]
    if h.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"residual_router: fp16/bf16 only, got {h.dtype}")
    if not h.is_contiguous():
        raise ValueError("residual_router: h is updated in place and must be contiguous")
    if y.shape != h.shape or gate.shape != (b, c) or w0.shape != (r, c) or b0.shape != (r,) \
            or w2.shape != (1, r) or b2.numel() != 1:
        raise ValueError(f"residual_router: shapes h {tuple(h.shape)}, y {tuple(y.shape)}, gate {tuple(gate.shape)}, "
                         f"w0 {tuple(w0.shape)}, b0 {tuple(b0.shape)}, w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)}")
    if any(t.dtype != h.dtype for t in (gate, y, w0, b0, w2, b2)):
        raise TypeError("residual_router: every tensor must have h's dtype")
    y, w0, b0, w2, b2 = (t.contiguous() for t in (y, w0, b0, w2, b2))
    if gate.stride(1) != 1:
        gate = gate.contiguous()
    keep = torch.empty(b, n, dtype=h.dtype, device=h.device)
    def grid(meta):
        return (triton.cdiv(b * n, meta["BM"]),)

    fixed = {} if h.is_cuda else {"BM": 32, "BK": 64}
    _kernel(h.is_cuda)[grid](h, gate, y, w0, b0, w2, b2, keep, b * n, n, gate.stride(0), C=c, R=r,
                             BR=max(16, triton.next_power_of_2(r)), **fixed)
    return keep
