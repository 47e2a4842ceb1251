"""SdtMlp speed: official masked MLP vs PyTorch gather + cuBLAS vs the dyc kernel, side by side.

  python bench/bench_sdt_mlp.py [--batch 32 --tokens 256 --channels 1152 --groups 16 --group-size 288]
                                [--dtype bf16] [--rates 0.25,0.5,0.75,1.0] [--iters 200] [--json out.json]

(a) official: LayerNorm + modulate + fc1 + GELU + fc2 on every token, then gate and token mask
    (the DyDiT code's way; no channel mask here, all 16 groups active, which only favours it);
(b) torch gather: nonzero over the mask, index_select, the same maths on the kept tokens with
    cuBLAS GEMMs, index_add back into a copy of x;
(c) dyc: the fused kernels through the C ABI (dyc.kernels.sdt_mlp), eager and in a CUDA graph.
Each is timed with CUDA events per call, after warm-up; the table shows medians.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dyc.kernels import sdt_mlp as K  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def official(x, shift, scale, gate, keep, w1, b1, w2, b2):
    h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    y = gate.unsqueeze(1) * F.linear(F.gelu(F.linear(h, w1, b1), approximate="tanh"), w2, b2)
    return x + y * keep.unsqueeze(-1)


def torch_gather(x, shift, scale, gate, keep, w1, b1, w2, b2):
    b, n, c = x.shape
    idx = keep.reshape(-1).nonzero().squeeze(1)  # host sync, as any eager gather needs
    bi = idx // n
    xs = x.reshape(-1, c).index_select(0, idx)
    h = F.layer_norm(xs, (c,), eps=1e-6) * (1 + scale.index_select(0, bi)) + shift.index_select(0, bi)
    o = F.linear(F.gelu(F.linear(h, w1, b1), approximate="tanh"), w2, b2) * gate.index_select(0, bi)
    return x.reshape(-1, c).index_add(0, idx, o).view(b, n, c)


def time_fn(fn, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends, strict=True)]  # microseconds


def make(b, n, c, hs, dtype, rate, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, std=1.0: (torch.randn(*s, generator=g, device="cuda") * std).to(dtype)  # noqa: E731
    x = r(b, n, c)
    shift, scale, gate = r(b, c, std=0.5), r(b, c, std=0.5), r(b, c, std=0.5)
    w1, b1, w2, b2 = r(hs, c, std=c**-0.5), r(hs, std=0.1), r(c, hs, std=hs**-0.5), r(c, std=0.1)
    # exactly round(rate·N) kept tokens in every image
    k = round(rate * n)
    order = torch.rand(b, n, generator=g, device="cuda").argsort(dim=1)
    keep = torch.zeros(b, n, device="cuda")
    keep.scatter_(1, order[:, :k], 1.0)
    return x, shift, scale, gate, keep.to(dtype), w1, b1, w2, b2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--channels", type=int, default=1152)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=288)
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--rates", default="0.25,0.5,0.75,1.0")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--variants", default="default",
                    help="comma list of dyc runs: default (no channel_mask), masked (an all-ones channel_mask "
                         "per image: the group-batched GEMM1), shared (one all-ones [1, G] mask for every image: "
                         "the plain GEMM1 with a column mask, as the torch backend runs it)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_sdt_mlp: needs a CUDA GPU")
    dtype = DTYPES[a.dtype]
    b, n, c, gs = a.batch, a.tokens, a.channels, a.group_size
    hs = a.groups * gs
    card = torch.cuda.get_device_name()
    path = K.select_path(dtype, c, hs, gs, torch.cuda.current_device())
    print(f"# {card}; torch {torch.__version__}; {K.version()}; path {path}")
    print(f"# B={b} N={n} C={c} hidden={hs} ({a.groups}x{gs}) {a.dtype}; median of {a.iters} after {a.warmup}")
    variants = [v for v in a.variants.split(",") if v] or ["default"]
    rows = []
    hdr = (f"{'kept':>5} | {'(a) official us':>15} | {'(b) gather us':>13} | {'kernel':>8} | {'(c) dyc us':>10} | "
           f"{'dyc graph us':>12} | {'a/c':>5} | {'b/c':>5} | {'max|c-a|':>8}")
    print(hdr)
    print("-" * len(hdr))
    for rate in [float(v) for v in a.rates.split(",")]:
        ts = make(b, n, c, hs, dtype, rate)
        out = torch.empty_like(ts[0])
        ya = official(*ts)
        ma = statistics.median(time_fn(functools.partial(official, *ts), a.iters, a.warmup))
        mb = statistics.median(time_fn(functools.partial(torch_gather, *ts), a.iters, a.warmup))
        ones = torch.ones(b, a.groups, device="cuda", dtype=dtype)
        for v in variants:
            cm = ones if v == "masked" else (ones[:1] if v == "shared" else None)
            dyc = functools.partial(K.sdt_mlp, *ts, channel_mask=cm, group_size=gs, out=out)
            err = (ya.float() - dyc().float()).abs().max().item()
            mc = statistics.median(time_fn(dyc, a.iters, a.warmup))
            graph = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                dyc()
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(graph):
                dyc()
            mg = statistics.median(time_fn(graph.replay, a.iters, a.warmup))
            name = v
            rows.append(dict(kept=rate, kernel=name, official_us=ma, torch_gather_us=mb, dyc_us=mc, dyc_graph_us=mg,
                             speedup_vs_official=ma / mc, speedup_vs_gather=mb / mc, max_abs_diff_vs_official=err))
            print(f"{rate:>5.2f} | {ma:>15.1f} | {mb:>13.1f} | {name:>8} | {mc:>10.1f} | {mg:>12.1f} | "
                  f"{ma / mc:>5.2f} | {mb / mc:>5.2f} | {err:>8.2g}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(dict(card=card, torch=torch.__version__, library=K.version(), path=path,
                                          batch=b, tokens=n, channels=c, hidden=hs, group_size=gs, dtype=a.dtype,
                                          iters=a.iters, warmup=a.warmup, command=" ".join(sys.argv), rows=rows),
                                     indent=2))


if __name__ == "__main__":
    main()
