"""Sampler timestep schedules: which original timesteps t in 0..T-1 a sampler calls the model at.

DiT's respacing (DESIGN.md §3): a sampler with N steps uses a subset of the 1000 training
timesteps and always calls the model with the *original* t.
"""

from __future__ import annotations

from .errors import UsageError

NUM_TRAIN_TIMESTEPS = 1000
SAMPLERS = ("ddpm", "ddim", "dpm-solver++")
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm-solver++": 20}


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """DiT/improved-diffusion's respacing: ``"250"`` -> 0,4,…,995,999; ``"ddim50"`` -> 0,20,…,980."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise UsageError(f"cannot take exactly {desired} DDIM steps from {num_timesteps} with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise UsageError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


def check_sampler(sampler: str) -> str:
    s = sampler.lower()
    if s in ("dpmsolver++", "dpm++", "dpmpp"):
        s = "dpm-solver++"
    if s not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    return s


def sampler_timesteps(sampler: str, steps: int | None = None, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """Original timesteps a sampler visits, in sampling order (descending t).

    DDIM uses DiT's ``ddimN`` stride (0, 20, …, 980 for 50) when an integer stride gives
    exactly N steps, else the even respacing ``"N"``; DDPM and DPM-Solver++ use ``"N"``.
    """
    sampler = check_sampler(sampler)
    steps = DEFAULT_STEPS[sampler] if steps is None else int(steps)
    if steps <= 0:
        raise UsageError(f"steps must be positive, got {steps}")
    if steps > num_timesteps:
        raise UsageError(f"steps must be at most {num_timesteps}, got {steps}")
    spec = str(steps)
    if sampler == "ddim" and any(len(range(0, num_timesteps, s)) == steps for s in range(1, num_timesteps)):
        spec = f"ddim{steps}"
    return sorted(space_timesteps(num_timesteps, spec), reverse=True)
