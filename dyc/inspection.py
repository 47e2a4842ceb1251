"""What ``dyc inspect`` reports: config, size, FLOPs and the TDW activation over t."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint
from .errors import DycError
from .flops import flops_ratio, static_gflops
from .model import DyDiT
from .timesteps import NUM_TRAIN_TIMESTEPS

_SHOW_T = (0, 250, 500, 750, 999)

# The FLOPs ratios a DyDiT has, one name each (used by inspect, flops, synth, compile and the docs).
LAMBDA_DEFINITION = "dynamic / full-width MHSA+MLP MACs per forward, mean over t (other layers not counted)"
LAMBDA_MEANING = {
    "tdw": "TDW alone: the routers' heads + MLP channel groups, every token",
    "model": "TDW + SDT keep rates (calibrated as dyc compile does): the paper's λ",
    "engines": "dyc compile's engines: each t runs its group's union, with SDT",
}


def tdw_activation(model: DyDiT) -> tuple[np.ndarray, np.ndarray]:
    """Head and channel-group masks for every t = 0..999, each [1000, L, H] bool."""
    hm, cm = model.tdw_masks(torch.arange(NUM_TRAIN_TIMESTEPS))
    return hm.numpy() > 0.5, cm.numpy() > 0.5


def describe(ck: Checkpoint) -> dict:
    cfg = ck.config
    sd = ck.model.state_dict()
    router_params = sum(v.numel() for k, v in sd.items() if any(s in k for s in ("_rate.", "token_selection.")))
    info: dict = {
        "path": str(ck.path) if ck.path else None,
        "name": cfg.name,
        "config": cfg.to_dict(),
        "image_size": cfg.image_size,
        "tokens": cfg.num_tokens,
        "params": ck.num_params,
        "router_params": router_params,
        "static_gflops": static_gflops(cfg),
        "untrained": ck.metadata.get("dyc.untrained") == "true",
    }
    if cfg.dynamic:
        hm, cm = tdw_activation(ck.model)
        archs = np.concatenate([hm, cm], axis=-1).reshape(NUM_TRAIN_TIMESTEPS, -1)
        info["tdw"] = {
            "distinct_architectures": int(len(np.unique(archs, axis=0))),
            "head_active_share": float(hm.mean()),
            "channel_active_share": float(cm.mean()),
            "active_heads_at_t": {int(t): hm[t].sum(-1).tolist() for t in _SHOW_T},
            "active_groups_at_t": {int(t): cm[t].sum(-1).tolist() for t in _SHOW_T},
        }
    return info


def lambda_target(ck: Checkpoint) -> tuple[float | None, str | None]:
    """The λ a checkpoint was made for, from its metadata: the fine-tuning recipe's or ``dyc synth``'s."""
    for key, field, what in (("dyc.recipe", "lambda", "fine-tuning"), ("dyc.synth", "lambda_target", "dyc synth")):
        try:
            value = json.loads(ck.metadata.get(key, "{}")).get(field)
        except (ValueError, AttributeError):
            continue
        if isinstance(value, (int, float)):
            return float(value), what
    return None, None


def lambda_figures(ck: Checkpoint, *, sampler: str = "ddim", steps: int | None = None, calib: int = 2,
                   calib_steps: int | None = None, seed: int = 0, groups: int | None = None,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Every FLOPs ratio λ of a DyDiT checkpoint, each over t = 0..999 and over a sampler's schedule.

    ``tdw``: TDW masks alone; ``model``: TDW + SDT keep rates calibrated exactly as ``dyc compile`` does
    (same samples, steps and seed, so these equal its manifest's ``lambda.trained``); ``engines``: the union
    widths of the groups ``dyc compile`` would make (its ``lambda.realized``); ``target``: from the metadata.
    ``calib=0`` skips the SDT calibration (``model`` and ``engines`` are then None).
    """
    from .compiler.analyse import DEFAULT_CALIB_STEPS, analyse, architectures
    from .compiler.group import compiled_ratio, partition
    from .timesteps import sampler_timesteps

    cfg = ck.config
    schedule = sampler_timesteps(sampler, steps)
    hm, cm = tdw_activation(ck.model)
    target, target_from = lambda_target(ck)
    out: dict = {
        "definition": LAMBDA_DEFINITION, "schedule": f"{sampler}-{len(schedule)}",
        "tdw_all_t": flops_ratio(cfg, hm, cm, 1.0), "tdw": flops_ratio(cfg, hm, cm, 1.0, schedule),
        "model_all_t": None, "model": None, "engines": None, "engines_groups": None,
        "target": target, "target_from": target_from, "calibration": None,
    }
    if calib > 0:
        calib_steps = DEFAULT_CALIB_STEPS if calib_steps is None else calib_steps
        an = analyse(ck.model, schedule, calib=calib, calib_steps=calib_steps, seed=seed, progress=progress)
        arch_of_t, arch_head, arch_channel = architectures(an.head, an.channel)
        gplans = partition(cfg, arch_of_t, arch_head, arch_channel, an.keep, schedule, groups)
        out.update(model_all_t=flops_ratio(cfg, an.head, an.channel, an.keep),
                   model=flops_ratio(cfg, an.head, an.channel, an.keep, schedule),
                   engines=compiled_ratio(cfg, gplans, an.keep, schedule), engines_groups=len(gplans),
                   calibration={"samples": calib, "steps": calib_steps, "seed": seed})
    return out


