"""The runtime's step-wise samplers and CFG against the eager reference loops of dyc.diffusion.

Everything here runs the *uncompiled* model: it checks the sampler maths and the guidance, not
the engines (test_runtime_pipeline.py does that). fp32, max abs error ≤ 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from runtime_fixtures import tame_config, tame_model

from dyc import diffusion as D
from dyc.errors import DycError
from dyc.runtime.cfg import cfg_combine, cfg_inputs
from dyc.runtime.samplers import make_sampler
from dyc.runtime.scheduler import GroupSpec, Scheduler
from dyc.timesteps import sampler_timesteps

TOL = 1e-4
# diffusers (the DPM-Solver++ reference) trips a numpy-2 copy= deprecation inside its scheduler
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    cfg = tame_config()
    model = tame_model(cfg)
    noise = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 5, 9])
    return cfg, model, noise, y


def run_runtime_sampler(model, cfg, name, steps, noise, y, scale=1.0, official=False, seed=3):
    """The pipeline's loop without engines: sampler + CFG over the eager model."""
    s = make_sampler(name, steps)
    x, gen = noise.clone(), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, t in enumerate(s.timesteps):
            xx, yy = cfg_inputs(x, y, cfg.num_classes) if scale != 1.0 else (x, y)
            out = model(xx, torch.full((xx.shape[0],), t), yy)
            if scale != 1.0:
                out = cfg_combine(out, cfg.in_channels, scale, official)
            x = s.step(i, x, out, gen)
    return x


@pytest.mark.parametrize("scale", [1.0, 4.0])
@pytest.mark.parametrize("steps", [25, 13])  # 25: DiT's ddim25 stride 40; 13: no integer stride -> even spacing
def test_ddim_matches_reference(setup, steps, scale):
    cfg, model, noise, y = setup
    ref = D.ddim_sample(model, noise, y, steps=steps, cfg_scale=scale, null_class=cfg.num_classes)
    got = run_runtime_sampler(model, cfg, "ddim", steps, noise, y, scale)
    assert (got - ref).abs().max().item() <= TOL
    assert ref.abs().max() > 0.1  # a real trajectory, not a collapse to 0


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_ddpm_learned_variance_matches_reference(setup, scale):
    cfg, model, noise, y = setup
    ref = D.ddpm_sample(model, noise, y, steps=30, cfg_scale=scale, null_class=cfg.num_classes,
                        generator=torch.Generator().manual_seed(3))
    got = run_runtime_sampler(model, cfg, "ddpm", 30, noise, y, scale, seed=3)
    assert (got - ref).abs().max().item() <= TOL
    # the learned variance matters: the fixed-variance chain (v ignored) ends elsewhere
    fixed = D.ddpm_sample(lambda x, t, yy: model(x, t, yy)[:, :cfg.in_channels], noise, y, steps=30,
                          cfg_scale=scale, null_class=cfg.num_classes, generator=torch.Generator().manual_seed(3))
    assert (fixed - ref).abs().max().item() > 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks that a step never blocks the host")
@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpm-solver++"])
def test_sampler_steps_on_cuda_match_the_cpu_chain_without_blocking(setup, name):
    """On CUDA a step must not wait for the GPU (the pipeline relies on it to prepare the next step while
    the GPU computes this one): torch's sync debug mode turns any blocking copy or sync into an error.
    The chain must still be the CPU chain, which the tests above check against the reference loops."""
    import copy

    cfg, model, noise, y = setup
    want = run_runtime_sampler(model, cfg, name, 13, noise, y, 4.0)
    gpu = copy.deepcopy(model).cuda()
    s = make_sampler(name, 13)
    x, yy, gen = noise.cuda(), y.cuda(), torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, t in enumerate(s.timesteps):
            xx, yc = cfg_inputs(x, yy, cfg.num_classes)
            out = cfg_combine(gpu(xx, torch.full((xx.shape[0],), t, device="cuda"), yc), cfg.in_channels, 4.0)
            torch.cuda.set_sync_debug_mode("error")
            try:
                x = s.step(i, x, out, gen)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(x.cpu(), want, rtol=1e-4, atol=1e-4)


def test_ddpm_default_is_250_steps():
    assert make_sampler("ddpm").timesteps == sampler_timesteps("ddpm", 250)
    assert make_sampler("ddpm").timesteps[:3] == [999, 995, 991]


