"""DiT -> DyDiT fine-tuning, as the paper's §3.4 (the recipe's second stage).

    python -m dyc.recipes.finetune --from out/dit_digits.safetensors --lambda 0.5 --out out/dydit_digits.safetensors

1. Rank attention heads and MLP hidden channels by weight magnitude and permute them so the
   most important head / channel group comes first: head 0 and group 0 are always on in DyDiT.
   Permuting heads (qkv rows, proj columns) or hidden units (fc1 rows, fc2 columns) does not
   change the DiT's function.
2. Add the head and channel-group routers (Linear C -> H-1 on the timestep embedding) and the
   token routers with the official initialisation: xavier weights, biases 15 (TDW) and 35
   (tokens), so that at the start every head, group and token is on.
3. Train with Gumbel-Sigmoid + straight-through masks and L = L_DiT + w·L_FLOPs, with
   L_FLOPs = (mean_b F_dyn(t_b)/F_static - λ)², t ~ U{0..999}; during the warm-up the complete
   model (all on) is supervised with the same diffusion target as well. AdamW.

The paper fine-tunes for 50k-200k iterations at lr 1e-4; a CPU-sized schedule of a few hundred
steps needs the routers to move their large initial biases much faster, so router parameters
get their own, larger learning rate (``--router-lr``); the backbone keeps a DiT-like rate.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from dyc.checkpoint import load_checkpoint
from dyc.config import ModelConfig
from dyc.diffusion import GaussianDiffusion
from dyc.errors import DycError
from dyc.flops import attn_flops_per_head, mlp_flops_per_group, static_breakdown
from dyc.model import DyDiT, threshold_gate

from .data import batches, digits_dataset
from .train_dit import drop_labels, lr_at, save_half

ROUTER_KEYS = (".attn_rate.", ".mlp_rate.", ".token_selection.")
TDW_BIAS_INIT = 15.0  # official DyDiT init: sigmoid(15) ~ 1, every head/group starts on
TOKEN_BIAS_INIT = 35.0


# ---- Gumbel-Sigmoid + straight-through ---------------------------------------------------
class GumbelSigmoidGate:
    """The training gate (official ``_gumbel_sigmoid`` with ``hard=True``).

    Forward: the hard 0/1 mask ``1[logit + g > 0]`` with g the difference of two Gumbel(0, 1)
    samples (logistic noise), so a gate is on with probability sigmoid(logit) whatever ``tau``.
    Backward: the gradient of the relaxed value sigmoid((logit + g)/tau) (straight-through).
    With ``noise=False`` the forward equals the inference gate sigmoid(logit) > 0.5.
    """

    def __init__(self, tau: float = 5.0, noise: bool = True, generator: torch.Generator | None = None):
        if tau <= 0:
            raise DycError(f"Gumbel-Sigmoid temperature must be positive, got {tau}")
        self.tau = tau
        self.noise = noise
        self.generator = generator

    def _logistic(self, like: torch.Tensor) -> torch.Tensor:
        u = torch.rand(like.shape, generator=self.generator, dtype=torch.float32).clamp(1e-6, 1 - 1e-6)
        return (torch.log(u) - torch.log1p(-u)).to(like.device, like.dtype)  # = Gumbel1 - Gumbel2

    def __call__(self, logits: torch.Tensor, kind: str) -> torch.Tensor:
        z = logits + self._logistic(logits) if self.noise else logits
        soft = torch.sigmoid(z / self.tau)
        hard = (z > 0).to(logits.dtype)
        return hard + (soft - soft.detach())  # exactly the hard mask forward, the soft gradient backward


# ---- FLOPs-constrained loss ------------------------------------------------------------------
def flops_fraction(cfg: ModelConfig, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample F_dyn/F_static of the MHSA+MLP blocks (dyc.flops convention), differentiable.

    ``masks`` as ``DyDiT(..., return_masks=True)`` returns them: head/channel [B, L, H],
    token [B, L, N]. A block's MLP costs (active groups) x (kept token share) x per-group FLOPs.
    """
    attn = masks["head"].sum(dim=(1, 2)) * attn_flops_per_head(cfg)
    mlp = (masks["channel"].sum(-1) * masks["token"].mean(-1)).sum(-1) * mlp_flops_per_group(cfg)
    return (attn + mlp) / static_breakdown(cfg).blocks


def flops_loss(cfg: ModelConfig, masks: dict[str, torch.Tensor], target: float) -> torch.Tensor:
    """The paper's eq. (6): (batch mean of F_dyn(t_b)/F_static - λ)²."""
    return (flops_fraction(cfg, masks).mean() - target) ** 2


# ---- magnitude ranking + permutation ---------------------------------------------------------
@torch.no_grad()
def head_importance(block: nn.Module, heads: int) -> torch.Tensor:
    """L1 norm of each head's weights: its q, k, v rows of qkv and its columns of proj."""
    c = block.attn.proj.weight.shape[0]
    dh = c // heads
    qkv = block.attn.qkv.weight.reshape(3, heads, dh, c).abs().sum(dim=(0, 2, 3))
    proj = block.attn.proj.weight.reshape(c, heads, dh).abs().sum(dim=(0, 2))
    return qkv + proj


