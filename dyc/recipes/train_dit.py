"""Train a small pixel-space DiT from scratch on the digits (the recipe's first stage).

    python -m dyc.recipes.train_dit --out out/dit_digits.safetensors --steps 2000

DiT's training as in its official ``train.py``, scaled down: t ~ U{0..999}, the hybrid loss
(MSE on eps + VLB for the learned variance), label dropout 0.1 (the null class for CFG),
AdamW, and an EMA of the weights, which is what gets saved. Short schedules need a larger
learning rate than DiT's 1e-4, so the rate warms up linearly and decays by cosine.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from dyc.checkpoint import save_checkpoint
from dyc.config import ModelConfig
from dyc.diffusion import GaussianDiffusion
from dyc.model import DyDiT

from .data import NUM_CLASSES, batches, digits_dataset


def dit_initialize(model: DyDiT) -> None:
    """DiT's ``initialize_weights``: xavier linears, N(0, 0.02) embeddings, adaLN-Zero, zero output."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    for p in (
        model.final_layer.adaLN_modulation[-1].weight,
        model.final_layer.adaLN_modulation[-1].bias,
        model.final_layer.linear.weight,
        model.final_layer.linear.bias,
    ):
        nn.init.zeros_(p)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        if pm.requires_grad:
            pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)


def lr_at(step: int, total: int, base: float, warmup: int, final_frac: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``final_frac`` of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def drop_labels(y: torch.Tensor, prob: float, null_class: int, generator: torch.Generator) -> torch.Tensor:
    """Label dropout for classifier-free guidance: replace a share ``prob`` by the null class."""
    drop = torch.rand(y.shape[0], generator=generator) < prob
    return torch.where(drop.to(y.device), torch.full_like(y, null_class), y)


def save_half(model: DyDiT, path: str | Path, metadata: dict[str, str], dtype: torch.dtype) -> Path:
    """Save in the official layout; fp16 halves the shipped size (the loader upcasts)."""
    sd = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    return save_checkpoint(sd, path, metadata=metadata, config=model.config)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/dit_digits.safetensors")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--ema-decay", type=float, default=0.995)
    ap.add_argument("--label-dropout", type=float, default=0.1)
    ap.add_argument("--size", type=int, default=16, help="image side (digits upsampled from 8)")
    ap.add_argument("--patch", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--save-dtype", choices=("fp16", "fp32"), default="fp16")
    ap.add_argument("--log-every", type=int, default=100)
    return ap.parse_args(argv)


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    dev = torch.device(args.device)
    cfg = ModelConfig(
        input_size=args.size,
        patch_size=args.patch,
        in_channels=1,
        hidden_size=args.hidden,
        depth=args.depth,
        num_heads=args.heads,
        num_classes=NUM_CLASSES,
        learn_sigma=True,
        dynamic=False,
        vae_scale=1,
    ).validate()
    model = DyDiT(cfg).to(dev)
    dit_initialize(model)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    gd = GaussianDiffusion.linear()
    x_all, y_all = digits_dataset(args.size)
    data = batches(x_all, y_all, args.batch_size, gen)
    t0, run_loss, history = time.time(), 0.0, []
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x0, y = next(data)
        x0, y = x0.to(dev), drop_labels(y, args.label_dropout, NUM_CLASSES, gen).to(dev)
        t = torch.randint(0, gd.num_timesteps, (x0.shape[0],), generator=gen).to(dev)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        x_t = gd.q_sample(x0, t, noise)
        loss = gd.training_losses(model(x_t, t, y), x0, x_t, t, noise)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, args.ema_decay)
        run_loss += loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            avg = run_loss / (
                args.log_every if (step + 1) % args.log_every == 0 else (step + 1) % args.log_every
            )
            history.append({"step": step + 1, "loss": avg})
            print(
                f"[train_dit] step {step + 1}/{args.steps} loss {avg:.4f} ({time.time() - t0:.0f}s)",
                flush=True,
            )
            run_loss = 0.0
    wall = time.time() - t0
    info = {
        "stage": "train_dit",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "ema_decay": args.ema_decay,
        "seed": args.seed,
        "wall_s": round(wall, 1),
        "final_loss": history[-1]["loss"],
        "device": str(dev),
        "threads": torch.get_num_threads(),
    }
    meta = {"dyc.recipe": json.dumps(info)}
    save_half(ema, args.out, meta, torch.float16 if args.save_dtype == "fp16" else torch.float32)
    print(f"[train_dit] saved EMA weights to {args.out} in {wall:.0f}s", flush=True)
    return info


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
