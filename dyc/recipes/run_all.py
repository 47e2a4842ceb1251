"""The whole recipe, end to end: train the DiT, fine-tune it to DyDiT, evaluate both, write the card.

    python -m dyc.recipes.run_all --out-dir dyc/models     # what produced the shipped files
    python -m dyc.recipes.run_all                          # same, into out/recipe/

Every stage runs with its defaults (the shipped recipe); the figures, the wall time of each stage
and the conditions they were measured under (threads, CPU, load average) go to
``<out-dir>/recipe_results.json`` and into ``<out-dir>/MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import time
from pathlib import Path

import torch

from dyc.checkpoint import load_checkpoint
from dyc.flops import static_breakdown

from . import evaluate as ev
from . import finetune as ft
from . import train_dit as td


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def conditions(device: str) -> dict:
    return {
        "device": device,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "loadavg_start": _load(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default="out/recipe")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--dit-steps", type=int, help="override train_dit --steps (smoke runs)")
    ap.add_argument("--ft-steps", type=int, help="override finetune --steps (smoke runs)")
    ap.add_argument("--ft-warmup", type=int, help="override finetune --warmup (smoke runs)")
    ap.add_argument(
        "--reuse-dit", action="store_true", help="keep DIR's DiT (and its recorded time); redo the rest"
    )
    ap.add_argument("--ft-extra", default="", help="extra finetune arguments, e.g. '--token-router-lr 5e-3'")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--cfg-scale", type=float, default=3.0)
    ap.add_argument("--no-card", action="store_true", help="do not write MODEL_CARD.md")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        torch.set_flush_denormal(True)  # tiny router gradients must not hit the slow denormal path
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dit_path, dydit_path = out / "dit_digits.safetensors", out / "dydit_digits.safetensors"
    cond = conditions(args.device)
    t_start = time.time()

    dit_argv = ["--out", str(dit_path), "--device", args.device, "--seed", str(args.seed)]
    if args.dit_steps is not None:
        dit_argv += ["--steps", str(args.dit_steps)]
    reused = args.reuse_dit and dit_path.is_file()
    if reused:
        dit_info = json.loads(load_checkpoint(dit_path).metadata["dyc.recipe"])
        print(f"[run_all] reusing {dit_path} (trained in {dit_info['wall_s']} s)", flush=True)
    else:
        dit_info = td.train(td.parse_args(dit_argv))

    ft_argv = ["--from", str(dit_path), "--out", str(dydit_path), "--lambda", str(args.lam)]
    ft_argv += ["--device", args.device, "--seed", str(args.seed)]
    if args.ft_steps is not None:
        ft_argv += ["--steps", str(args.ft_steps)]
    if args.ft_warmup is not None:
        ft_argv += ["--warmup", str(args.ft_warmup)]
    ft_info = ft.finetune(ft.parse_args(ft_argv + shlex.split(args.ft_extra)))

    t_eval = time.time()
    clf, real_acc = ev.fit_classifier(args.seed)
    results = {}
    for name, path in (("dit", dit_path), ("dydit", dydit_path)):
        res, x = ev.evaluate(path, clf, args.samples, args.ddim_steps, args.cfg_scale, args.seed, args.device)
        ev.save_grid(x, out / f"{name}_samples.png")
        results[name] = res
        print(
            f"[run_all] {name}: accuracy {res['accuracy']:.3f}"
            + (f", realized λ {res['realized_lambda']:.3f}" if "realized_lambda" in res else ""),
            flush=True,
        )
    eval_wall = time.time() - t_eval
    total = time.time() - t_start
    cond["loadavg_end"] = _load()
    cfg = load_checkpoint(dydit_path).config
    summary = {
        "lambda_target": args.lam,
        "accuracy_dit": results["dit"]["accuracy"],
        "accuracy_dydit": results["dydit"]["accuracy"],
        "realized_lambda": results["dydit"]["realized_lambda"],
        "token_keep_mean": results["dydit"]["token_keep_mean"],
        "tdw_distinct_architectures": results["dydit"]["tdw"]["distinct_architectures"],
        "classifier_real_accuracy": real_acc,
        "static_block_gflops": static_breakdown(cfg).blocks / 1e9,
        "wall_s": {
            "train_dit": dit_info["wall_s"],
            "finetune": ft_info["wall_s"],
            "evaluate": round(eval_wall, 1),
            "total": round(total + (dit_info["wall_s"] if reused else 0.0), 1),
        },
    }
    record = {
        "summary": summary,
        "conditions": cond,
        "config": cfg.to_dict(),
        "train_dit": dit_info,
        "finetune": ft_info,
        "evaluation": results,
        "command": _command(args),
    }
    (out / "recipe_results.json").write_text(json.dumps(record, indent=2))
    if not args.no_card:
        (out / "MODEL_CARD.md").write_text(model_card(record))
    print(f"[run_all] done in {total / 60:.1f} min: {json.dumps(summary)}", flush=True)
    return record


def _command(args: argparse.Namespace) -> str:
    cmd = "python -m dyc.recipes.run_all --out-dir DIR"
    if args.threads:
        cmd += f" --threads {args.threads}"
    if args.seed:
        cmd += f" --seed {args.seed}"
    if args.ft_extra:
        cmd += f" --ft-extra '{args.ft_extra}'"
    return cmd


def model_card(r: dict) -> str:
    s, c, cfg, d, f = r["summary"], r["conditions"], r["config"], r["train_dit"], r["finetune"]
    ev_dy = r["evaluation"]["dydit"]
    tdw = ev_dy["tdw"]
    w = s["wall_s"]
    q = ", ".join(f"{v:.2f}" for v in tdw["head_active_by_quarter"])
    qc = ", ".join(f"{v:.2f}" for v in tdw["channel_active_by_quarter"])
    return f"""# dyc default models: DiT and DyDiT (λ={s["lambda_target"]}) on scikit-learn's digits

