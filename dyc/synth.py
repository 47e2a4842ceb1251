"""Synthetic DyDiT checkpoints: random weights, routers shaped to hit a FLOPs target.

They exist to measure speed at real model sizes (DiT-XL/2 without the trained weights, which
cannot be downloaded here). The routers reproduce the paper's Figure 5 pattern — more heads and
channel groups active as t → 0 — and the token routers keep a chosen share of tokens on typical
inputs. The file's metadata says it is untrained.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from .config import ModelConfig
from .errors import DycError, UsageError
from .families import build_model, sample_conditions
from .flops import flops_ratio
from .model import FREQ_DIM, DyDiT
from .timesteps import NUM_TRAIN_TIMESTEPS

# The sinusoid feature sin(t·f_k) with the largest k whose phase stays below π/2 for t < 1000:
# a feature that grows monotonically with t, which the routers read to make width depend on t.
_HALF = FREQ_DIM // 2
_K_MONO = next(k for k in range(_HALF) if (NUM_TRAIN_TIMESTEPS - 1) * 10000 ** (-k / _HALF) <= math.pi / 2)
_ROUTER_SLOPE = 40.0  # sharp switch at each unit's threshold timestep


def _install_time_feature(model: DyDiT) -> tuple[torch.Tensor, int]:
    """Make temb[0] a monotone increasing function of t; return its value at every t, and its channel.

    A family whose routers read the raw sinusoid (U-ViT's time token) has such a channel already.
    """
    if not hasattr(model, "t_embedder"):
        from .families import family_module

        return family_module(model.config.family).time_feature(model, NUM_TRAIN_TIMESTEPS)
    mlp = model.t_embedder.mlp
    with torch.no_grad():
        mlp[0].weight[0].zero_()
        mlp[0].weight[0, _HALF + _K_MONO] = 4.0
        mlp[0].bias[0] = 1.0  # SiLU is increasing on [1, 5]
        mlp[2].weight[0].zero_()
        mlp[2].weight[0, 0] = 1.0
        mlp[2].bias[0] = 0.0
        return model.t_embedder(torch.arange(NUM_TRAIN_TIMESTEPS))[:, 0].clone(), 0


def _set_tdw_routers(model: DyDiT, feature: torch.Tensor, cut_t: np.ndarray, channel: int = 0) -> None:
    """Head/group j of layer l is active for t < cut_t[kind, l, j-1] (logit = slope·(θ − temb₀))."""
    theta = np.interp(cut_t, np.arange(NUM_TRAIN_TIMESTEPS), feature.numpy())
    # cut below 0 or above 999: never / always on
    theta = np.where(cut_t <= 0, -1e3, np.where(cut_t >= NUM_TRAIN_TIMESTEPS, 1e3, theta))
    with torch.no_grad():
        for l, block in enumerate(model.blocks):
            for kind, router in enumerate((block.attn_rate.router, block.mlp_rate.router)):
                router.weight.zero_()
                router.weight[:, channel] = -_ROUTER_SLOPE
                router.bias.copy_(torch.from_numpy(_ROUTER_SLOPE * theta[kind, l]).float())


@torch.no_grad()
def _calibrate_token_routers(model: DyDiT, keep: float, batch: int, generator: torch.Generator) -> list[float]:
    """Set each token router's last bias so it keeps ``keep`` of the tokens on typical inputs.

    One forward pass: a hook on layer l's router shifts its logits to the wanted quantile before
    layer l's MLP uses them, so later layers see the calibrated earlier ones.
    """
    cfg = model.config
    kept: list[float] = []

    def hook(module, _inp, out):
        q = torch.quantile(out.float().flatten(), 1.0 - keep) if 0.0 < keep < 1.0 else None
        if q is None:  # keep nothing / everything: a bias far past every logit
            shift = out.abs().max() + 10.0
            q = -shift if keep >= 1.0 else shift
        module.mlp_head[2].bias -= q
        out = out - q
        kept.append(float((torch.sigmoid(out) > 0.5).float().mean()))
        return out

    handles = [b.token_selection.register_forward_hook(hook) for b in model.blocks]
    try:
        x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=generator)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
        y, _ = sample_conditions(model, batch, generator)
        model(x, t, y)
    finally:
        for h in handles:
            h.remove()
    return kept


def synthesize(
    cfg: ModelConfig, lam: float, token_keep: float = 0.8, seed: int = 0, calib_batch: int = 4,
) -> tuple[DyDiT, dict]:
    """A random DyDiT whose TDW + SDT schedule has FLOPs ratio ``lam`` over t = 0..999.

    Each maskable head/group (l, j) is active for t < cut(l, j), cut = 1000·(u_lj + s) with u_lj
    random and decreasing in j; the shift s is found by bisection on the exact ratio of the masks
    the model computes.
    """
    if not 0.0 < lam <= 1.0:
        raise UsageError(f"--lambda must be in (0, 1], got {lam}")
    if not 0.0 <= token_keep <= 1.0:
        raise UsageError(f"--token-keep must be in [0, 1], got {token_keep}")
    cfg = ModelConfig(**{**cfg.to_dict(), "dynamic": True}).validate()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model(cfg).eval()
    feature, channel = _install_time_feature(model)
    rng = np.random.default_rng(seed)
    h = cfg.num_heads
    u = -np.sort(-rng.uniform(0.0, 1.0, size=(2, cfg.depth, h - 1)), axis=-1)  # decreasing in j

    def ratio_at(shift: float) -> float:
        _set_tdw_routers(model, feature, np.round(NUM_TRAIN_TIMESTEPS * (u + shift)), channel)
        hm, cm = model.tdw_masks(torch.arange(NUM_TRAIN_TIMESTEPS))
        return flops_ratio(cfg, hm.numpy(), cm.numpy(), token_keep)

    lo, hi = -1.0, 1.0  # all off ... all on
    if ratio_at(lo) > lam + 1e-9:
        raise DycError(
            f"--lambda {lam} is below the floor of this model ({ratio_at(lo):.3f}: head 0, group 0 "
            f"and the token keep rate {token_keep} are always paid)"
        )
    if ratio_at(hi) < lam - 1e-3:
        raise DycError(
            f"--lambda {lam} is out of reach with --token-keep {token_keep} (at most {ratio_at(hi):.3f})"
        )
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if ratio_at(mid) < lam:
            lo = mid
        else:
            hi = mid
    tdw_ratio = ratio_at(lo)
    kept = _calibrate_token_routers(model, token_keep, calib_batch, gen)
    hm, cm = model.tdw_masks(torch.arange(NUM_TRAIN_TIMESTEPS))
    info = {
        "untrained": True,
        "lambda_target": lam,
        "token_keep_target": token_keep,
        "token_keep_calibrated": kept,
        "flops_ratio": flops_ratio(cfg, hm.numpy(), cm.numpy(), np.array(kept)),
        "flops_ratio_tdw_only": flops_ratio(cfg, hm.numpy(), cm.numpy(), 1.0),
        "flops_ratio_at_target_keep": tdw_ratio,
        "seed": seed,
    }
    return model, info


def synth_metadata(info: dict) -> dict[str, str]:
    return {
        "dyc.untrained": "true",
        "dyc.synth": json.dumps(info),
        "dyc.note": "synthetic checkpoint with random weights (dyc synth): for speed measurements only",
    }
