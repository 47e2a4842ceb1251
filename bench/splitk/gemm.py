"""Split-K GEMMs for few rows (Triton), timed against cuBLAS: an experiment of issue 14, kept with
its benchmark (bench_gemm.py) because its answer was no.

The question: at batch 1-4 a DiT block's GEMMs have 512-2048 rows; does cutting K into slices run
by separate CTAs make them (and a DyDiT engine's narrower ones) faster than cuBLAS? Measured on an
H200 inside CUDA graphs (bench/RESULTS.md, "Split-K GEMMs"): no. cuBLAS took 4.7-12.6 µs per GEMM at
512 rows; the fastest split-K candidate won 1 of 36 shapes (by 2 %), and the split candidates never
beat the unsplit ones. The torch backend therefore stays on cuBLAS.

``linear`` times cuBLAS and a few tile/slice configurations the first time it sees a shape
(outside CUDA graph capture) and keeps the fastest. The slices' fp32 partial tiles go to a
workspace; the CTA that finishes a tile's last slice (a per-tile counter, which it resets) adds
them in slice order, so results do not depend on scheduling. ``router_keep`` is DyDiT's SDT token
router (dyc.kernels.token_router's maths) on the same kernel. Checked on the H200 against float64
references for every candidate (tests removed with the integration; bench_gemm.py checks every
result against cuBLAS before timing it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dyc.kernels.token_router import available, checked_keep_out  # available: CUDA with Triton, or its interpreter

__all__ = ["Config", "available", "choices", "linear", "router_keep"]

_EPI = {"bias": 0, "gelu": 1, "router": 2}
_MAX_TILES = 4096  # counters per lane; a split GEMM with more output tiles than this is not split
_BK = 64
_MAX_ROWS = 4096  # above this many rows cuBLAS's tiles fill the GPU: no candidates are timed


@dataclass(frozen=True)
class Config:
    """One Triton launch: output tile BM x BN, K cut into ``splits`` slices (1: no workspace)."""

    bm: int
    bn: int
    splits: int
    warps: int = 4
    stages: int = 4


_counters: dict[tuple, torch.Tensor] = {}
_choices: dict[tuple, Config | None] = {}  # None: cuBLAS


def choices() -> dict[tuple, Config | None]:
    """The configuration picked for each shape seen so far (key: lane, dtype, M, N, K, ...; None = cuBLAS)."""
    return dict(_choices)


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


def _time_ms(fn, calls: int = 10, reps: int = 5) -> float:
    """GPU milliseconds of one ``fn()``: ``calls`` of it captured in a CUDA graph, replayed ``reps``
    times (median). A graph, because the backend replays these GEMMs from graphs, and timed launches
    would measure Python: a Triton launch costs more host time than a small GEMM takes on the GPU."""
    fn()  # compiles, allocates the lane's counters: neither may happen inside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return sorted(times)[reps // 2]


def _pick(key: tuple, x: torch.Tensor, run_cublas, run_triton, cands: list[Config],
          allow_cublas: bool) -> Config | None:
    """Time every candidate on these operands (not while capturing a CUDA graph) and keep the fastest."""
    if key in _choices:
        return _choices[key]
    if x.device.type != "cuda":
        return cands[0] if cands else None
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"dyc.kernels.gemm: shape {key} first seen inside CUDA graph capture; "
                           "run it once before capturing")
    torch.cuda.synchronize(x.device)
    timed: list[tuple[float, Config | None]] = []
    if allow_cublas:
        timed.append((_time_ms(run_cublas), None))
    for cfg in cands:
        timed.append((_time_ms(lambda cfg=cfg: run_triton(cfg)), cfg))
    best = min(timed, key=lambda tc: tc[0])[1]
    _choices[key] = best
    return best


def _mode() -> str:
    mode = os.environ.get("DYC_SPLITK_GEMM", "auto")
    if mode not in ("auto", "cublas", "triton"):
        raise ValueError(f"$DYC_SPLITK_GEMM must be auto, cublas or triton, got {mode!r}")
    return mode


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *, gelu: bool = False,
           config: Config | None = None) -> torch.Tensor:
    """``x · wᵀ + b`` (then GELU, tanh form, where ``gelu``) over x's last dim, fp16/bf16.

    w [N, K] may be a row-strided view (a column slice of a wider weight); x's rows may be strided.
    ``config`` forces one Triton launch (tests); otherwise the shape's fastest of cuBLAS and the
    split-K candidates, timed at its first call.
    """
    lead, kdim = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, kdim)
    n = w.shape[0]
    if w.shape[1] != kdim or (b is not None and b.shape != (n,)):
        raise ValueError(f"gemm.linear: x [..., {kdim}], w {tuple(w.shape)}, b {None if b is None else tuple(b.shape)}")

    def run_cublas() -> torch.Tensor:
        if gelu:
            if x2.is_cuda and b is not None:  # one cuBLASLt GEMM with GELU (tanh) in its epilogue
                return torch._addmm_activation(b, x2, w.t(), use_gelu=True)
            return F.gelu(F.linear(x2, w, b), approximate="tanh")
        return F.linear(x2, w, b)

    mode = _mode() if config is None else "triton"
    usable = (x.dtype in (torch.float16, torch.bfloat16) and w.dtype == x.dtype and available(x.device)
              and x2.stride(1) == 1 and w.stride(1) == 1 and (b is None or b.is_contiguous()))
    if config is not None and not usable:
        raise ValueError("gemm.linear: a Triton config needs fp16/bf16 operands of one dtype with unit inner "
                         "strides, on CUDA (or the CPU under TRITON_INTERPRET=1)")
    m = x2.shape[0]
    if mode == "cublas" or not usable or (config is None and mode == "auto" and m > _MAX_ROWS):
        return run_cublas().view(*lead, n)
    epi = "gelu" if gelu else "bias"

    def run_triton(cfg: Config) -> torch.Tensor:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        _launch(x2, w, b, y, cfg, epi)
        return y

    if config is None:
        key = ("linear", x.device, x.dtype, m, n, kdim, x2.stride(0), w.stride(0), b is not None, gelu)
        config = _pick(key, x, run_cublas, run_triton, candidates(m, n, kdim, epi, _sms(x.device)),
                       allow_cublas=mode == "auto")
    out = run_cublas() if config is None else run_triton(config)
    return out.view(*lead, n)


def router_keep(h: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                out: torch.Tensor | None = None, *, config: Config | None = None) -> torch.Tensor:
    """dyc.kernels.token_router.router_keep with its GEMM split over K: h [B, N, C] (fp16/bf16);
    w0 [R, C]; b0 [R]; w2 [1, R]; b2 [1]. Returns keep [B, N] (0/1, h's dtype), into ``out`` where given."""
    c = h.shape[-1]
    r = w0.shape[0]
    keep = checked_keep_out(h, w0, b0, w2, b2, out)
    h2 = h.reshape(-1, c)
    if h2.stride(1) != 1:
        h2 = h2.contiguous()
    w0, b0, w2, b2 = (t.contiguous() for t in (w0, b0, w2, b2))
    m = h2.shape[0]

    def run(cfg: Config) -> torch.Tensor:
        _launch(h2, w0, b0, keep.view(-1), cfg, "router", w2, b2)
        return keep

    if config is None:
        key = ("router", h.device, h.dtype, m, r, c, h2.stride(0))
        config = _pick(key, h, None, run, candidates(m, r, c, "router", _sms(h.device)), allow_cublas=False)
    run(config)
    return keep
