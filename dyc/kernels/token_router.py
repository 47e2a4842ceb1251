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

__all__ = ["available", "residual_router", "router_keep"]


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
    from . import _token_router_triton as k

    return k.kernels(autotune)


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
    _kernel(h.is_cuda)[0][grid](h, gate, y, w0, b0, w2, b2, keep, b * n, n, gate.stride(0), C=c, R=r,
                             BR=max(16, triton.next_power_of_2(r)), **fixed)
    return keep


def router_keep(h: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
                ) -> torch.Tensor:
    """The token router alone on h [B, N, C] (fp16/bf16): keep [B, N] (0/1, h's dtype), the same
    gate as ``residual_router`` (one skinny GEMM with the rest in its epilogue)."""
    import triton

    b, n, c = h.shape
    r = w0.shape[0]
    if h.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"router_keep: fp16/bf16 only, got {h.dtype}")
    if w0.shape != (r, c) or b0.shape != (r,) or w2.shape != (1, r) or b2.numel() != 1:
        raise ValueError(f"router_keep: shapes h {tuple(h.shape)}, w0 {tuple(w0.shape)}, b0 {tuple(b0.shape)}, "
                         f"w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)}")
    if any(t.dtype != h.dtype for t in (w0, b0, w2, b2)):
        raise TypeError("router_keep: every tensor must have h's dtype")
    h, w0, b0, w2, b2 = (t.contiguous() for t in (h, w0, b0, w2, b2))
    keep = torch.empty(b, n, dtype=h.dtype, device=h.device)

    def grid(meta):
        return (triton.cdiv(b * n, meta["BM"]),)

    fixed = {} if h.is_cuda else {"BM": 32, "BK": 64}
    _kernel(h.is_cuda)[1][grid](h, w0, b0, w2, b2, keep, b * n, C=c, R=r, BR=max(16, triton.next_power_of_2(r)),
                                **fixed)
    return keep