def _diffusers_dpm(model_eps, noise, timesteps):
    from diffusers import DPMSolverMultistepScheduler

    sch = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                      beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
                                      final_sigmas_type="zero")
    sch.set_timesteps(timesteps=timesteps)
    x = noise.clone()
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(model_eps(x, int(t)), t, x).prev_sample
    return x


@pytest.mark.parametrize("scale", [1.0, 4.0])
@pytest.mark.parametrize("steps", [20, 10])
def test_dpm_solver_pp_matches_diffusers(setup, steps, scale):
    """DPM-Solver++ 2M over DiT's respacing vs diffusers' DPMSolverMultistepScheduler on the same t's."""
    pytest.importorskip("diffusers")
    cfg, model, noise, y = setup
    c = cfg.in_channels

    def eps(x, t):
        if scale == 1.0:
            return model(x, torch.full((x.shape[0],), t), y)[:, :c]
        xx, yy = cfg_inputs(x, y, cfg.num_classes)
        return cfg_combine(model(xx, torch.full((xx.shape[0],), t), yy), c, scale)[:, :c]

    s = make_sampler("dpm-solver++", steps)
    ref = _diffusers_dpm(eps, noise, s.timesteps)
    got = run_runtime_sampler(model, cfg, "dpm-solver++", steps, noise, y, scale)
    assert (got - ref).abs().max().item() <= TOL


def test_solver_orders_on_the_gaussian_flow():
    """Data N(0, s²): the optimal eps is linear in x and the probability-flow ODE has a closed form,
    x_0 = x_T · s / sqrt(ᾱ_T s² + 1 - ᾱ_T). Halving the step size must halve DDIM's error (first
    order) and quarter DPM-Solver++ 2M's (second order): the solver maths, checked from first principles."""
    s2 = 0.25
    acp = make_sampler("ddim", 1000).acp[::-1].copy()  # ᾱ indexed by t

    def solve(name: str, steps: int) -> float:
        smp = make_sampler(name, steps)
        x_t = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        a0 = acp[smp.timesteps[0]]
        exact = x_t * (s2**0.5 / np.sqrt(a0 * s2 + 1 - a0))
        x = x_t.clone()
        for i, t in enumerate(smp.timesteps):
            x = smp.step(i, x, x * (np.sqrt(1 - acp[t]) / (acp[t] * s2 + 1 - acp[t])))
        return (x - exact).abs().max().item()

    ddim = solve("ddim", 40) / solve("ddim", 80)
    dpm = solve("dpm-solver++", 40) / solve("dpm-solver++", 80)
    assert 1.7 < ddim < 2.3, ddim
    assert 3.3 < dpm < 4.7, dpm
    assert solve("dpm-solver++", 160) < 0.5 * solve("ddim", 160)  # and already ahead at 160 steps


def _official_forward_with_cfg(model, scale):
    """DiT's forward_with_cfg, verbatim in structure: guides model_out[:, :3] only."""

    def fn(x, t, y):
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = model(combined, t, y)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)

    return fn


def test_official_cfg_matches_dit_forward_with_cfg(setup):
    cfg, model, noise, y = setup
    scale = 4.0
    fn = _official_forward_with_cfg(model, scale)
    # DiT's sample.py: the doubled batch runs through the sampler; keep the conditional half
    y2 = torch.cat([y, torch.full_like(y, cfg.num_classes)])
    ref = D.ddim_sample(fn, torch.cat([noise, noise]), y2, steps=20)[: len(y)]
    got = run_runtime_sampler(model, cfg, "ddim", 20, noise, y, scale, official=True)
    assert (got - ref).abs().max().item() <= TOL
    standard = run_runtime_sampler(model, cfg, "ddim", 20, noise, y, scale, official=False)
    assert (standard - got).abs().max().item() > 1e-2  # the two variants differ (channel 3 is guided or not)


def test_cfg_combine_channels():
    cond = torch.randn(2, 8, 4, 4)
    uncond = torch.randn(2, 8, 4, 4)
    out = torch.cat([cond, uncond])
    std = cfg_combine(out, 4, 3.0)
    assert torch.allclose(std[:, :4], uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4]))
    assert torch.equal(std[:, 4:], cond[:, 4:])
    off = cfg_combine(out, 4, 3.0, official=True)
    assert torch.equal(off[:, :3], std[:, :3]) and torch.equal(off[:, 3:], cond[:, 3:])


