"""dyc.diffusion against closed forms: the schedule, q, the posterior, respacing, the losses, the loops."""

import math

import numpy as np
import pytest
import torch

from dyc import diffusion as D
from dyc.timesteps import sampler_timesteps


@pytest.fixture(scope="module")
def gd() -> D.GaussianDiffusion:
    return D.GaussianDiffusion.linear()


def test_linear_schedule_endpoints_and_cumprod(gd):
    assert gd.num_timesteps == 1000
    assert gd.betas[0] == pytest.approx(1e-4) and gd.betas[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(gd.betas), (0.02 - 1e-4) / 999)
    assert gd.alphas_cumprod[9] == pytest.approx(np.prod(1 - gd.betas[:10]), rel=1e-12)
    assert 0 < gd.alphas_cumprod[-1] < 1e-4  # almost pure noise at t=999 (DiT: ~4e-5)


def test_q_sample_is_the_closed_form_and_has_its_statistics(gd):
    x0 = torch.full((20000, 1), 0.7, dtype=torch.float64)
    t = torch.full((20000,), 300)
    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ab = gd.alphas_cumprod[300]
    xt = gd.q_sample(x0, t, noise)
    assert torch.allclose(xt, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise)
    assert xt.mean().item() == pytest.approx(0.7 * math.sqrt(ab), abs=0.02)
    assert xt.std().item() == pytest.approx(math.sqrt(1 - ab), abs=0.02)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_matches_gaussian_product_by_hand(gd, t):
    # q(x_{t-1}|x_t,x_0) ∝ N(x_{t-1}; sqrt(ab_{t-1}) x0, 1-ab_{t-1}) · N(x_t; sqrt(a_t) x_{t-1}, b_t)
    b, a = gd.betas[t], 1 - gd.betas[t]
    ab_prev = gd.alphas_cumprod[t - 1]
    prec = 1 / (1 - ab_prev) + a / b
    x0, xt = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[-1.2]], dtype=torch.float64)
    want_mean = (math.sqrt(ab_prev) * 0.3 / (1 - ab_prev) + math.sqrt(a) * -1.2 / b) / prec
    mean, var, log_var = gd.q_posterior(x0, xt, torch.tensor([t]))
    assert var.item() == pytest.approx(1 / prec, rel=1e-9)
    assert mean.item() == pytest.approx(want_mean, rel=1e-9)
    assert log_var.item() == pytest.approx(math.log(1 / prec), rel=1e-9)


def test_posterior_log_variance_is_clipped_at_zero(gd):
    assert gd.posterior_variance[0] == 0.0
    assert gd.posterior_log_variance_clipped[0] == pytest.approx(math.log(gd.posterior_variance[1]))


def test_respacing_keeps_alphas_cumprod_at_kept_steps(gd):
    ts = sampler_timesteps("ddim", 50)  # 980, 960, ..., 0
    sp = gd.respace(ts)
    assert list(sp.timestep_map) == sorted(ts)
    assert np.allclose(sp.alphas_cumprod, gd.alphas_cumprod[sorted(ts)], rtol=1e-12)
    assert sp.betas[0] == pytest.approx(gd.betas[0])  # step 0 is kept: its beta is the original
    sp250 = gd.respace(sampler_timesteps("ddpm", 250))
    assert list(sp250.timestep_map[:3]) == [0, 4, 8] and sp250.timestep_map[-1] == 999


def test_learned_range_variance_interpolates_between_posterior_and_beta(gd):
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([400])
    for v, want in [(-1.0, gd.posterior_log_variance_clipped[400]), (1.0, math.log(gd.betas[400]))]:
        out = gd.p_mean_variance(torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1), x, t)
        assert torch.allclose(out["log_variance"], torch.full_like(x, want))
    mid = gd.p_mean_variance(torch.cat([torch.zeros_like(x), torch.zeros_like(x)], 1), x, t)["log_variance"]
    halfway = 0.5 * (gd.posterior_log_variance_clipped[400] + math.log(gd.betas[400]))
    assert mid[0, 0, 0, 0].item() == pytest.approx(halfway)


