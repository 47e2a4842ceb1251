"""The SDT token router's forms at DiT-XL size (GPU), timed inside CUDA graphs: which to run at which row count.

  python bench/bench_router_forms.py [--rows 512 2048 8192] [--json OUT]

Forms, each on the same h [rows/256, 256, 1152] bf16 (C -> 72 -> 1):
  triton        ``router_keep``: one Triton kernel (the GEMM, with ReLU / second layer / gate in its
                epilogue), autotuned as the backend runs it;
  triton BMxBK  the same kernel at one fixed config (what the autotuner could pick);
  cublas        cuBLAS GEMM (bias epilogue) + a Triton tail kernel (ReLU, second layer, gate), defined here:
                an experiment, not in the package (it lost at 8192 rows, won ~1 µs at 2048);
  gate_res      inductor's gated residual, the op before the router in the ``sdt`` form (for scale).
Each time is a CUDA graph of 20 calls replayed (GraphRunner's replay timer: median of 7), per call.
Timing Triton launches outside a graph would time Python (~100 µs per call), not the kernels.
Every form's keep is checked against the autotuned kernel's (tokens whose float64 logit is within
0.05 of the threshold may differ: different summation orders).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dyc.backends.torch_sliced import GraphRunner, _fused, gate_residual  # noqa: E402
from dyc.kernels import _token_router_triton as TT  # noqa: E402
from dyc.kernels import token_router as TR  # noqa: E402

CALLS = 20


@functools.cache
def _tail_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def router_tail_kernel(z_ptr, w2_ptr, b2_ptr, keep_ptr, rows, R: tl.constexpr, BM: tl.constexpr,
                           BR: tl.constexpr):
        """The router's last steps on its hidden layer [rows, R] (bias included), rounded as _gate."""
        r = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = r < rows
        j = tl.arange(0, BR)
        jm = j < R
        dt = z_ptr.dtype.element_ty
        z = tl.load(z_ptr + r[:, None].to(tl.int64) * R + j[None, :], mask=rmask[:, None] & jm[None, :], other=0.0)
        w2 = tl.load(w2_ptr + j, mask=jm, other=0.0).to(tl.float32)
        logit = tl.sum(tl.maximum(z.to(tl.float32), 0.0) * w2[None, :], axis=1) + tl.load(b2_ptr).to(tl.float32)
        sg = (1.0 / (1.0 + tl.exp(-logit.to(dt).to(tl.float32)))).to(dt).to(tl.float32)
        tl.store(keep_ptr + r, tl.where(sg > 0.5, 1.0, 0.0).to(keep_ptr.dtype.element_ty), mask=rmask)

    return router_tail_kernel


def router_keep_cublas(h, w0, b0, w2, b2, out):
    """The router as a cuBLAS GEMM (hidden layer rounded to h's dtype, as the unfused path) + the tail kernel."""
    import triton

    hidden = F.linear(h, w0, b0)
    rows, r = h.shape[0] * h.shape[1], w0.shape[0]
    _tail_kernel()[(triton.cdiv(rows, 64),)](hidden, w2, b2, out, rows, R=r, BM=64,
                                             BR=max(16, triton.next_power_of_2(r)))
    return out
SWEEP = [(bm, bk, w, st) for bm in (16, 32, 64, 128) for bk in (64, 128) for w in (4, 8) for st in (3, 5)]


def graph_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn()
    return GraphRunner._replay_ms(g) * 1e3 / CALLS


def measure(rows: int, w0, b0, w2, b2, gate_res) -> dict:
    """Every form at ``rows`` rows (256 tokens per image)."""
    import triton

    r, c = w0.shape
    n, dt, dev = 256, w0.dtype, w0.device
    g = torch.Generator(device=dev).manual_seed(rows)
    b = rows // n
    h = torch.randn(b, n, c, device=dev, generator=g).to(dt)
    y = torch.randn(b, n, c, device=dev, generator=g).to(dt)
    gate = torch.randn(b, c, device=dev, generator=g).to(dt)
    keep = torch.empty(b, n, device=dev, dtype=dt)
    want = TR.router_keep(h, w0, b0, w2, b2)
    logit = F.linear(F.relu(F.linear(h.double(), w0.double(), b0.double())), w2.double(), b2.double()).squeeze(-1)
    sure = logit.abs() > 0.05
    res: dict[str, float | None] = {}
    agree: dict[str, bool] = {}

    def record(name, fn, checks_keep=True):
        res[name] = round(graph_us(fn), 2)
        if checks_keep:
            agree[name] = bool(torch.equal((keep > 0.5)[sure], (want > 0.5)[sure]))

    record("triton", lambda: TR.router_keep(h, w0, b0, w2, b2, out=keep))
    record("cublas", lambda: router_keep_cublas(h, w0, b0, w2, b2, keep))
    record("gate_res", lambda: gate_res(h, gate, y), checks_keep=False)
    br = max(16, triton.next_power_of_2(r))
    for bm, bk, w, st in SWEEP:
        def call(bm=bm, bk=bk, w=w, st=st):
            TT.router_keep_kernel[(triton.cdiv(rows, bm),)](h, w0, b0, w2, b2, keep, rows, C=c, R=r, BM=bm, BK=bk,
                                                            BR=br, num_warps=w, num_stages=st)
        name = f"triton {bm}x{bk} w{w} s{st}"
        try:
            record(name, call)
        except Exception as e:  # a config that does not fit (shared memory): say so, go on
            res[name] = None
            print(f"  {rows} rows: {name}: {type(e).__name__}", file=sys.stderr)
    sweep = sorted((v, k) for k, v in res.items() if k.startswith("triton ") and v is not None)
    print(f"rows {rows:5d}: triton (autotuned) {res['triton']:6.2f}  cublas+tail {res['cublas']:6.2f}  "
          f"best fixed {sweep[0][1]} {sweep[0][0]:6.2f}  gate_res {res['gate_res']:6.2f}  "
          f"keep agrees: {all(agree.values())}")
    return {"us": res, "keep_agrees": agree, "best_fixed": sweep[:5]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--json")
    a = ap.parse_args()
    dt, dev, c, r = torch.bfloat16, "cuda", 1152, 72
    g = torch.Generator(device=dev).manual_seed(0)
    w0 = (torch.randn(r, c, device=dev, generator=g) / c**0.5).to(dt)
    b0 = (torch.randn(r, device=dev, generator=g) * 0.1).to(dt)
    w2 = torch.randn(1, r, device=dev, generator=g).to(dt)
    b2 = (torch.randn(1, device=dev, generator=g) * 0.1).to(dt)
    gate_res = _fused(gate_residual)
    out = {"device": torch.cuda.get_device_name(), "C": c, "R": r, "calls_per_graph": CALLS, "rows": {}}
    print(f"# {out['device']}  bf16  C {c} -> R {r}; µs per call inside CUDA graphs")
    for rows in a.rows:
        out["rows"][rows] = measure(rows, w0, b0, w2, b2, gate_res)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