The embedded default `dyc` uses when no checkpoint is given (`dyc.models.default_checkpoint()`).
Both files are official-layout safetensors (weights stored fp16, loaded as fp32) with the config in
the `dyc.config` metadata and the recipe's settings in `dyc.recipe`. Every figure below was written
by `dyc/recipes/run_all.py` from the run that produced these files.

| file | model |
| --- | --- |
| `dit_digits.safetensors` | plain DiT (EMA weights) |
| `dydit_digits.safetensors` | DyDiT fine-tuned from it, target λ = {s["lambda_target"]} |

## Data
scikit-learn's `load_digits` (1797 8×8 grey images, 10 classes; ships with scikit-learn, no
download), pixels 0..16 scaled to [-1, 1], bilinearly upsampled to {cfg["input_size"]}×{cfg["input_size"]}.
Pixel space (`vae_scale` 1), 1 channel.

## Architecture
DiT with input {cfg["input_size"]}, patch {cfg["patch_size"]} ({(cfg["input_size"] // cfg["patch_size"]) ** 2} tokens),
hidden {cfg["hidden_size"]}, depth {cfg["depth"]}, {cfg["num_heads"]} heads, MLP ratio {cfg["mlp_ratio"]:g},
learned variance, {cfg["num_classes"]} classes + the null class.
MHSA+MLP cost: {s["static_block_gflops"] * 1e3:.1f} MFLOPs (MACs) per image per forward.

## Training
- DiT: {d["steps"]} steps, batch {d["batch_size"]}, AdamW lr {d["lr"]:g} (linear warm-up, cosine decay),
  hybrid loss (MSE on eps + VLB), label dropout 0.1, EMA {d["ema_decay"]} (the EMA is saved). {d["wall_s"]:.0f} s.
- DyDiT (paper §3.4): heads and MLP hidden channels ranked by weight magnitude and permuted
  (most important first, always on), routers added with the official init (biases 15 / 35),
  Gumbel-Sigmoid (τ={f["tau"]:g}) + straight-through, L = L_DiT + {f["flops_weight"]:g}·(F_dyn/F_static − λ)²
  with t ~ U{{0..999}}, complete-model loss for the first {f["warmup"]} steps;
  {f["steps"]} steps, batch {f["batch_size"]}, AdamW lr {f["lr"]:g} (backbone) / {f["router_lr"]:g} (routers:
  the paper's 1e-4 over 50k+ iterations cannot move biases of 15 in a few hundred steps). {f["wall_s"]:.0f} s.

## Results
Accuracy: an SVC fitted on real digits (held-out accuracy on real digits {s["classifier_real_accuracy"]:.3f})
labels {ev_dy["samples"]} class-balanced samples per model, {ev_dy["sampler"].upper()} with classifier-free
guidance scale {ev_dy["cfg_scale"]:g}; the share labelled as the class asked for.

| model | accuracy | λ_model (DDIM50) |
| --- | --- | --- |
| DiT | {s["accuracy_dit"]:.3f} | 1 |
| DyDiT | {s["accuracy_dydit"]:.3f} | {s["realized_lambda"]:.3f} |

λ_model (as `dyc inspect` names it): MHSA+MLP ratio over the {ev_dy["sampler"].upper()} schedule, TDW masks at each
visited t and token keep shares measured on the sampling trajectory (CFG batch included).
- TDW: {tdw["distinct_architectures"]} distinct architectures over t = 0..999; active heads by quarter of t
  (low t first): {q}; active channel groups: {qc}.
- SDT: mean share of tokens through the MLP {s["token_keep_mean"]:.3f}.

## Wall time and conditions
train DiT {w["train_dit"]:.0f} s + fine-tune {w["finetune"]:.0f} s + evaluate {w["evaluate"]:.0f} s
= **{w["total"] / 60:.1f} min** on {c["device"]} ({c["cpu"]}, {c["cpus_usable"]} of {c["cpu_count"]} cores usable,
{c["torch_threads"]} torch threads, torch {c["torch"]}); load average {c["loadavg_start"]} at the start
and {c["loadavg_end"]} at the end (the machine was shared with other work).

## Reproduce
```
{r["command"]}   # DIR = dyc/models wrote the shipped files
```
Randomness comes from seeded CPU generators, so a rerun on CPU reproduces these figures within
floating-point noise (other thread counts or CUDA change the last bits, not the figures' level).
"""


if __name__ == "__main__":
    main()
