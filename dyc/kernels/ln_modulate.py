"""LayerNorm (no affine, fp32 statistics) + adaLN modulate in one Triton kernel, for CUDA tensors.

``ln_modulate(x, shift, scale)`` = ``layer_norm(x) * (1 + scale[:, None]) + shift[:, None]``, the
statistics and the arithmetic in fp32, the result in x's dtype. One program normalises a few whole
rows held in registers: x is read once and written once. Inductor's fusion of the same expression
splits the 1152-wide row into a looped reduction that reads it twice and ran at about a third of
the H100's memory rate (bench/RESULTS.md). Needs Triton (it comes with CUDA builds of PyTorch);
``available()`` says whether it can run here.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["available", "ln_modulate"]


@functools.cache
def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    # rows per program / warps, picked per shape at the first call (a 1152-wide row pads to 2048 lanes)
    configs = [triton.Config({"ROWS": r}, num_warps=w) for r, w in ((1, 4), (1, 8), (2, 4), (2, 8), (4, 8), (4, 16))]

    @triton.autotune(configs=configs, key=["rows", "C"])
    @triton.jit
    def ln_modulate_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, rows, tokens, C, mod_stride, eps,
                           BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, BLOCK_C)
        m = (r < rows)[:, None] & (c < C)[None, :]
        offs = r[:, None].to(tl.int64) * C + c[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / C
        d = tl.where(m, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
        mo = (r // tokens)[:, None].to(tl.int64) * mod_stride + c[None, :]  # the row's image
        sc = tl.load(scale_ptr + mo, mask=m, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + mo, mask=m, other=0.0).to(tl.float32)
        y = d * rstd[:, None] * (1.0 + sc) + sh
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)

    return ln_modulate_kernel


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x [B, N, C]; shift, scale [B, C] (rows may be strided views). Returns a new [B, N, C] tensor."""
    import triton

    b, n, c = x.shape
    if shift.shape != (b, c) or scale.shape != (b, c):
        raise ValueError(f"ln_modulate: shift/scale must be {(b, c)}, got {tuple(shift.shape)}/{tuple(scale.shape)}")
    x = x.contiguous()
    if shift.stride(1) != 1 or scale.stride(1) != 1 or shift.stride(0) != scale.stride(0):
        shift, scale = shift.contiguous(), scale.contiguous()
    out = torch.empty_like(x)
    block_c = triton.next_power_of_2(c)

    def grid(meta):
        return (triton.cdiv(b * n, meta["ROWS"]),)

    _kernel()[grid](x, shift, scale, out, b * n, n, c, shift.stride(0), eps, BLOCK_C=block_c)
    return out