@torch.no_grad()
def channel_importance(block: nn.Module) -> torch.Tensor:
    """L1 norm of each MLP hidden unit's weights: its fc1 row and its fc2 column."""
    return block.mlp.fc1.weight.abs().sum(1) + block.mlp.fc2.weight.abs().sum(0)


@torch.no_grad()
def permute_by_magnitude(model: DyDiT, mlp_granularity: str = "channel") -> dict[str, list[list[int]]]:
    """Reorder heads and MLP hidden units of every block by decreasing magnitude, in place.

    Heads move as wholes (their qkv rows and proj columns). For the MLP, ``"channel"`` sorts
    the hidden units themselves, so group 0 gathers the most important D/H units (the paper
    ranks "hidden channels"); ``"group"`` keeps the groups and only reorders them. The model's
    output is unchanged either way. Returns the permutations applied (new position -> old index).
    """
    if mlp_granularity not in ("channel", "group"):
        raise DycError(f"mlp_granularity must be 'channel' or 'group', got {mlp_granularity!r}")
    cfg = model.config
    h, c, dh, gs = cfg.num_heads, cfg.hidden_size, cfg.head_dim, cfg.group_size
    perms: dict[str, list[list[int]]] = {"heads": [], "mlp": []}
    for block in model.blocks:
        order = torch.argsort(head_importance(block, h), descending=True, stable=True)
        qkv_w = block.attn.qkv.weight.reshape(3, h, dh, c)
        qkv_b = block.attn.qkv.bias.reshape(3, h, dh)
        block.attn.qkv.weight.copy_(qkv_w[:, order].reshape(3 * c, c))
        block.attn.qkv.bias.copy_(qkv_b[:, order].reshape(3 * c))
        proj_w = block.attn.proj.weight.reshape(c, h, dh)
        block.attn.proj.weight.copy_(proj_w[:, order].reshape(c, c))
        perms["heads"].append(order.tolist())

        imp = channel_importance(block)
        if mlp_granularity == "channel":
            units = torch.argsort(imp, descending=True, stable=True)
        else:
            g_order = torch.argsort(imp.reshape(h, gs).sum(1), descending=True, stable=True)
            units = (g_order[:, None] * gs + torch.arange(gs)[None]).reshape(-1)
        block.mlp.fc1.weight.copy_(block.mlp.fc1.weight[units])
        block.mlp.fc1.bias.copy_(block.mlp.fc1.bias[units])
        block.mlp.fc2.weight.copy_(block.mlp.fc2.weight[:, units])
        perms["mlp"].append(units.tolist())
    return perms


# ---- DiT -> DyDiT ----------------------------------------------------------------------------
@torch.no_grad()
def init_routers(model: DyDiT) -> None:
    """Official DyDiT router initialisation: xavier weights; biases 15 (TDW) and 35 (token head)."""
    for block in model.blocks:
        for lin in (block.attn_rate.router, block.mlp_rate.router, *block.token_selection.mlp_head[0::2]):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.constant_(block.attn_rate.router.bias, TDW_BIAS_INIT)
        nn.init.constant_(block.mlp_rate.router.bias, TDW_BIAS_INIT)
        nn.init.constant_(block.token_selection.mlp_head[2].bias, TOKEN_BIAS_INIT)


def to_dynamic(dit: DyDiT) -> DyDiT:
    """A DyDiT with the DiT's weights and freshly initialised routers."""
    cfg = ModelConfig.from_dict({**dit.config.to_dict(), "dynamic": True})
    dy = DyDiT(cfg)
    missing, unexpected = dy.load_state_dict(dit.state_dict(), strict=False)
    if unexpected or any(not any(k2 in k for k2 in ROUTER_KEYS) for k in missing):
        raise DycError(f"DiT weights do not fit the DyDiT: missing {missing}, unexpected {unexpected}")
    dy.pos_embed.requires_grad_(False)
    init_routers(dy)
    return dy


def is_router_param(name: str) -> bool:
    return any(k in f".{name}" for k in ROUTER_KEYS)


def is_tdw_router(name: str) -> bool:
    return ".attn_rate." in f".{name}" or ".mlp_rate." in f".{name}"


def is_token_router(name: str) -> bool:
    return ".token_selection." in f".{name}"


# ---- training --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="src", required=True, help="DiT checkpoint (official layout)")
    ap.add_argument("--out", default="out/dydit_digits.safetensors")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.5, help="target FLOPs ratio λ")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=100, help="steps with the complete-model loss added")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="backbone learning rate")
    ap.add_argument("--router-lr", type=float, default=5e-2, help="TDW (head/channel) routers")
    ap.add_argument("--token-router-lr", type=float, help="token routers (default: --router-lr)")
    ap.add_argument("--flops-weight", type=float, default=1.0)
    ap.add_argument("--tau", type=float, default=5.0, help="Gumbel-Sigmoid temperature (official: 5)")
    ap.add_argument("--mlp-rank", choices=("channel", "group"), default="channel")
    ap.add_argument("--label-dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--save-dtype", choices=("fp16", "fp32"), default="fp16")
    ap.add_argument("--log-every", type=int, default=50)
    return ap.parse_args(argv)


