"""DiT's linear β schedule: one definition (dyc.noise_schedule) that every user of it takes."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from dyc import noise_schedule
from dyc.compiler import analyse
from dyc.diffusion import GaussianDiffusion
from dyc.runtime import samplers

DYC = Path(__file__).resolve().parents[1] / "dyc"


def test_values_by_hand():
    b = noise_schedule.linear_betas()
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == 1e-4 and math.isclose(b[-1], 0.02, rel_tol=1e-15)
    assert math.isclose(b[500], 1e-4 + 500 * (0.02 - 1e-4) / 999, rel_tol=1e-13)
    acp = noise_schedule.linear_alphas_cumprod()
    prod = 1.0
    for t in range(1000):
        prod *= 1.0 - (1e-4 + t * (0.02 - 1e-4) / 999)
        if t in (0, 19, 999):
            assert math.isclose(acp[t], prod, rel_tol=1e-12)
    # other T keep the same total noise: β scaled by 1000 / T (ADM, DiT)
    assert math.isclose(noise_schedule.linear_betas(250)[-1], 0.08, rel_tol=1e-15)


def test_every_user_takes_the_one_definition():
    acp = noise_schedule.linear_alphas_cumprod()
    np.testing.assert_array_equal(GaussianDiffusion.linear().alphas_cumprod, acp)
    ddim = samplers.make_sampler("ddim", 50)
    np.testing.assert_array_equal(ddim.acp, acp[ddim.timesteps])
    assert samplers.linear_alphas_cumprod is noise_schedule.linear_alphas_cumprod
    assert analyse.linear_alphas_cumprod is noise_schedule.linear_alphas_cumprod
    # no second copy of the schedule's end points anywhere else in the package
    pat = re.compile(r"1e-4\s*,\s*[^,]*0\.02")
    copies = [p.relative_to(DYC).as_posix() for p in DYC.rglob("*.py")
              if p.name != "noise_schedule.py" and pat.search(p.read_text())]
    assert not copies, f"the linear β schedule is written again in {copies}"