def test_sampler_bad_input():
    with pytest.raises(DycError, match="steps must be positive"):
        make_sampler("ddim", 0)
    with pytest.raises(DycError, match="unknown sampler"):
        make_sampler("euler", 10)
    with pytest.raises(DycError, match="whole number"):
        make_sampler("ddim", 2.5)


# ---- scheduler ----------------------------------------------------------------------------------
def _specs(ranges, takes=("head_mask",)):
    heads = [[0, 2], [0, 1, 3]]  # 2 layers, 4 heads: union layouts
    return [GroupSpec(i, lo, hi, heads, heads, ("x", "t", "y", *takes)) for i, (lo, hi) in enumerate(ranges)]


def test_scheduler_maps_t_and_builds_slot_masks():
    hm = np.zeros((1000, 2, 4), dtype=np.float32)
    hm[:, :, 0] = 1
    hm[700, 0, 2] = 1
    hm[700, 1, 3] = 1
    s = Scheduler(_specs([(0, 499), (500, 999)]), hm, hm)
    g, feeds = s.inputs(700, torch.zeros(3, 4, 8, 8), torch.tensor([1, 2, 3]))
    assert g.index == 1 and set(feeds) == {"x", "t", "y", "head_mask"}
    assert feeds["t"].tolist() == [700] * 3 and feeds["t"].dtype == torch.int64
    # slot j of layer l = mask of heads[l][j]; layer 0 keeps heads 0,2 -> slots (1, 1, pad 0)
    assert feeds["head_mask"][0].tolist() == [[1, 1, 0], [1, 0, 1]]
    assert s.check_schedule([999, 500, 499, 0]) == [1, 1, 0, 0]
    # the next call at the same t and batch reuses the mask tensor; another batch or t gets its own
    again = s.inputs(700, torch.ones(3, 4, 8, 8), torch.tensor([1, 2, 3]))[1]
    assert again["head_mask"] is feeds["head_mask"] and torch.equal(again["x"], torch.ones(3, 4, 8, 8))
    other = s.inputs(700, torch.zeros(2, 4, 8, 8), torch.tensor([1, 2]))[1]["head_mask"]
    assert other.shape == (2, 2, 3) and other[0].tolist() == [[1, 1, 0], [1, 0, 1]]
    assert s.inputs(600, torch.zeros(3, 4, 8, 8), torch.tensor([1, 2, 3]))[1]["head_mask"][0].tolist() == [
        [1, 0, 0], [1, 0, 0]]


def test_scheduler_omits_masks_that_switch_on_the_whole_union():
    hm = np.zeros((1000, 2, 4), dtype=np.float32)
    hm[:, :, 0] = 1
    hm[800, 0, [0, 2]] = 1  # t = 800 switches on all of group 1's union: heads (0, 2) and (0, 1, 3)
    hm[800, 1, [0, 1, 3]] = 1
    hm[900, 0, [0, 2]] = 1  # t = 900: layer 1 misses head 1 -> the mask stays
    hm[900, 1, [0, 3]] = 1
    s = Scheduler(_specs([(0, 499), (500, 999)]), hm, hm)
    x, y = torch.zeros(2, 4, 8, 8), torch.tensor([1, 2])
    assert s.full_width(800, s.group_of(800), "head_mask") and not s.full_width(900, s.group_of(900), "head_mask")
    assert set(s.inputs(800, x, y, omit_full_masks=True)[1]) == {"x", "t", "y"}
    assert set(s.inputs(800, x, y)[1]) == {"x", "t", "y", "head_mask"}  # engines that need it still get it
    assert s.inputs(900, x, y, omit_full_masks=True)[1]["head_mask"][0].tolist() == [[1, 1, 0], [1, 0, 1]]


def test_scheduler_t_outside_every_group_fails():
    s = Scheduler(_specs([(0, 499)], takes=()))
    with pytest.raises(DycError, match="timestep 750 is outside every group"):
        s.group_of(750)
    with pytest.raises(DycError, match="overlaps"):
        Scheduler(_specs([(0, 600), (500, 999)], takes=()))
    with pytest.raises(DycError, match="no per-t masks"):
        Scheduler(_specs([(0, 999)]))
