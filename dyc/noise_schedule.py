"""DiT's training noise schedule (DESIGN.md §3): linear β from 1e-4 to 0.02 over T = 1000 steps.

The one definition: the reference diffusion maths (``dyc.diffusion``), the runtime's samplers and the
compiler's calibration trajectory all take their tables from here, in float64.
"""

from __future__ import annotations

import numpy as np

from .timesteps import NUM_TRAIN_TIMESTEPS

BETA_START = 1e-4
BETA_END = 0.02


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS, start: float = BETA_START,
                 end: float = BETA_END) -> np.ndarray:
    """β_t, linear; scaled by 1000/T so other T keep the same total noise (as ADM/DiT), float64 [T]."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * start, scale * end, num_timesteps, dtype=np.float64)


def linear_alphas_cumprod(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """ᾱ_t = ∏_{s≤t} (1 − β_s) of :func:`linear_betas`, float64 [T]."""
    return np.cumprod(1.0 - linear_betas(num_timesteps))
