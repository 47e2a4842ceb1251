"""How fast can compiled DyDiT be against the static DiT, if only the width-dependent work costs time?

The speed-up a DyDiT engine can reach over the static DiT is bounded by the work that shrinks with the
architecture: the four GEMMs of every block (qkv, proj, fc1 + GELU, fc2) and attention. Everything
else (LayerNorms, residual adds, adaLN, the patch embedding, launch gaps) is the same in both, and a
cost F shared by both only pulls the ratio (S + F) / (D + F) towards 1. So S / D, measured with the
same kernels as the engines (cuBLAS, SDPA) and nothing else, is an upper bound of the ratio for any
engine built from these kernels whose static baseline gets the same treatment.

For every step of the sampler's schedule this script captures one CUDA graph per variant and
replays it (median of 7), on the widths the checkpoint's TDW routers pick at that t:
  static   full width, every token (the static DiT's GEMMs + attention)
  dense    the step's heads and channel groups, every token through the MLP
  sdt      the same, fc1/fc2 on ceil(keep_l x rows) rows (the calibrated SDT keep rate of layer l):
           SDT at cuBLAS speed, with gather/scatter for free
  best     per step the faster of dense and sdt
Weights are random, of the engines' shapes, one set per layer (a step reads each layer's weights once,
as the engines do), and narrower steps take prefixes of them, as the engines' shared weights do.

Usage: python bench/gemm_bound.py CKPT [--batch 1 4 16] [--steps 50] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dyc.backends.torch_sliced import GraphRunner  # noqa: E402
from dyc.checkpoint import load_checkpoint  # noqa: E402
from dyc.compiler.analyse import analyse  # noqa: E402
from dyc.timesteps import sampler_timesteps  # noqa: E402


class WidthWork:
    """The width-dependent work of one forward: per layer (heads, groups, MLP rows) -> a CUDA graph."""

    def __init__(self, cfg, images: int, dtype: torch.dtype, dev: torch.device):
        self.cfg = cfg
        c, h, dh, gs = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.group_size
        self.n = (cfg.input_size // cfg.patch_size) ** 2
        self.b = images
        self.rows = images * self.n
        g = torch.Generator(device=dev).manual_seed(0)

        def rnd(*shape):
            return (torch.randn(*shape, generator=g, device=dev) * 0.02).to(dtype)

        self.layers = [{"qkv_w": rnd(3 * h * dh, c), "qkv_b": rnd(3 * h * dh), "proj_w": rnd(c, h * dh),
                        "proj_b": rnd(c), "fc1_w": rnd(h * gs, c), "fc1_b": rnd(h * gs), "fc2_w": rnd(c, h * gs),
                        "fc2_b": rnd(c)} for _ in range(cfg.depth)]
        self.a = rnd(self.rows, c)  # the LayerNorm'd input every GEMM reads (values do not change the time)

    def forward(self, widths: list[tuple[int, int, int]]) -> None:
        cfg, b, n = self.cfg, self.b, self.n
        dh, gs = cfg.head_dim, cfg.group_size
        for layer, (nh, ng, mlp_rows) in zip(self.layers, widths, strict=True):
            qkv = F.linear(self.a, layer["qkv_w"][: 3 * dh * nh], layer["qkv_b"][: 3 * dh * nh])
            q, k, v = qkv.view(b, n, nh, 3, dh).permute(3, 0, 2, 1, 4).unbind(0)
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * n, nh * dh)
            F.linear(o, layer["proj_w"][:, : dh * nh], layer["proj_b"])
            m = self.a[:mlp_rows]
            u = torch._addmm_activation(layer["fc1_b"][: gs * ng], m, layer["fc1_w"][: gs * ng].t(), use_gelu=True)
            F.linear(u, layer["fc2_w"][:, : gs * ng], layer["fc2_b"])

    def time(self, widths: list[tuple[int, int, int]]) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(widths)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # its own pool, freed with it
            self.forward(widths)
        ms = GraphRunner._replay_ms(graph)  # the median of 7 replays, as the engines' forms are timed
        del graph
        return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16], help="images (CFG doubles the rows)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--calib", type=int, default=2, help="calibration images for the SDT keep rates (as dyc bench)")
    ap.add_argument("--json")
    a = ap.parse_args()
    ck = load_checkpoint(a.ckpt)
    cfg, dev = ck.config, torch.device("cuda")
    schedule = sampler_timesteps(a.sampler, a.steps)
    ana = analyse(ck.model, schedule, calib=a.calib, progress=lambda m: print(m, file=sys.stderr))
    heads = ana.head.sum(-1)  # [1000, L] kept heads per layer
    groups = ana.channel.sum(-1)
    if (heads[schedule] == 0).any() or (groups[schedule] == 0).any():  # the engines skip such a branch
        raise SystemExit("a step keeps no heads or no channel groups in some layer: not modelled by this bound")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checkpoint": a.ckpt,
           "model": cfg.name, "sampler": a.sampler, "steps": a.steps, "dtype": "bf16", "results": []}
    with torch.no_grad():
        for images in a.batch:
            work = WidthWork(cfg, 2 * images, torch.bfloat16, dev)
            full = [(cfg.num_heads, cfg.num_heads, work.rows)] * cfg.depth
            static = work.time(full)
            per_t = []
            for t in schedule:
                dense_w = [(int(heads[t, l]), int(groups[t, l]), work.rows) for l in range(cfg.depth)]
                sdt_w = [(nh, ng, max(1, math.ceil(float(ana.keep[t, l]) * work.rows))) for l, (nh, ng, _) in
                         enumerate(dense_w)]
                dense, sdt = work.time(dense_w), work.time(sdt_w)
                per_t.append({"t": int(t), "dense_ms": dense, "sdt_ms": sdt, "best_ms": min(dense, sdt),
                              "width_heads": float(heads[t].mean() / cfg.num_heads),
                              "width_channels": float(groups[t].mean() / cfg.num_heads),
                              "keep": float(ana.keep[t].mean())})
            mean = {k: float(np.mean([r[k] for r in per_t])) for k in ("dense_ms", "sdt_ms", "best_ms")}
            row = {"images": images, "rows": work.rows, "static_ms": static, **mean,
                   "bound_dense": static / mean["dense_ms"], "bound_sdt": static / mean["sdt_ms"],
                   "bound": static / mean["best_ms"], "per_t": per_t}
            print(f"batch {images} ({work.rows} rows): static {static:.3f} ms, DyDiT dense {mean['dense_ms']:.3f} / "
                  f"sdt {mean['sdt_ms']:.3f} / best {mean['best_ms']:.3f} ms per step -> bound "
                  f"{row['bound']:.2f}x (dense {row['bound_dense']:.2f}x, sdt {row['bound_sdt']:.2f}x)", flush=True)
            out["results"].append(row)
            del work
            torch.cuda.empty_cache()
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
