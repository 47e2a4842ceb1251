"""Quality and cost of the recipe's models (the recipe's third stage).

    python -m dyc.recipes.evaluate dyc/models/dit_digits.safetensors dyc/models/dydit_digits.safetensors

Accuracy: a scikit-learn classifier fitted on real digits labels generated samples (DDIM with
classifier-free guidance, the same number per class); the share it labels as the class asked
for is the model's accuracy. Cost (DyDiT): the realized FLOPs ratio λ over the DDIM schedule,
dyc.flops with the TDW masks at each visited t and the token keep shares measured on the
sampling trajectory itself (per step and layer, CFG batch included, as an engine runs it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dyc.checkpoint import load_checkpoint
from dyc.diffusion import ddim_sample
from dyc.flops import flops_ratio
from dyc.model import DyDiT
from dyc.timesteps import sampler_timesteps

from .data import NUM_CLASSES, load_digits_raw, to_model_space, to_raw_space


def fit_classifier(seed: int = 0, size: int = 16):
    """SVC on real digits, seen through the same 8 -> size -> 8 round trip as generated samples.

    Returns the classifier and its accuracy on a held-out quarter of the real digits.
    """
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    images, labels = load_digits_raw()
    feats = to_raw_space(to_model_space(images, size))
    xtr, xte, ytr, yte = train_test_split(feats, labels, test_size=0.25, random_state=seed, stratify=labels)
    clf = SVC(gamma=0.001, C=10.0).fit(xtr, ytr)
    return clf, float((clf.predict(xte) == yte).mean())


@torch.no_grad()
def sample(
    model: DyDiT,
    n: int = 500,
    steps: int = 50,
    cfg_scale: float = 3.0,
    seed: int = 0,
    chunk: int = 500,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None]:
    """``n`` class-balanced DDIM samples with CFG, and the token keep share [steps, L] seen on the way."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % cfg.num_classes
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    dev = next(model.parameters()).device
    noise = torch.randn((n, *shape), generator=gen).to(dev)
    kept: dict[int, list[torch.Tensor]] = {}  # original t -> per-chunk token keep sums [L] and counts

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not cfg.dynamic:
            return model(x, t, y)
        out, masks = model(x, t, y, return_masks=True)
        tok = masks["token"]  # [B, L, N]
        kept.setdefault(int(t[0]), []).append(
            torch.stack([tok.sum(dim=(0, 2)), torch.full_like(tok[0, :, 0], tok.shape[0] * tok.shape[2])])
        )
        return out

    outs = []
    for i in range(0, n, chunk):
        outs.append(
            ddim_sample(
                model_fn,
                noise[i : i + chunk],
                labels[i : i + chunk].to(dev),
                steps,
                cfg_scale,
                null_class=cfg.num_classes,
                clip_denoised=True,
            )
        )
    keep = None
    if cfg.dynamic:
        ts = sampler_timesteps("ddim", steps)
        sums = [torch.stack(kept[t]).sum(0).cpu() for t in ts]  # [2, L]: kept tokens, all tokens
        keep = np.stack([(s[0] / s[1]).numpy() for s in sums])
    return torch.cat(outs), labels, keep


def realized_lambda(model: DyDiT, steps: int, token_keep: np.ndarray | float) -> float:
    """λ over the DDIM schedule: TDW masks at each visited t, token keep [steps, L] in the same order."""
    ts = sampler_timesteps("ddim", steps)
    head, channel = model.tdw_masks(torch.tensor(ts, device=next(model.parameters()).device))
    return flops_ratio(model.config, head.cpu().numpy(), channel.cpu().numpy(), token_keep)


def tdw_summary(model: DyDiT) -> dict:
    """How the TDW architecture varies over t = 0..999: distinct architectures and active shares."""
    head, channel = (
        m.cpu() for m in model.tdw_masks(torch.arange(1000, device=next(model.parameters()).device))
    )
    arch = torch.cat([head, channel], dim=-1).flatten(1)
    distinct = torch.unique(arch, dim=0).shape[0]
    return {
        "distinct_architectures": int(distinct),
        "head_active": float(head.mean()),
        "channel_active": float(channel.mean()),
        "head_active_by_quarter": [float(head[q * 250 : (q + 1) * 250].mean()) for q in range(4)],
        "channel_active_by_quarter": [float(channel[q * 250 : (q + 1) * 250].mean()) for q in range(4)],
    }


def evaluate(
    path: str | Path,
    clf,
    n: int = 500,
    steps: int = 50,
    cfg_scale: float = 3.0,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[dict, torch.Tensor]:
    ck = load_checkpoint(path)
    model = ck.model.eval().to(device)
    t0 = time.time()
    x, labels, keep = sample(model, n, steps, cfg_scale, seed)
    x = x.cpu()
    pred = clf.predict(to_raw_space(x))
    res = {
        "checkpoint": str(path),
        "model": ck.config.name,
        "samples": n,
        "sampler": f"ddim{steps}",
        "cfg_scale": cfg_scale,
        "accuracy": float((pred == labels.numpy()).mean()),
        "per_class_accuracy": [float((pred[labels.numpy() == c] == c).mean()) for c in range(NUM_CLASSES)],
        "sampling_wall_s": round(time.time() - t0, 1),
    }
    if ck.config.dynamic:
        res["realized_lambda"] = realized_lambda(model, steps, keep)
        res["token_keep_mean"] = float(keep.mean())
        res["token_keep_by_layer"] = [float(v) for v in keep.mean(0)]
        # SDT proper (some tokens of a block's MLP run, others not) vs a block on or off as a whole
        res["token_keep_partial_share"] = float(((keep > 0.02) & (keep < 0.98)).mean())
        res["tdw"] = tdw_summary(model)
    return res, x


def save_grid(x: torch.Tensor, path: str | Path, per_row: int = 10, rows: int = 10) -> None:
    """A PNG of the first rows×per_row samples (class = column), for the model card."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = x.shape[-1]
    grid = np.ones((rows * (s + 1), per_row * (s + 1)))
    for k in range(min(rows * per_row, x.shape[0])):
        r, c = divmod(k, per_row)
        grid[r * (s + 1) : r * (s + 1) + s, c * (s + 1) : c * (s + 1) + s] = x[k, 0].clamp(-1, 1).numpy()
    plt.imsave(str(path), grid, cmap="gray_r", vmin=-1, vmax=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ap.add_argument("--cfg-scale", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--grid-dir", help="write a PNG of samples per checkpoint here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    clf, real_acc = fit_classifier(args.seed)
    print(f"[evaluate] classifier accuracy on held-out real digits: {real_acc:.3f}", flush=True)
    results = []
    for path in args.checkpoints:
        res, x = evaluate(path, clf, args.samples, args.steps, args.cfg_scale, args.seed, args.device)
        res["classifier_real_accuracy"] = real_acc
        results.append(res)
        lam = (
            f", realized λ {res['realized_lambda']:.3f}, token keep {res['token_keep_mean']:.3f}, "
            f"{res['tdw']['distinct_architectures']} TDW architectures"
            if "realized_lambda" in res
            else ""
        )
        print(
            f"[evaluate] {path}: accuracy {res['accuracy']:.3f}{lam} ({res['sampling_wall_s']}s)", flush=True
        )
        if args.grid_dir:
            Path(args.grid_dir).mkdir(parents=True, exist_ok=True)
            save_grid(x, Path(args.grid_dir) / (Path(path).stem + ".png"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