def test_normal_kl_and_discretized_likelihood_closed_forms():
    m1, lv1, m2, lv2 = map(torch.tensor, (0.3, math.log(0.5), -0.2, math.log(2.0)))
    want = math.log(math.sqrt(2.0) / math.sqrt(0.5)) + (0.5 + 0.25) / (2 * 2.0) - 0.5
    assert D.normal_kl(m1, lv1, m2, lv2).item() == pytest.approx(want, rel=1e-6)
    assert D.normal_kl(m1, lv1, m1, lv1).item() == pytest.approx(0.0, abs=1e-7)
    # the 256 bins of 8-bit data in [-1, 1] carry the whole probability mass
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)
    ll = D.discretized_gaussian_log_likelihood(x, torch.full_like(x, 0.1), torch.full_like(x, math.log(0.3)))
    assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-3)


def test_hybrid_loss_mse_trains_eps_and_vb_only_the_variance(gd):
    torch.manual_seed(0)
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    t = torch.tensor([0, 5, 300, 999])
    noise = torch.randn_like(x0)
    xt = gd.q_sample(x0, t, noise)
    out = torch.cat([noise.clone(), torch.zeros_like(x0)], 1).requires_grad_(True)
    terms = gd.training_losses(out, x0, xt, t, noise)
    assert torch.allclose(terms["mse"], torch.zeros(4))  # perfect eps
    # perfect mean: the KL left is the variance mismatch, which vanishes at t=999 where posterior ≈ beta
    assert (terms["vb"][:3] > 0).all() and terms["vb"][3] >= 0
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    terms["vb"].sum().backward()
    assert out.grad[:, :1].abs().max() == 0  # the stop-gradient on the mean
    assert out.grad[:, 1:].abs().max() > 0
    fixed = gd.training_losses(noise + 0.1, x0, xt, t, noise)  # no variance channels: plain MSE
    assert "vb" not in fixed and torch.allclose(fixed["loss"], torch.full((4,), 0.01))


def _oracle(x_star: torch.Tensor, gd: D.GaussianDiffusion, learn_sigma: bool):
    """The exact eps for data that is the single point x*, at original timestep t."""

    def fn(x, t, y):
        ab = torch.as_tensor(gd.alphas_cumprod, dtype=x.dtype)[t].reshape(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * x_star) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learn_sigma else eps

    return fn


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_loops_recover_a_point_mass_with_the_oracle(gd, sampler):
    x_star = torch.tensor([0.5, -0.25, 0.0, 0.75], dtype=torch.float64).reshape(1, 1, 2, 2)
    noise = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    if sampler == "ddim":
        out = D.ddim_sample(_oracle(x_star, gd, False), noise, y, steps=10)
    else:
        out = D.ddpm_sample(_oracle(x_star, gd, True), noise, y, steps=20, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(out, x_star.expand(3, -1, -1, -1), atol=1e-6)


def test_model_is_called_with_original_timesteps_and_cfg_doubles_the_batch(gd):
    seen = []

    def fn(x, t, y):
        seen.append((x.shape[0], int(t[0]), y.tolist()))
        # conditional eps 1, unconditional 0 (null class 10); variance channel 0
        eps = (y != 10).to(x.dtype).reshape(-1, 1, 1, 1).expand_as(x)
        return torch.cat([eps, torch.zeros_like(x)], 1)

    noise = torch.zeros(2, 1, 2, 2)
    D.ddim_sample(fn, noise, torch.tensor([3, 4]), steps=5, cfg_scale=4.0, null_class=10)
    assert [s[1] for s in seen] == sampler_timesteps("ddim", 5)  # 800, 600, ... : original t
    assert all(s[0] == 4 and s[2] == [3, 4, 10, 10] for s in seen)
    sp = gd.respace(sampler_timesteps("ddim", 5))
    out = sp._model_out(fn, noise, 4, torch.tensor([3, 4]), 4.0, 10)
    assert torch.allclose(out[:, :1], torch.full((2, 1, 2, 2), 4.0))  # 0 + 4 * (1 - 0): all eps channels
    seen.clear()
    D.ddim_sample(fn, noise, torch.tensor([3, 4]), steps=5)
    assert all(s[0] == 2 for s in seen)  # no guidance: no doubled batch
    with pytest.raises(Exception, match="null class"):
        D.ddim_sample(fn, noise, torch.tensor([3, 4]), steps=5, cfg_scale=2.0)
