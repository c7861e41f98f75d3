"""Rectified-flow math, with no model code (METHODS.md, "Notation" and section 2).

Convention of diffusers' flow-matching models: ``s`` in [0, 1] is the noise level (``s = 1`` is pure
noise), ``x_s = (1 - s) * x0 + s * eps``, the network predicts the velocity ``v = eps - x0``, and
sampling runs ``s`` from 1 down to 0 with ``dt = s_next - s < 0``. Every function takes tensors and
returns tensors; shapes are (B, C, H, W) for images and (B,) for per-sample quantities.
"""

from __future__ import annotations

import math

import torch


def _bcast(s: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A per-sample scalar (B,) or float, shaped to broadcast against x (B, ...)."""
    s = torch.as_tensor(s, dtype=x.dtype, device=x.device)
    return s.reshape(-1, *([1] * (x.dim() - 1))) if s.dim() == 1 else s


def add_noise(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) * x0 + s * eps."""
    s = _bcast(s, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = eps - x0."""
    return eps - x0


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-sample L_fm = mean over dims of ||v_theta(x_s, s, c) - (eps - x0)||^2: (B,)."""
    return (v_pred - velocity_target(x0, eps)).pow(2).flatten(1).mean(1)


def x0_from_velocity(v: torch.Tensor, x_s: torch.Tensor, s) -> torch.Tensor:
    """x0_hat = x_s - s * v."""
    return x_s - _bcast(s, x_s) * v


def time_grid(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """s_0 = 1 > s_1 > ... > s_steps = 0, uniform, optionally time-shifted as in SD3:
    s' = shift * s / (1 + (shift - 1) * s)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    s = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift * s / (1 + (shift - 1) * s)


def cfg(v_uncond: torch.Tensor, v_cond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance: v = v_u + w * (v_c - v_u). w = 1 is the conditional model."""
    return v_uncond + w * (v_cond - v_uncond)


def euler_step(v: torch.Tensor, s, s_next, x: torch.Tensor) -> torch.Tensor:
    """ODE (Euler) step: x <- x + v * dt, dt = s_next - s."""
    return x + v * (_bcast(s_next, x) - _bcast(s, x))


def sde_sigma(s, a: float, s_cap: float) -> torch.Tensor:
    """Flow-GRPO's noise scale sigma = a * sqrt(s / (1 - s)); at s = 1 the denominator uses
    ``s_cap`` (the first grid point below 1)."""
    s = torch.as_tensor(s, dtype=torch.float32)
    s_den = torch.where(s >= 1.0, torch.as_tensor(s_cap, dtype=s.dtype), s)
    return a * torch.sqrt(s / (1 - s_den))


def sde_mean_std(v: torch.Tensor, s, s_next, x: torch.Tensor, a: float, s_cap: float):
    """Mean and std of the Flow-GRPO SDE step (same marginals as the ODE):

    mean = x * (1 + sigma^2 * dt / (2 s)) + v * (1 + sigma^2 * (1 - s) / (2 s)) * dt
    std  = sigma * sqrt(-dt)
    """
    s_b, sn_b = _bcast(s, x), _bcast(s_next, x)
    dt = sn_b - s_b
    sigma = _bcast(sde_sigma(s, a, s_cap).to(x.dtype).to(x.device), x)
    mean = x * (1 + sigma**2 * dt / (2 * s_b)) + v * (1 + sigma**2 * (1 - s_b) / (2 * s_b)) * dt
    std = sigma * torch.sqrt(-dt)
    return mean, std


def gaussian_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x_next; mean, std^2 I), averaged over dimensions (as the reference code): (B,).

    Multiply by the number of dimensions for the joint log-density.
    """
    std = std.expand_as(mean)
    lp = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def sde_step(
    v: torch.Tensor,
    s,
    s_next,
    x: torch.Tensor,
    a: float,
    s_cap: float,
    noise: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
):
    """One SDE step. Returns (x_next, log_prob (B,), mean, std).

    With ``x_next`` given (re-evaluating a stored trajectory under new parameters), no noise is drawn
    and its log-probability under the step's Gaussian is returned. With ``a = 0`` the mean is the
    Euler ODE step.
    """
    mean, std = sde_mean_std(v, s, s_next, x, a, s_cap)
    if x_next is None:
        noise = torch.randn_like(x) if noise is None else noise
        x_next = mean + std * noise
    if float(std.max()) == 0.0:
        return x_next, torch.zeros(x.shape[0], device=x.device, dtype=x.dtype), mean, std
    return x_next, gaussian_log_prob(x_next, mean, std), mean, std


def gaussian_kl_same_std(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, std^2 I) || N(mean_q, std^2 I)) = ||mean_p - mean_q||^2 / (2 std^2), averaged over
    dimensions like :func:`gaussian_log_prob`: (B,)."""
    return ((mean_p - mean_q) ** 2 / (2 * std.expand_as(mean_p) ** 2)).flatten(1).mean(1)
