"""DyDiT's SDT token router in one Triton kernel, for CUDA tensors.

``router_keep(h, w0, b0, w2, b2)`` = ``sigmoid(w2 · relu(w0 · h + b0) + b2) > 0.5`` per token, as
0/1 in h's dtype, shape [B, N]: the C -> C/16 GEMM on tensor cores with the ReLU, the C/16 -> 1
layer and the gate in its epilogue, so the [rows, C/16] hidden layer never leaves registers.
Unfused this is two cuBLAS GEMMs and four elementwise kernels per layer (27.8 µs with the gated
residual before it vs 21.8 µs, DiT-XL at 32 x 256 tokens, H200; bench/bench_router_ln.py).
Rounding follows the unfused bf16/fp16 path where it decides: the hidden layer is rounded to h's
dtype before the ReLU, and the logit and its sigmoid are rounded before the > 0.5 test.

Needs Triton on CUDA (``available()``); with ``TRITON_INTERPRET=1`` it also runs on CPU tensors
(how the CPU tests check it).
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["available", "router_keep"]


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

    return k.kernel(autotune)


def checked_keep_out(h: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                     out: torch.Tensor | None) -> torch.Tensor:
    """Checks a router call's operands (clear errors) and returns the keep tensor to write: ``out``, or new."""
    b, n, c = h.shape
    r = w0.shape[0]
    if h.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"router_keep: fp16/bf16 only, got {h.dtype}")
    if w0.shape != (r, c) or b0.shape != (r,) or w2.shape != (1, r) or b2.numel() != 1:
        raise ValueError(f"router_keep: shapes h {tuple(h.shape)}, w0 {tuple(w0.shape)}, b0 {tuple(b0.shape)}, "
                         f"w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)}")
    if any(t.dtype != h.dtype for t in (w0, b0, w2, b2)):
        raise TypeError("router_keep: every tensor must have h's dtype")
    if out is None:
        return torch.empty(b, n, dtype=h.dtype, device=h.device)
    if out.shape != (b, n) or out.dtype != h.dtype or out.device != h.device or not out.is_contiguous():
        raise ValueError(f"router_keep: out must be a contiguous {(b, n)} tensor of {h.dtype} on {h.device}")
    return out


def router_keep(h: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """h [B, N, C] (fp16/bf16); w0 [R, C]; b0 [R]; w2 [1, R]; b2 [1]. Returns keep [B, N] (0/1, h's dtype),
    written into ``out`` where given (a contiguous [B, N] tensor of h's dtype)."""
    import triton

    b, n, c = h.shape
    r = w0.shape[0]
    keep = checked_keep_out(h, w0, b0, w2, b2, out)
    h, w0, b0, w2, b2 = (t.contiguous() for t in (h, w0, b0, w2, b2))

    def grid(meta):
        return (triton.cdiv(b * n, meta["BM"]),)

    fixed = {} if h.is_cuda else {"BM": 32, "BK": 64}
    _kernel(h.is_cuda)[grid](h, w0, b0, w2, b2, keep, b * n, C=c, R=r, BR=max(16, triton.next_power_of_2(r)),
                             **fixed)
    return keep
