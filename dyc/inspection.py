"""What ``dyc inspect`` reports: config, size, FLOPs and the TDW activation over t."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint
from .errors import DycError
from .flops import flops_ratio, static_gflops
from .model import DyDiT
from .timesteps import NUM_TRAIN_TIMESTEPS

_SHOW_T = (0, 250, 500, 750, 999)


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
            "flops_ratio_uniform_t": flops_ratio(cfg, hm, cm, 1.0),
            "active_heads_at_t": {int(t): hm[t].sum(-1).tolist() for t in _SHOW_T},
            "active_groups_at_t": {int(t): cm[t].sum(-1).tolist() for t in _SHOW_T},
        }
    return info


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
            f"            FLOPs ratio (TDW alone, uniform t) {d['flops_ratio_uniform_t']:.3f}",
            "            active heads / groups per layer:",
        ]
        for t in _SHOW_T:
            h = " ".join(f"{v:2d}" for v in d["active_heads_at_t"][t])
            g = " ".join(f"{v:2d}" for v in d["active_groups_at_t"][t])
            lines.append(f"            t={t:3d}  heads [{h}]")
            lines.append(f"                   groups [{g}]")
    else:
        lines.append("TDW         none (plain DiT)")
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
