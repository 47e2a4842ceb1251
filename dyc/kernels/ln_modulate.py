"""LayerNorm (no affine, fp32 statistics) + adaLN modulate in one Triton kernel, for CUDA tensors.

``ln_modulate(x, shift, scale)`` = ``layer_norm(x) * (1 + scale[:, None]) + shift[:, None]``, the
statistics and the arithmetic in fp32, the result in x's dtype. One program normalises a few whole
rows held in registers: x is read once and written once.

``add_ln_modulate(h, y, gate, keep, shift, scale)`` first applies a block's gated residual,
``h += gate[:, None] * y (* keep[..., None])``, in place, then normalises the updated rows: one
kernel where the unfused form launches two and reads h twice. A DiT block ends with such an add
and the next block (or the final layer) starts with such a LayerNorm, so the torch backend defers
every residual add into the LayerNorm that follows it. Inductor's fusion of the same expression
splits the 1152-wide row into a looped reduction that reads it twice and ran at about a third of
the H100's memory rate (bench/RESULTS.md). ``keep`` may also be the SDT token router's hidden
layer (``RouterHidden``): the kernel then finishes the router for each row it updates (the torch
backend's ``dense-fold`` MLP form), one kernel less per layer than a router kernel of its own.
Needs Triton (it comes with CUDA builds of PyTorch); ``available()`` says whether it can run on a
GPU here. Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU tensors, untuned.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["RouterHidden", "add_ln_modulate", "available", "ln_modulate", "router_keep_from_hidden"]


@dataclass(frozen=True)
class RouterHidden:
    """The SDT token router's hidden layer ``relu``'s input, ``h · w0ᵀ + b0`` [B, N, R] in h's dtype
    (one cuBLAS GEMM with its bias epilogue), with the second layer ``w2`` [1, R], ``b2`` [1]:
    ``add_ln_modulate`` finishes the router (ReLU, second layer, gate) on the rows it updates,
    instead of a router kernel of its own."""

    hidden: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor


def router_keep_from_hidden(r: RouterHidden) -> torch.Tensor:
    """The 0/1 keep [B, N] the kernel computes from ``r``, in PyTorch (the eager router's last steps)."""
    logit = torch.nn.functional.linear(torch.relu(r.hidden), r.w2, r.b2).squeeze(-1)
    return (torch.sigmoid(logit) > 0.5).to(r.hidden.dtype)


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
def _kernel(autotune: bool = True):
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

    # Triton's CPU interpreter (the tests' way to run these on a machine without a GPU) cannot time trials
    return ln_modulate_kernel if autotune else ln_modulate_kernel.fn


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

    fixed = {} if x.is_cuda else {"ROWS": 2}
    _kernel(x.is_cuda)[grid](x, shift, scale, out, b * n, n, c, shift.stride(0), eps, BLOCK_C=block_c, **fixed)
    return out


@functools.cache
def _add_kernel(autotune: bool = True):
    import triton
    import triton.language as tl

    configs = [triton.Config({"ROWS": r}, num_warps=w) for r, w in ((1, 4), (1, 8), (2, 4), (2, 8), (4, 8), (4, 16))]

    # h is updated in place: the autotuner's trial runs must each start from the same h
    @triton.autotune(configs=configs, key=["rows", "C", "HAS_KEEP", "R"], restore_value=["h_ptr"])
    @triton.jit
    def add_ln_modulate_kernel(h_ptr, y_ptr, gate_ptr, keep_ptr, shift_ptr, scale_ptr, out_ptr, w2_ptr, b2_ptr,
                               rows, tokens, C, R, mod_stride, gate_stride, y_stride, eps, HAS_KEEP: tl.constexpr,
                               BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, ROWS: tl.constexpr):
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, BLOCK_C)
        rmask = r < rows
        m = rmask[:, None] & (c < C)[None, :]
        offs = r[:, None].to(tl.int64) * C + c[None, :]
        img = (r // tokens)[:, None].to(tl.int64)
        h = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + r[:, None].to(tl.int64) * y_stride + c[None, :], mask=m, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + img * gate_stride + c[None, :], mask=m, other=0.0).to(tl.float32)
        upd = g * y
        if HAS_KEEP:
            if BLOCK_R > 0:  # keep_ptr holds the token router's hidden layer [rows, R]: finish the router here
                j = tl.arange(0, BLOCK_R)
                jm = j < R
                z = tl.load(keep_ptr + r[:, None].to(tl.int64) * R + j[None, :], mask=rmask[:, None] & jm[None, :],
                            other=0.0).to(tl.float32)
                w2 = tl.load(w2_ptr + j, mask=jm, other=0.0).to(tl.float32)
                logit = tl.sum(tl.maximum(z, 0.0) * w2[None, :], axis=1) + tl.load(b2_ptr).to(tl.float32)
                dt = h_ptr.dtype.element_ty  # rounded as the unfused path in h's dtype (token_router's _gate)
                sg = (1.0 / (1.0 + tl.exp(-logit.to(dt).to(tl.float32)))).to(dt).to(tl.float32)
                upd = upd * tl.where(sg > 0.5, 1.0, 0.0)[:, None]
            else:
                upd = upd * tl.load(keep_ptr + r, mask=rmask, other=0.0).to(tl.float32)[:, None]
        hn = (h + upd).to(h_ptr.dtype.element_ty)  # the residual stream is stored in its dtype
        tl.store(h_ptr + offs, hn, mask=m)
        x = tl.where(m, hn.to(tl.float32), 0.0)
        mean = tl.sum(x, axis=1) / C
        d = tl.where(m, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
        mo = img * mod_stride + c[None, :]
        sc = tl.load(scale_ptr + mo, mask=m, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + mo, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (d * rstd[:, None] * (1.0 + sc) + sh).to(out_ptr.dtype.element_ty), mask=m)

    return add_ln_modulate_kernel if autotune else add_ln_modulate_kernel.fn


def add_ln_modulate(h: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, keep: torch.Tensor | RouterHidden | None,
                    shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``h += gate * y (* keep)`` in place, then ``ln_modulate(h, shift, scale)``; returns (h, normalised).

    h [B, N, C] contiguous; y [B, N, C] (rows may be strided, e.g. a GEMM's output view); gate,
    shift, scale [B, C] (rows may be strided views); keep [B, N] 0/1, a ``RouterHidden`` (the
    kernel then computes the 0/1 keep from it) or None.
    """
    import triton

    b, n, c = h.shape
    if not h.is_contiguous():
        raise ValueError("add_ln_modulate: h must be contiguous (it is updated in place)")
    if y.shape != h.shape or y.stride(2) != 1 or y.stride(0) != n * y.stride(1):
        y = y.contiguous()
    for name, t in (("gate", gate), ("shift", shift), ("scale", scale)):
        if t.shape != (b, c):
            raise ValueError(f"add_ln_modulate: {name} must be {(b, c)}, got {tuple(t.shape)}")
    if gate.stride(1) != 1:
        gate = gate.contiguous()
    if shift.stride(1) != 1 or scale.stride(1) != 1 or shift.stride(0) != scale.stride(0):
        shift, scale = shift.contiguous(), scale.contiguous()
    w2 = b2 = h
    r = 0
    if isinstance(keep, RouterHidden):
        r = keep.hidden.shape[-1]
        if keep.hidden.shape != (b, n, r) or keep.w2.shape != (1, r) or keep.b2.numel() != 1:
            raise ValueError(f"add_ln_modulate: router hidden {tuple(keep.hidden.shape)}, w2 {tuple(keep.w2.shape)}, "
                             f"b2 {tuple(keep.b2.shape)} for h {tuple(h.shape)}")
        if any(t.dtype != h.dtype for t in (keep.hidden, keep.w2, keep.b2)):
            raise TypeError("add_ln_modulate: the router's tensors must have h's dtype")
        w2, b2 = keep.w2.contiguous(), keep.b2.contiguous()
        keep = keep.hidden.contiguous()
    elif keep is not None:
        if keep.shape != (b, n):
            raise ValueError(f"add_ln_modulate: keep must be {(b, n)}, got {tuple(keep.shape)}")
        keep = keep.contiguous()
    out = torch.empty_like(h)

    def grid(meta):
        return (triton.cdiv(b * n, meta["ROWS"]),)

    fixed = {} if h.is_cuda else {"ROWS": 2}
    _add_kernel(h.is_cuda)[grid](h, y, gate, keep if keep is not None else h, shift, scale, out, w2, b2, b * n, n, c,
                                 r, shift.stride(0), gate.stride(0), y.stride(1), eps, HAS_KEEP=keep is not None,
                                 BLOCK_C=triton.next_power_of_2(c), BLOCK_R=triton.next_power_of_2(r) if r else 0,
                                 **fixed)
    return h, out