def finetune(args: argparse.Namespace) -> dict:
    if not 0.0 < args.lam <= 1.0:
        raise DycError(f"--lambda must be in (0, 1], got {args.lam}")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_flush_denormal(True)  # tiny router gradients must not take the slow denormal path
    ck = load_checkpoint(args.src)
    if ck.config.dynamic:
        raise DycError(f"{args.src}: already a DyDiT; fine-tune from a plain DiT checkpoint")
    dit = ck.model.float()
    permute_by_magnitude(dit, args.mlp_rank)
    model = to_dynamic(dit).to(dev).train()
    cfg = model.config
    model.gate = GumbelSigmoidGate(args.tau, noise=True, generator=gen)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    token_lr = args.router_lr if args.token_router_lr is None else args.token_router_lr
    groups = [
        {"params": [p for n, p in named if not is_router_param(n)], "lr": args.lr, "base": args.lr},
        {"params": [p for n, p in named if is_tdw_router(n)], "lr": args.router_lr, "base": args.router_lr},
        {"params": [p for n, p in named if is_token_router(n)], "lr": token_lr, "base": token_lr},
    ]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    gd = GaussianDiffusion.linear()
    x_all, y_all = digits_dataset(cfg.input_size)
    data = batches(x_all, y_all, args.batch_size, gen)
    t0, history, acc = time.time(), [], {"dit": 0.0, "flops": 0.0, "ratio": 0.0, "complete": 0.0, "n": 0}
    for step in range(args.steps):
        for g in opt.param_groups:  # short warm-up of the rates; no decay, routers settle on λ at the end
            g["lr"] = lr_at(step, args.steps, g["base"], warmup=min(20, args.steps), final_frac=1.0)
        x0, y = next(data)
        x0, y = x0.to(dev), drop_labels(y, args.label_dropout, cfg.num_classes, gen).to(dev)
        t = torch.randint(0, gd.num_timesteps, (x0.shape[0],), generator=gen).to(dev)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        x_t = gd.q_sample(x0, t, noise)
        out, masks = model(x_t, t, y, return_masks=True)
        l_dit = gd.training_losses(out, x0, x_t, t, noise)["loss"].mean()
        l_flops = flops_loss(cfg, masks, args.lam)
        ratio = flops_fraction(cfg, {k: v.detach() for k, v in masks.items()}).mean()
        loss = l_dit + args.flops_weight * l_flops
        if step < args.warmup:  # stabilisation: also supervise the complete DiT with the same target
            l_complete = gd.training_losses(model(x_t, t, y, complete_model=True), x0, x_t, t, noise)[
                "loss"
            ].mean()
            loss = loss + l_complete
            acc["complete"] += l_complete.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc["dit"] += l_dit.item()
        acc["flops"] += l_flops.item()
        acc["ratio"] += ratio.item()
        acc["n"] += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            n = acc["n"]
            rec = {
                "step": step + 1,
                "loss_dit": acc["dit"] / n,
                "loss_flops": acc["flops"] / n,
                "train_ratio": acc["ratio"] / n,
            }
            history.append(rec)
            extra = f" complete {acc['complete'] / n:.4f}" if step < args.warmup else ""
            print(
                f"[finetune] step {step + 1}/{args.steps} dit {rec['loss_dit']:.4f} flops {rec['loss_flops']:.5f} "
                f"ratio {rec['train_ratio']:.3f}{extra} ({time.time() - t0:.0f}s)",
                flush=True,
            )
            acc = {"dit": 0.0, "flops": 0.0, "ratio": 0.0, "complete": 0.0, "n": 0}
    wall = time.time() - t0
    model.gate = threshold_gate  # back to the inference gate
    info = {
        "stage": "finetune",
        "lambda": args.lam,
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "router_lr": args.router_lr,
        "token_router_lr": token_lr,
        "tau": args.tau,
        "flops_weight": args.flops_weight,
        "mlp_rank": args.mlp_rank,
        "seed": args.seed,
        "wall_s": round(wall, 1),
        "final_train_ratio": history[-1]["train_ratio"],
        "device": str(dev),
        "threads": torch.get_num_threads(),
    }
    save_half(
        model.eval(),
        args.out,
        {"dyc.recipe": json.dumps(info)},
        torch.float16 if args.save_dtype == "fp16" else torch.float32,
    )
    print(f"[finetune] saved DyDiT (λ={args.lam}) to {args.out} in {wall:.0f}s", flush=True)
    return info


def main(argv: list[str] | None = None) -> None:
    finetune(parse_args(argv))


if __name__ == "__main__":
    main()
