"""DiT's Gaussian diffusion maths: a small, eager reference (DESIGN.md §3).

What DiT (and improved-DDPM before it) does, compactly: linear betas 1e-4..0.02 over T=1000,
``q_sample``, the training loss (MSE on eps, plus the VLB term with a stop-gradient on the mean
when the model learns its variance: improved-DDPM's hybrid loss), and the sampling loops, DDPM
with learned variance and DDIM (eta=0), both over a respaced schedule and with classifier-free
guidance. A respaced process has its own betas but the model is always called with the
*original* t. Production samplers are checked against these loops.

>>> gd = GaussianDiffusion.linear()
>>> x = ddim_sample(model, torch.randn(8, 4, 32, 32), y, steps=50, cfg_scale=1.5, null_class=1000)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .errors import DycError
from .noise_schedule import linear_betas
from .timesteps import NUM_TRAIN_TIMESTEPS, sampler_timesteps

# (x, t, y) -> model output [B, C or 2C, H, W]; t holds original timesteps 0..T-1
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # the tanh approximation improved-DDPM uses, kept so losses match the reference bit for bit in spirit
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log p(x) of 8-bit data in [-1, 1] under a Gaussian discretised into 255 bins (nats, elementwise)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


class GaussianDiffusion:
    """The forward process q and the reverse-step maths for a given beta schedule (float64 tables).

    ``timestep_map[i]`` is the original timestep of this process's step i (identity unless
    respaced); models are always called with it.
    """

    def __init__(self, betas: Sequence[float] | np.ndarray, timestep_map: Sequence[int] | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise DycError("betas must be a 1-D schedule in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = (
            np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map, dtype=np.int64)
        )
        if len(self.timestep_map) != len(betas):
            raise DycError("timestep_map must have one original timestep per beta")
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the posterior variance is 0 at t=0: clip the log to its t=1 value, as improved-DDPM
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = (
            np.log(np.append(pv[1], pv[1:])) if len(pv) > 1 else np.log(betas)
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

    @classmethod
    def linear(cls, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> GaussianDiffusion:
        return cls(linear_betas(num_timesteps))

    # ---- respacing --------------------------------------------------------------------
    def respace(self, timesteps: Sequence[int]) -> GaussianDiffusion:
        """The process that visits only ``timesteps`` (original indices, any order).

        Its betas are chosen so its alphas_cumprod equal the original ones at the kept steps
        (DiT/improved-DDPM ``SpacedDiffusion``); its timestep_map maps back to original t.
        """
        keep = sorted({int(t) for t in timesteps})
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise DycError(f"respaced timesteps must lie in 0..{self.num_timesteps - 1}")
        last, betas = 1.0, []
        for i in keep:
            betas.append(1.0 - self.alphas_cumprod[i] / last)
            last = self.alphas_cumprod[i]
        return GaussianDiffusion(np.array(betas), timestep_map=self.timestep_map[keep])

    # ---- q ---------------------------------------------------------------------------
    def _at(self, table: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(table, dtype=torch.float64)[t.cpu()].to(device=like.device, dtype=like.dtype)
        return v.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε  (t indexes this process's steps)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (
            self._at(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._at(self.posterior_mean_coef1, t, x_t) * x_start
            + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        )
        return (
            mean,
            self._at(self.posterior_variance, t, x_t),
            self._at(self.posterior_log_variance_clipped, t, x_t),
        )

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (
            self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor
    ) -> torch.Tensor:
        return (self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x_start) / self._at(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    # ---- p ---------------------------------------------------------------------------
    def p_mean_variance(
        self,
        model_out: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        clip_denoised: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Mean and log-variance of p(x_{t-1} | x_t) from a model output (eps, or eps ‖ v when learned).

        Learned variance (``learn_sigma``): v in [-1, 1] interpolates the log-variance between the
        clipped posterior log-variance (v=-1) and log beta_t (v=1), as improved-DDPM/DiT.
        Fixed variance: the clipped posterior variance ("fixedsmall").
        """
        c = x_t.shape[1]
        if model_out.shape[1] == 2 * c:
            eps, v = model_out.split(c, dim=1)
            min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._at(np.log(self.betas), t, x_t)
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        elif model_out.shape[1] == c:
            eps = model_out
            log_var = self._at(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        else:
            raise DycError(f"model output has {model_out.shape[1]} channels for {c}-channel input")
        x0 = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(x0, x_t, t)
        return {"mean": mean, "log_variance": log_var, "pred_xstart": x0, "eps": eps}

    # ---- training ----------------------------------------------------------------------
    def training_losses(
        self,
        model_out: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """DiT's loss per sample: ``mse`` on eps, ``vb`` (bits/dim) when the variance is learned, ``loss``.

        The VLB term sees the eps prediction through a stop-gradient, so it trains only the
        variance while the MSE trains the mean (improved-DDPM's hybrid L_simple + L_vlb; DiT
        weights the two equally).
        """
        c = x_start.shape[1]
        eps = model_out[:, :c]
        terms = {"mse": _mean_flat((noise - eps) ** 2)}
        if model_out.shape[1] == 2 * c:
            frozen = torch.cat([eps.detach(), model_out[:, c:]], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def vb_terms_bpd(
        self, model_out: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits/dim; the decoder NLL at t=0."""
        true_mean, _, true_log_var = self.q_posterior(x_start, x_t, t)
        out = self.p_mean_variance(model_out, x_t, t, clip_denoised=False)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -_mean_flat(
            discretized_gaussian_log_likelihood(
                x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
            )
        ) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ---- sampling ----------------------------------------------------------------------
    def _model_out(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        i: int,
        y: torch.Tensor,
        cfg_scale: float,
        null_class: int | None,
    ) -> torch.Tensor:
        """Model output at this process's step i (called with the original t), with standard CFG."""
        t_orig = torch.full((x.shape[0],), int(self.timestep_map[i]), dtype=torch.long, device=x.device)
        if cfg_scale == 1.0:
            return model_fn(x, t_orig, y)
        if null_class is None:
            raise DycError("classifier-free guidance needs the null class (num_classes of the model)")
        # one doubled batch, conditional half first, as DiT's forward_with_cfg
        out = model_fn(
            torch.cat([x, x]), torch.cat([t_orig, t_orig]), torch.cat([y, torch.full_like(y, null_class)])
        )
        cond, uncond = out.chunk(2)
        c = x.shape[1]
        eps = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])  # standard CFG: every eps channel
        return torch.cat([eps, cond[:, c:]], dim=1)

    @torch.no_grad()
    def ddpm_loop(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        y: torch.Tensor,
        *,
        cfg_scale: float = 1.0,
        null_class: int | None = None,
        clip_denoised: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling over every step of this process (respace first for fewer steps)."""
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, dtype=torch.long)
            out = self.p_mean_variance(
                self._model_out(model_fn, x, i, y, cfg_scale, null_class), x, t, clip_denoised=clip_denoised
            )
            if i == 0:  # no noise on the last step
                x = out["mean"]
            else:
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
                x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * z
        return x

    @torch.no_grad()
    def ddim_loop(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        y: torch.Tensor,
        *,
        cfg_scale: float = 1.0,
        null_class: int | None = None,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """Deterministic DDIM (eta=0) over every step of this process; a learned variance is ignored."""
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, dtype=torch.long)
            out = self.p_mean_variance(
                self._model_out(model_fn, x, i, y, cfg_scale, null_class), x, t, clip_denoised=clip_denoised
            )
            # re-derive eps from the (possibly clipped) x0, as improved-DDPM's ddim_sample does
            eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
            a_prev = self._at(self.alphas_cumprod_prev, t, x)
            x = out["pred_xstart"] * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev) * eps
        return x


def _spaced(sampler: str, steps: int, base: GaussianDiffusion | None) -> GaussianDiffusion:
    base = base or GaussianDiffusion.linear()
    return base.respace(sampler_timesteps(sampler, steps, base.num_timesteps))


def ddim_sample(
    model_fn: ModelFn,
    noise: torch.Tensor,
    y: torch.Tensor,
    steps: int = 50,
    cfg_scale: float = 1.0,
    *,
    null_class: int | None = None,
    clip_denoised: bool = False,
    diffusion: GaussianDiffusion | None = None,
) -> torch.Tensor:
    """DDIM (eta=0) with DiT's ``ddimN`` respacing; CFG when ``cfg_scale != 1`` (needs ``null_class``)."""
    return _spaced("ddim", steps, diffusion).ddim_loop(
        model_fn, noise, y, cfg_scale=cfg_scale, null_class=null_class, clip_denoised=clip_denoised
    )


def ddpm_sample(
    model_fn: ModelFn,
    noise: torch.Tensor,
    y: torch.Tensor,
    steps: int = 250,
    cfg_scale: float = 1.0,
    *,
    null_class: int | None = None,
    clip_denoised: bool = False,
    diffusion: GaussianDiffusion | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Ancestral DDPM over DiT's even respacing ``"N"``, with the learned variance when the model has one."""
    return _spaced("ddpm", steps, diffusion).ddpm_loop(
        model_fn,
        noise,
        y,
        cfg_scale=cfg_scale,
        null_class=null_class,
        clip_denoised=clip_denoised,
        generator=generator,
    )
