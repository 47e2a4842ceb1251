"""Split-K GEMMs for few rows (Triton), timed against cuBLAS: an experiment of issue 14, kept with
its benchmark (bench_gemm.py) because its answer was no.

The question: at batch 1-4 a DiT block's GEMMs have 512-2048 rows; does cutting K into slices run
by separate CTAs make them (and a DyDiT engine's narrower ones) faster than cuBLAS? Measured on an
H200 inside CUDA graphs (bench/RESULTS.md, "Split-K GEMMs"): no. cuBLAS took 4.7-12.6 µs per GEMM at
512 rows; the fastest split-K candidate won 1 of 36 shapes (by 2 %), and the split candidates never
beat the unsplit ones. The torch backend therefore stays on cuBLAS.

``linear`` / ``router_keep`` run one given configuration (``candidates`` lists those worth
timing; bench_gemm.py times each against cuBLAS). The slices' fp32 partial tiles go to a
workspace; the CTA that finishes a tile's last slice (a per-tile counter, which it resets) adds
them in slice order, so results do not depend on scheduling. ``router_keep`` is DyDiT's SDT token
router (dyc.kernels.token_router's maths) on the same kernel. Checked on the H200 against float64
for every candidate, in and out of CUDA graphs, while it was wired into the backend; bench_gemm.py
checks every result against cuBLAS before timing it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dyc.kernels.token_router import available, checked_keep_out  # available: CUDA with Triton, or its interpreter

__all__ = ["Config", "available", "candidates", "linear", "router_keep", "time_ms"]

_EPI = {"bias": 0, "gelu": 1, "router": 2}
_MAX_TILES = 4096  # counters per lane; a split GEMM with more output tiles than this is not split
_BK = 64


@dataclass(frozen=True)
class Config:
    """One Triton launch: output tile BM x BN, K cut into ``splits`` slices (1: no workspace)."""

    bm: int
    bn: int
    splits: int
    warps: int = 4
    stages: int = 4


_counters: dict[tuple, torch.Tensor] = {}


def _counter(device: torch.device, lane: str) -> torch.Tensor:
    key = (device, lane)
    if key not in _counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("dyc.kernels.gemm: first split-K call inside CUDA graph capture; "
                               "run the shape once before capturing")
        _counters[key] = torch.zeros(_MAX_TILES, dtype=torch.int32, device=device)
    return _counters[key]


def _launch(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor, cfg: Config, epi: str,
            w2: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> None:
    import _gemm_triton as k
    import triton

    m, kdim = x.shape
    n = w.shape[0]
    tiles = triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn)
    ksteps = triton.cdiv(kdim, _BK)
    per = triton.cdiv(ksteps, cfg.splits) * _BK
    splits = triton.cdiv(kdim, per)
    split = splits > 1
    if split and tiles > _MAX_TILES:
        raise ValueError(f"gemm: {tiles} output tiles is more than a split GEMM takes ({_MAX_TILES})")
    ws = torch.empty(splits * tiles * cfg.bm * cfg.bn if split else 1, dtype=torch.float32, device=x.device)
    cnt = _counter(x.device, "router" if epi == "router" else "linear")
    k.splitk_linear_kernel[(tiles, splits)](
        x, w, b if b is not None else x, y, ws, cnt, w2 if w2 is not None else x, b2 if b2 is not None else x,
        m, n, kdim, per, splits, x.stride(0), w.stride(0), y.stride(0) if epi != "router" else 1,
        EPI=_EPI[epi], HAS_BIAS=b is not None, SPLIT=split, BM=cfg.bm, BN=cfg.bn, BK=_BK,
        num_warps=cfg.warps, num_stages=cfg.stages)


def candidates(m: int, n: int, k: int, epi: str, sms: int) -> list[Config]:
    """Tile shapes and K slice counts worth timing for an [m, k] x [k, n] GEMM on ``sms`` SMs."""
    ksteps = -(-k // _BK)
    if epi == "router":
        bn = max(16, 1 << (n - 1).bit_length())
        tiles_opts = [(16, bn, 4, 3), (32, bn, 4, 3), (64, bn, 4, 3)]
    else:
        tiles_opts = [(64, 64, 4, 4), (64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 8, 3)]
    out: list[Config] = []
    for bm, bn, warps, stages in tiles_opts:
        tiles = -(-m // bm) * -(-n // bn)
        fill = [1] if tiles > _MAX_TILES else [1, round(sms / tiles), round(2 * sms / tiles)]
        for s in sorted({max(1, min(ksteps // 2 or 1, f)) for f in fill}):
            s = -(-ksteps // -(-ksteps // s))  # slices of equal whole K steps
            cfg = Config(bm, bn, s, warps, stages)
            if cfg not in out:
                out.append(cfg)
    return out


def time_ms(fn, calls: int = 10) -> float:
    """GPU milliseconds of one ``fn()``: ``calls`` of it captured in a CUDA graph, its replays timed as
    the torch backend times its forms (``GraphRunner._replay_ms``). A graph, because the backend
    replays GEMMs from graphs, and timed launches would measure Python: a Triton launch costs more
    host time than a small GEMM takes on the GPU."""
    from dyc.backends.torch_sliced import GraphRunner

    fn()  # compiles, allocates the lane's counters: neither may happen inside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return GraphRunner._replay_ms(graph) / calls


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, cfg: Config, *,
           gelu: bool = False) -> torch.Tensor:
    """``x · wᵀ + b`` (then GELU, tanh form, where ``gelu``) over x's last dim, fp16/bf16, as one launch
    of ``cfg``. w [N, K] may be a row-strided view (a column slice of a wider weight); x's rows may be
    strided."""
    lead, kdim = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, kdim)
    n = w.shape[0]
    if w.shape[1] != kdim or (b is not None and b.shape != (n,)):
        raise ValueError(f"gemm.linear: x [..., {kdim}], w {tuple(w.shape)}, b {None if b is None else tuple(b.shape)}")
    if not (x.dtype in (torch.float16, torch.bfloat16) and w.dtype == x.dtype and available(x.device)
            and x2.stride(1) == 1 and w.stride(1) == 1 and (b is None or b.is_contiguous())):
        raise ValueError("gemm.linear: needs fp16/bf16 operands of one dtype with unit inner strides, on CUDA "
                         "(or the CPU under TRITON_INTERPRET=1)")
    y = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    _launch(x2, w, b, y, cfg, "gelu" if gelu else "bias")
    return y.view(*lead, n)


def router_keep(h: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                cfg: Config, out: torch.Tensor | None = None) -> torch.Tensor:
    """dyc.kernels.token_router.router_keep with its GEMM split over K: h [B, N, C] (fp16/bf16);
    w0 [R, C]; b0 [R]; w2 [1, R]; b2 [1]. Returns keep [B, N] (0/1, h's dtype), into ``out`` where given."""
    c = h.shape[-1]
    keep = checked_keep_out(h, w0, b0, w2, b2, out)
    h2 = h.reshape(-1, c)
    if h2.stride(1) != 1:
        h2 = h2.contiguous()
    w0, b0, w2, b2 = (t.contiguous() for t in (w0, b0, w2, b2))
    _launch(h2, w0, b0, keep.view(-1), cfg, "router", w2, b2)
    return keep
