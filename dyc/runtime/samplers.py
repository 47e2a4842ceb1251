"""Step-wise samplers over DiT's respaced schedules: DDPM (learned variance), DDIM (η=0), DPM-Solver++ 2M.

A sampler is driven one model call at a time (the runtime switches engines between calls):
``for i, t in enumerate(s.timesteps): x = s.step(i, x, model(x, t))``. ``timesteps`` holds the
*original* t of each call in sampling order (``dyc.timesteps.sampler_timesteps``, DESIGN.md §3).

Why not diffusers' schedulers: they keep ᾱ in float32 (the ᾱ≈4e-5 end of the schedule then
loses digits that a 250-step chain accumulates), and their DPM-Solver learned-variance branch
keeps ``model_output[:, :3]`` (three channels, whatever the model has). The maths here is
DiT/improved-DDPM's, with float64 tables as ``dyc.diffusion``; the tests check every sampler
against ``dyc.diffusion``'s loops and DPM-Solver++ also against diffusers (given eps only).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import DycError, UsageError
from ..noise_schedule import linear_alphas_cumprod
from ..timesteps import NUM_TRAIN_TIMESTEPS, check_sampler, sampler_timesteps


class Sampler(ABC):
    """One sampling chain over ``timesteps`` (original t per model call, descending)."""

    name: str

    def __init__(self, timesteps: Sequence[int], alphas_cumprod: np.ndarray | None = None):
        self.timesteps = [int(t) for t in timesteps]
        if not self.timesteps:
            raise DycError("a sampler needs at least one step")
        if any(a <= b for a, b in zip(self.timesteps[:-1], self.timesteps[1:], strict=True)):
            raise DycError("sampler timesteps must be strictly decreasing")
        acp = linear_alphas_cumprod() if alphas_cumprod is None else np.asarray(alphas_cumprod, np.float64)
        if self.timesteps[0] >= len(acp) or self.timesteps[-1] < 0:
            raise DycError(f"sampler timesteps must lie in 0..{len(acp) - 1}")
        # ᾱ at each call and at the step after it (the respaced process's ᾱ_prev; 1 after the last)
        self.acp = acp[self.timesteps]
        self.acp_next = np.append(self.acp[1:], 1.0)

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def needs_generator(self) -> bool:
        """Whether ``step`` draws noise (DDPM)."""
        return False

    @abstractmethod
    def step(self, i: int, x: torch.Tensor, model_out: torch.Tensor, generator: torch.Generator | None = None
             ) -> torch.Tensor:
        """x at call i and the model output there (eps, or eps ‖ v with a learned variance) -> next x."""

    # shared maths: x0 from eps, in the operation order of improved-DDPM (what the reference does)
    def _x0(self, i: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a = self.acp[i]
        return _c(math.sqrt(1.0 / a), x) * x - _c(math.sqrt(1.0 / a - 1.0), x) * eps


def _c(v: float, like: torch.Tensor) -> float:
    """A float64 table value rounded to the latents' dtype, as the reference casts it, kept on the host.

    A Python scalar enters the GPU kernel as that same value (it is exact in the dtype), so the maths
    is the reference's; a device scalar would cost a blocking host-to-device copy per coefficient,
    which stalls the host every step and leaves the GPU idle while it prepares the next one.
    """
    return torch.tensor(v, dtype=torch.float64).to(like.dtype).item()


def _d(v: float, like: torch.Tensor) -> torch.Tensor:
    """``_c`` as a 0-dim tensor on the latents' device, for a divisor: dividing by a host scalar runs as a
    multiplication by its reciprocal on CUDA, which rounds differently from the reference's division.
    Filled on the device, so no copy blocks the host."""
    return torch.full((), _c(v, like), dtype=like.dtype, device=like.device)


def _eps(x: torch.Tensor, model_out: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    if model_out.shape[1] not in (c, 2 * c):
        raise DycError(f"model output has {model_out.shape[1]} channels for {c}-channel latents")
    return model_out[:, :c]


class DDPMSampler(Sampler):
    """Ancestral DDPM over a respaced process, with DiT's learned variance when the model has one.

    Learned range: v ∈ [-1, 1] interpolates log σ² between the clipped posterior log-variance
    (v = -1) and log β of the respaced step (v = 1). Without v: the clipped posterior variance.
    """

    name = "ddpm"

    def __init__(self, timesteps: Sequence[int], alphas_cumprod: np.ndarray | None = None):
        super().__init__(timesteps, alphas_cumprod)
        a, ap = self.acp, self.acp_next
        self.betas = 1.0 - a / ap  # betas of the respaced process
        pv = self.betas * (1.0 - ap) / (1.0 - a)
        # posterior variance is 0 at the last step: clip its log to the step before's (improved-DDPM)
        self.log_pv = np.log(np.where(np.arange(len(pv)) == len(pv) - 1, pv[-2] if len(pv) > 1 else self.betas[-1],
                                      pv))
        self.coef1 = self.betas * np.sqrt(ap) / (1.0 - a)
        self.coef2 = (1.0 - ap) * np.sqrt(1.0 - self.betas) / (1.0 - a)

    @property
    def needs_generator(self) -> bool:
        return True

    def step(self, i: int, x: torch.Tensor, model_out: torch.Tensor, generator: torch.Generator | None = None
             ) -> torch.Tensor:
        c = x.shape[1]
        eps = _eps(x, model_out)
        mean = _c(self.coef1[i], x) * self._x0(i, x, eps) + _c(self.coef2[i], x) * x
        if i == len(self) - 1:  # no noise on the last step
            return mean
        min_log = _c(self.log_pv[i], x)
        if model_out.shape[1] == 2 * c:
            frac = (model_out[:, c:] + 1) / 2
            log_var = frac * _c(math.log(self.betas[i]), x) + (1 - frac) * min_log
        else:
            log_var = torch.full_like(x, min_log)
        # drawn on the CPU with the caller's generator: the same noise on every backend and device
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu")
        if x.is_cuda:  # from pinned memory, so the copy does not block the host (the allocator keeps z alive)
            z = z.pin_memory().to(x.device, non_blocking=True)
        return mean + torch.exp(0.5 * log_var) * z


class DDIMSampler(Sampler):
    """Deterministic DDIM (η = 0); a learned variance is ignored."""

    name = "ddim"

    def step(self, i: int, x: torch.Tensor, model_out: torch.Tensor, generator: torch.Generator | None = None
             ) -> torch.Tensor:
        x0 = self._x0(i, x, _eps(x, model_out))
        a = self.acp[i]
        # eps re-derived from x0, as improved-DDPM's ddim_sample (it matters once x0 is clipped)
        eps = (_c(math.sqrt(1.0 / a), x) * x - x0) / _d(math.sqrt(1.0 / a - 1.0), x)
        # ᾱ_prev in the latents' dtype, then sqrt: the reference's rounding (IEEE sqrt, as on the device)
        ap = torch.tensor(self.acp_next[i], dtype=torch.float64).to(x.dtype)
        return x0 * torch.sqrt(ap).item() + torch.sqrt(1 - ap).item() * eps


class DPMSolverPPSampler(Sampler):
    """DPM-Solver++ (2M): multistep second order in the data prediction, log-SNR time λ = log(α/σ).

    Call i goes from t_i to t_{i+1}; the last call goes to σ = 0 and returns its x0 prediction
    (first order there, as diffusers' ``final_sigmas_type="zero"``); the first call is first order
    too (no history yet). The midpoint form of the second-order correction (diffusers' default).
    """

    name = "dpm-solver++"

    def __init__(self, timesteps: Sequence[int], alphas_cumprod: np.ndarray | None = None):
        super().__init__(timesteps, alphas_cumprod)
        self.alpha = np.sqrt(self.acp)
        self.sigma = np.sqrt(1.0 - self.acp)
        self.lam = np.log(self.alpha) - np.log(self.sigma)
        self._prev_x0: torch.Tensor | None = None

    def step(self, i: int, x: torch.Tensor, model_out: torch.Tensor, generator: torch.Generator | None = None
             ) -> torch.Tensor:
        eps = _eps(x, model_out)
        x0 = (x - _c(self.sigma[i], x) * eps) / _d(self.alpha[i], x)
        prev, self._prev_x0 = self._prev_x0, x0
        if i == 0:
            prev = None
        if i == len(self) - 1:  # σ_next = 0: the solution is the data prediction itself
            self._prev_x0 = None
            return x0
        h = self.lam[i + 1] - self.lam[i]
        phi = math.expm1(-h)  # e^{-h} - 1, accurate for small h
        xn = _c(self.sigma[i + 1] / self.sigma[i], x) * x - _c(self.alpha[i + 1] * phi, x) * x0
        if prev is not None:
            r = (self.lam[i] - self.lam[i - 1]) / h
            d1 = (x0 - prev) / _d(r, x)
            xn = xn - _c(0.5 * self.alpha[i + 1] * phi, x) * d1
        return xn


_SAMPLERS: dict[str, type[Sampler]] = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "dpm-solver++": DPMSolverPPSampler}


def make_sampler(name: str, steps: int | None = None, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Sampler:
    """A fresh sampler: ``name`` in ddpm / ddim / dpm-solver++, ``steps`` None for its default count."""
    name = check_sampler(name)
    if steps is not None and (isinstance(steps, bool) or int(steps) != steps):
        raise UsageError(f"steps must be a whole number, got {steps!r}")
    return _SAMPLERS[name](sampler_timesteps(name, steps, num_timesteps), linear_alphas_cumprod(num_timesteps))
