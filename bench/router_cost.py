"""What the SDT token router costs a compiled DyDiT step at small batches (GPU, attribution only).

Replays CUDA graphs of a few torch-backend engines (every token through the MLP, the forms `dyc bench`
picks at batch 1-4) in four variants, side by side with the static DiT, on the inputs the sampler
gives, at the schedule's first, middle and last timestep:
  side    the "dense" MLP form: the router kernel on a side stream beside fc1/fc2
  inline  the router on the main stream, before fc1
  fold    the router's first layer one cuBLAS GEMM, the rest inside the next LayerNorm kernel
          (the "dense-fold" MLP form)
  none    no router (every token kept): NOT DyDiT's semantics, only to attribute time
Usage: python bench/router_cost.py CKPT [--batch 1 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dyc import bench as B  # noqa: E402
from dyc.backends.torch_sliced import GraphRunner  # noqa: E402
from dyc.checkpoint import load_checkpoint  # noqa: E402
from dyc.timesteps import check_sampler, sampler_timesteps  # noqa: E402


def variant(mod, name: str) -> None:
    os.environ["DYC_MLP_MODE"] = "dense-fold" if name == "fold" else "dense"  # the one form GraphRunner captures
    if name in ("side", "fold"):
        mod.__dict__.pop("_keep_beside", None)
    elif name == "inline":
        mod._keep_beside = lambda h, layer, m=mod: (m._keep(h, layer), None)
    else:
        mod._keep_beside = lambda h, layer: (torch.ones(h.shape[:2], dtype=h.dtype, device=h.device), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--groups", type=int, default=49)
    ap.add_argument("--json")
    a = ap.parse_args()
    ck = load_checkpoint(a.ckpt)
    cfg, dev = ck.config, torch.device("cuda")
    schedule = sampler_timesteps("ddim", 50)
    out = {"device": torch.cuda.get_device_name(), "results": []}
    for batch in a.batch:
        setup = B.BenchSetup(cfg, 2 * batch, batch, schedule, dev, "bf16", check_sampler("ddim"), 4.0)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2 * batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(dev, torch.bfloat16)
        y = torch.randint(0, cfg.num_classes, (batch,), generator=g)
        y = torch.cat([y, torch.full((batch,), cfg.num_classes)]).to(dev)
        eager, dydit, _ = B._eager_runners(ck, setup)
        xs = B.trajectory_inputs(dydit or eager, setup, x, y)
        del eager, dydit
        static, dyn = B._torch_runners(ck, setup, calib=2, groups=a.groups)
        mods, feeds_of = dyn.deepcache  # the engines and the runtime's per-call inputs
        smods, sfeeds_of = static.deepcache
        with torch.no_grad():
            srun = GraphRunner(smods)
            si, sf = sfeeds_of(xs[schedule[0]], schedule[0], y)
            srun(si, sf)
            st = GraphRunner._replay_ms(srun.graphs[next(iter(srun.graphs))][0])
            del srun
            for t in (schedule[0], schedule[len(schedule) // 2], schedule[-1]):
                gi, feeds = feeds_of(xs[t], t, y)
                row = {"batch": batch, "t": int(t), "group": gi, "static_ms": st}
                for name in ("side", "inline", "fold", "none"):
                    for m in mods:
                        variant(m, name)
                    runner = GraphRunner(mods)
                    runner(gi, feeds)
                    row[f"{name}_ms"] = GraphRunner._replay_ms(runner.graphs[next(iter(runner.graphs))][0])
                    del runner
                print(json.dumps(row))
                out["results"].append(row)
        del static, dyn
        torch.cuda.empty_cache()
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
