"""The sampling math (``t2ialign.sampling.flow``) against closed forms and independent computations,
and the sampling loops (``t2ialign.sampling.sample``) on a tiny random generator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from model_helpers import one_thread, tiny_generator
from t2ialign.models import Cond
from t2ialign.sampling import generate_images, initial_noise, sample_ode
from t2ialign.sampling.flow import (
    add_noise,
    cfg,
    euler_step,
    flow_matching_loss,
    gaussian_kl_same_std,
    gaussian_log_prob,
    sde_mean_std,
    sde_sigma,
    sde_step,
    time_grid,
    velocity_target,
    x0_from_velocity,
)

PROMPTS = ["a red circle", "two blue squares on a white background", "a green triangle left of a square"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def model():
    return tiny_generator(seed=3)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- flow math -------------------------------------------------------------------------------------


def test_noise_velocity_and_x0_are_consistent():
    x0, eps = _randn(4, 3, 5, 5, seed=1), _randn(4, 3, 5, 5, seed=2)
    s = torch.tensor([0.0, 0.3, 0.7, 1.0])
    xs = add_noise(x0, eps, s)
    assert torch.allclose(xs[0], x0[0]) and torch.allclose(xs[3], eps[3])
    assert torch.allclose(xs[1], 0.7 * x0[1] + 0.3 * eps[1])
    v = velocity_target(x0, eps)
    assert torch.allclose(x0_from_velocity(v, xs, s), x0, atol=1e-6)
    # with the true velocity, one Euler step of any size stays on the straight line
    assert torch.allclose(
        euler_step(v[2:3], s[2], s[1], xs[2:3]), add_noise(x0[2:3], eps[2:3], s[1]), atol=1e-6
    )


def test_flow_matching_loss_closed_form():
    x0 = torch.zeros(2, 3, 4, 4)
    eps = torch.ones(2, 3, 4, 4)
    v = torch.zeros(2, 3, 4, 4)
    v[1] = 3.0  # target eps - x0 = 1: errors -1 and 2 in every dimension
    assert torch.allclose(flow_matching_loss(v, x0, eps), torch.tensor([1.0, 4.0]))
    # hand-computed case: one sample, two dims, errors (0.5, -1) -> mean of squares 0.625
    out = flow_matching_loss(
        torch.tensor([[1.5, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    )
    assert out.shape == (1,) and math.isclose(out.item(), 0.625, rel_tol=1e-6)
    # zero at the true velocity
    x0, eps = _randn(3, 3, 4, 4, seed=4), _randn(3, 3, 4, 4, seed=5)
    assert flow_matching_loss(eps - x0, x0, eps).abs().max() == 0


def test_time_grid_and_cfg():
    g = time_grid(4)
    assert torch.allclose(g, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = time_grid(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted[1:-1] > g[1:-1]).all()
    with pytest.raises(ValueError, match="steps"):
        time_grid(0)
    vu, vc = _randn(2, 3, seed=6), _randn(2, 3, seed=7)
    assert torch.allclose(cfg(vu, vc, 1.0), vc) and torch.equal(cfg(vu, vc, 0.0), vu)
    assert torch.allclose(cfg(vu, vc, 3.0), vu + 3 * (vc - vu))


def _reference_mean_std(v, s, s_next, x, a, s_cap):
    """METHODS.md section 2, written out with Python floats."""
    dt = s_next - s
    sigma = a * math.sqrt(s / (1 - (s_cap if s >= 1 else s)))
    mean = x * (1 + sigma**2 * dt / (2 * s)) + v * (1 + sigma**2 * (1 - s) / (2 * s)) * dt
    return mean, sigma * math.sqrt(-dt)


@pytest.mark.parametrize("s, s_next", [(0.6, 0.55), (0.95, 0.9), (1.0, 0.9)])
def test_sde_step_log_prob_is_the_gaussian_density(s, s_next):
    a, s_cap = 0.7, 0.9
    x, v, noise = _randn(3, 3, 4, 4, seed=8), _randn(3, 3, 4, 4, seed=9), _randn(3, 3, 4, 4, seed=10)
    x_next, logp, mean, std = sde_step(v, s, s_next, x, a, s_cap, noise=noise)
    ref_mean, ref_std = _reference_mean_std(v, s, s_next, x, a, s_cap)
    assert torch.allclose(mean, ref_mean, atol=1e-6)
    assert torch.allclose(std, torch.full_like(std, ref_std))
    assert torch.allclose(x_next, ref_mean + ref_std * noise, atol=1e-6)
    # independent density: torch.distributions.Normal, averaged over dimensions (METHODS.md)
    ref = Normal(ref_mean, ref_std).log_prob(x_next).flatten(1).mean(1)
    assert logp.shape == (3,)
    assert torch.allclose(logp, ref, atol=1e-5)
    # re-evaluating a stored x_next draws no noise and gives the same log-probability
    x2, logp2, _, _ = sde_step(v, s, s_next, x, a, s_cap, x_next=x_next)
    assert torch.equal(x2, x_next) and torch.allclose(logp2, logp)
    # the joint log-density is the mean times the number of dimensions
    joint = Normal(ref_mean, ref_std).log_prob(x_next).flatten(1).sum(1)
    assert torch.allclose(logp * x[0].numel(), joint, rtol=1e-5)


def test_sde_step_per_sample_noise_levels():
    a, s_cap = 0.7, 0.95
    s, s_next = torch.tensor([1.0, 0.5]), torch.tensor([0.95, 0.45])
    x, v, noise = _randn(2, 3, 4, 4, seed=11), _randn(2, 3, 4, 4, seed=12), _randn(2, 3, 4, 4, seed=13)
    x_next, logp, _, _ = sde_step(v, s, s_next, x, a, s_cap, noise=noise)
    for i in range(2):
        xi, lpi, _, _ = sde_step(
            v[i : i + 1], float(s[i]), float(s_next[i]), x[i : i + 1], a, s_cap, noise[i : i + 1]
        )
        assert torch.allclose(x_next[i : i + 1], xi, atol=1e-6)
        assert torch.allclose(logp[i : i + 1], lpi, atol=1e-5)


def test_sde_mean_is_the_euler_step_without_noise():
    x, v = _randn(2, 3, 4, 4, seed=14), _randn(2, 3, 4, 4, seed=15)
    for s, s_next in [(1.0, 0.95), (0.5, 0.45)]:
        x_next, logp, mean, std = sde_step(v, s, s_next, x, a=0.0, s_cap=0.95)
        euler = euler_step(v, s, s_next, x)
        assert torch.allclose(mean, euler, atol=1e-7)
        assert torch.allclose(x_next, euler, atol=1e-7)
        assert float(std.max()) == 0.0 and torch.equal(logp, torch.zeros(2))


def test_sde_sigma_uses_the_cap_at_s_one():
    a, s_cap = 0.7, 0.95
    assert math.isclose(float(sde_sigma(1.0, a, s_cap)), a * math.sqrt(1 / (1 - s_cap)), rel_tol=1e-6)
    assert math.isclose(float(sde_sigma(0.5, a, s_cap)), a, rel_tol=1e-6)
    sig = sde_sigma(torch.tensor([1.0, 0.5, 0.0]), a, s_cap)
    assert torch.isfinite(sig).all() and sig[2] == 0
    mean, std = sde_mean_std(_randn(1, 3, 2, 2), 1.0, 0.95, _randn(1, 3, 2, 2, seed=1), a, s_cap)
    assert torch.isfinite(mean).all() and torch.isfinite(std).all()


def test_gaussian_kl_same_std_closed_form():
    mp, mq = _randn(3, 3, 4, 4, seed=16), _randn(3, 3, 4, 4, seed=17)
    std = torch.tensor(0.3)
    kl = gaussian_kl_same_std(mp, mq, std)
    ref = kl_divergence(Normal(mp, std), Normal(mq, std)).flatten(1).mean(1)
    assert kl.shape == (3,) and torch.allclose(kl, ref, atol=1e-6)
    assert torch.allclose(kl, ((mp - mq) ** 2).flatten(1).mean(1) / (2 * 0.09), atol=1e-6)
    assert torch.equal(gaussian_kl_same_std(mp, mp, std), torch.zeros(3))
    # it is the expected log-ratio of the two step densities (Monte Carlo, per dimension)
    noise = _randn(20000, 1, seed=18)
    x = 0.2 + 0.3 * noise
    lr = gaussian_log_prob(x, torch.full_like(x, 0.2), std) - gaussian_log_prob(
        x, torch.full_like(x, -0.1), std
    )
    assert math.isclose(lr.mean().item(), 0.3**2 / (2 * 0.09), rel_tol=0.05)


# ---- sampling loops --------------------------------------------------------------------------------


def test_initial_noise_is_per_seed():
    a = initial_noise([5, 6, 7], (3, 4, 4))
    b = initial_noise([7, 5], (3, 4, 4))
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])


def test_sampler_deterministic_for_a_seed(model):
    a = generate_images(model, PROMPTS, [1, 2, 3], steps=4)
    b = generate_images(model, PROMPTS, [1, 2, 3], steps=4)
    c = generate_images(model, PROMPTS, [4, 5, 6], steps=4)
    assert a.dtype == np.uint8 and a.shape == (3, 32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sampler_independent_of_batch_composition(model):
    """An image depends on its prompt and seed, not on the prompts (of other lengths) beside it."""
    with torch.no_grad():
        cond = model.encode(PROMPTS)
        together = sample_ode(model, cond, initial_noise([1, 2, 3], model.latent_shape), steps=4)
        for i, (p, sd) in enumerate(zip(PROMPTS, [1, 2, 3], strict=True)):
            alone = sample_ode(model, model.encode([p]), initial_noise([sd], model.latent_shape), steps=4)
            assert torch.allclose(alone[0], together[i], atol=1e-4)
    batched = generate_images(model, PROMPTS, [1, 2, 3], steps=4, batch_size=2)
    reordered = generate_images(model, PROMPTS[::-1], [3, 2, 1], steps=4)[::-1]
    assert np.abs(batched.astype(int) - reordered.astype(int)).max() <= 1  # float rounding at most


@torch.no_grad()
def test_guidance_one_is_the_conditional_model(model):
    x = initial_noise([0, 1, 2], model.latent_shape)
    s = torch.tensor(0.6)
    cond = model.encode(PROMPTS)
    v_cond = model.unet(x, s.expand(3), cond.ctx, cond.mask)
    assert torch.allclose(model.velocity(x, s, cond, guidance=1.0), v_cond)
    # the guided path (conditional and null prompts in one padded batch) is linear in w and its
    # w = 1 point is the conditional model; w = 0 is the null prompt's model
    v0, v2 = model.velocity(x, s, cond, guidance=0.0), model.velocity(x, s, cond, guidance=2.0)
    assert torch.allclose((v0 + v2) / 2, v_cond, atol=1e-5)
    null = model.encode([""] * 3)
    assert torch.allclose(v0, model.unet(x, s.expand(3), null.ctx, null.mask), atol=1e-5)
    assert not torch.allclose(v0, v_cond, atol=1e-3)  # the prompt matters
    # the whole sampler at w = 1 is a plain Euler loop over the conditional model
    grid = time_grid(3)
    ref = x
    for k in range(3):
        ref = ref + model.unet(ref, grid[k].expand(3), cond.ctx, cond.mask) * (grid[k + 1] - grid[k])
    assert torch.allclose(sample_ode(model, cond, x, steps=3, guidance=1.0), ref, atol=1e-5)


def test_cond_cat_pads_and_indexes(model):
    with torch.no_grad():
        a, b = model.encode(["a circle"]), model.encode(["two blue squares on a white background"])
    both = Cond.cat([a, b])
    assert len(both) == 2 and both.ctx.shape[1] == b.ctx.shape[1]
    assert both.mask[0].sum() == a.mask.sum() and torch.equal(both.index(1).ctx, b.ctx[0])
    assert len(both.repeat_interleave(3)) == 6


def test_generate_images_checks_lengths(model):
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        generate_images(model, PROMPTS[:2], [0])
    assert generate_images(model, [], []).shape == (0, 32, 32, 3)