def format_lambda(lam: dict) -> list[str]:
    """The λ table of ``dyc inspect``: one row per figure, over t=0..999 and over the schedule, with its meaning."""
    def v(x):
        return f"{x:9.4f}" if x is not None else "        -"

    sched = lam["schedule"]
    k = lam["engines_groups"]
    rows = [
        ("λ_tdw", lam["tdw_all_t"], lam["tdw"], LAMBDA_MEANING["tdw"]),
        ("λ_model", lam["model_all_t"], lam["model"], LAMBDA_MEANING["model"]
         + ("" if lam["model"] is not None else " (skipped: --calib 0)")),
        ("λ_engines", None, lam["engines"], LAMBDA_MEANING["engines"].replace("engines", f"{k} engines", 1)
         if k else LAMBDA_MEANING["engines"]),
    ]
    lines = [f"λ           {lam['definition']}", f"            {'':10} {'t=0..999':>9} {sched:>9}"]
    lines += [f"            {name:10} {v(a)} {v(b)}  {what}" for name, a, b, what in rows]
    if lam["target"] is not None:
        what = f"made for ({lam['target_from']}): λ_model over t=0..999"
        lines.append(f"            {'λ_target':10} {v(lam['target'])} {'':9}  {what}")
    return lines


def describe_bundle(path: Path) -> dict:
    """A compiled bundle's model, groups and λ figures, read from its manifest (checked as every loader does)."""
    from .bundle import Bundle

    m = Bundle.load(path, verify_checksums=False).manifest
    lam = m["lambda"]
    return {
        "path": str(path), "name": m["model"]["name"], "dtype": m["dtype"], "groups": len(m["groups"]),
        "schedule": f"{m['schedule']['sampler']}-{m['schedule']['steps']}",
        # the manifest's keys, under the names inspect / compile / the docs use
        "lambda": {"definition": LAMBDA_DEFINITION, "model": lam["model"], "model_trained_thresholds": lam["trained"],
                   "engines": lam["realized"], "engines_onnx_counted": lam["onnx_counted"], "target": lam["target"],
                   "threshold_offset": m.get("threshold_offset", 0.0)},
    }


def format_bundle(info: dict) -> str:
    lam = info["lambda"]

    def v(x):
        return f"{x:9.4f}" if x is not None else "        -"

    sched = info["schedule"]
    return "\n".join([
        f"bundle      {info['path']}: {info['name']}, {info['groups']} group(s), {info['dtype']}, compiled for {sched}",
        f"λ           {lam['definition']}",
        f"            {'':10} {sched:>9}",
        f"            {'λ_model':10} {v(lam['model'])}  {LAMBDA_MEANING['model']}",
        f"            {'':10} {'':9}  (router logit offset {lam['threshold_offset']:.4g}; at the trained thresholds "
        f"{lam['model_trained_thresholds']:.4f})",
        f"            {'λ_engines':10} {v(lam['engines'])}  {LAMBDA_MEANING['engines']}",
        f"            {'':10} {'':9}  (counted in the exported graphs: {lam['engines_onnx_counted']:.4f})",
        f"            {'λ_target':10} {v(lam['target'])}  dyc compile --lambda: the bound on λ_model over {sched}",
    ])


def format_description(info: dict) -> str:
    cfg = info["config"]
    lines = [
        f"model       {info['name']}{'  (untrained, synthetic)' if info['untrained'] else ''}",
        f"input       {info['image_size']}px, {cfg['in_channels']}×{cfg['input_size']}×{cfg['input_size']} "
        f"{'latent' if cfg['vae_scale'] > 1 else 'pixels'}, patch {cfg['patch_size']} -> {info['tokens']} tokens",
        f"width       C={cfg['hidden_size']}, depth {cfg['depth']}, {cfg['num_heads']} heads, "
        f"{cfg['num_classes']} classes, learn_sigma={cfg['learn_sigma']}",
        f"params      {info['params'] / 1e6:.2f} M" + (f" ({info['router_params'] / 1e6:.3f} M in routers)"
                                                       if info["router_params"] else ""),
        f"static      {info['static_gflops']:.2f} GFLOPs per forward",
    ]
    if "tdw" in info:
        d = info["tdw"]
        lines += [
            f"TDW         {d['distinct_architectures']} distinct architectures over t=0..999; "
            f"heads on {d['head_active_share']:.0%}, channel groups on {d['channel_active_share']:.0%}",
            "            active heads / groups per layer:",
        ]
        for t in _SHOW_T:
            h = " ".join(f"{v:2d}" for v in d["active_heads_at_t"][t])
            g = " ".join(f"{v:2d}" for v in d["active_groups_at_t"][t])
            lines.append(f"            t={t:3d}  heads [{h}]")
            lines.append(f"                   groups [{g}]")
    else:
        lines.append("TDW         none (plain DiT)")
    if "lambda" in info:
        lines += format_lambda(info["lambda"])
    return "\n".join(lines)


def plot_activation(head: np.ndarray, channel: np.ndarray, path: Path, title: str = "") -> Path:
    """The paper's Figure 5: active heads / channel groups per layer (rows) and timestep (columns)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DycError("--plot needs matplotlib: pip install 'dyc[plot]'") from None
    h = head.shape[-1]
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True, constrained_layout=True)
    for ax, m, what in ((axes[0], head, "heads"), (axes[1], channel, "MLP channel groups")):
        im = ax.imshow(m.sum(-1).T, aspect="auto", origin="lower", cmap="viridis", vmin=1, vmax=h,
                       interpolation="nearest")
        ax.set_ylabel("layer")
        ax.set_title(f"activated {what} (of {h})")
        fig.colorbar(im, ax=ax)
    axes[1].set_xlabel("timestep t")
    if title:
        fig.suptitle(title)
    from .fileio import atomic_output, make_output_dir

    make_output_dir(path.parent)
    try:
        with atomic_output(path, "plot") as f:  # a failed or killed write leaves no half PNG
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path
