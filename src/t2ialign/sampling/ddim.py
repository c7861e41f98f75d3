"""DDIM math for epsilon-prediction models (SD 1.5, SDXL), with no model code (METHODS.md s. 2, DDPO).

``alpha_bar_t`` is the cumulative product of the scheduler's alphas at the current timestep and
``alpha_bar_prev`` at the next (less noisy) one; ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps``. The
step (Song et al. 2021, eq. 12):

    x0_hat  = (x_t - sqrt(1 - ab_t) * eps) / sqrt(ab_t)
    sigma_t = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)
    mean    = sqrt(ab_prev) * x0_hat + sqrt(1 - ab_prev - sigma_t^2) * eps
    x_prev  = mean + sigma_t * noise

``eta = 1`` is a DDPM step (DDPO's policy, a Gaussian with an exact log-probability); ``eta = 0``
is deterministic DDIM. The alphas may be floats, 0-d tensors or per-sample (B,) tensors.
"""

from __future__ import annotations

import torch

from t2ialign.sampling.flow import _bcast, gaussian_log_prob


def x0_from_eps(eps: torch.Tensor, x_t: torch.Tensor, alpha_bar_t) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - ab_t) * eps) / sqrt(ab_t)."""
    ab = _bcast(alpha_bar_t, x_t)
    return (x_t - torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)


def ddim_sigma(alpha_bar_t, alpha_bar_prev, eta: float) -> torch.Tensor:
    """sigma_t = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev); at eta = 1 the
    DDPM posterior standard deviation."""
    ab_t = torch.as_tensor(alpha_bar_t, dtype=torch.float32)
    ab_prev = torch.as_tensor(alpha_bar_prev, dtype=torch.float32)
    var = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
    return eta * torch.sqrt(var.clamp(min=0.0))


def ddim_mean_std(eps: torch.Tensor, alpha_bar_t, alpha_bar_prev, x_t: torch.Tensor, eta: float):
    """Mean and std of the DDIM step (see the module docstring): (mean (B, ...), std broadcastable)."""
    ab_prev = _bcast(alpha_bar_prev, x_t)
    sigma = _bcast(ddim_sigma(alpha_bar_t, alpha_bar_prev, eta).to(x_t.device, x_t.dtype), x_t)
    x0_hat = x0_from_eps(eps, x_t, alpha_bar_t)
    direction = torch.sqrt((1 - ab_prev - sigma**2).clamp(min=0.0)) * eps
    return torch.sqrt(ab_prev) * x0_hat + direction, sigma


def ddim_step(
    eps: torch.Tensor,
    alpha_bar_t,
    alpha_bar_prev,
    x_t: torch.Tensor,
    eta: float,
    noise: torch.Tensor | None = None,
    x_prev: torch.Tensor | None = None,
):
    """One DDIM step. Returns (x_prev, log_prob (B,), mean, std).

    ``log_prob`` is log N(x_prev; mean, std^2 I) averaged over dimensions, as
    :func:`t2ialign.sampling.flow.gaussian_log_prob` (0 for a sample whose std is 0: eta = 0, or the
    last step when ab_prev = 1). With ``x_prev`` given (re-evaluating a stored trajectory), no noise
    is drawn and its log-probability under the step's Gaussian is returned.
    """
    mean, std = ddim_mean_std(eps, alpha_bar_t, alpha_bar_prev, x_t, eta)
    if x_prev is None:
        noise = torch.randn_like(x_t) if noise is None else noise
        x_prev = mean + std * noise
    positive = (ddim_sigma(alpha_bar_t, alpha_bar_prev, eta) > 0).to(x_t.device).expand(x_t.shape[0])
    if not bool(positive.any()):
        return x_prev, torch.zeros(x_t.shape[0], device=x_t.device, dtype=x_t.dtype), mean, std
    lp = gaussian_log_prob(x_prev, mean, torch.where(std > 0, std, torch.ones_like(std)))
    return x_prev, torch.where(positive, lp, torch.zeros_like(lp)), mean, std


def ddim_deterministic_step(eps: torch.Tensor, alpha_bar_t, alpha_bar_prev, x_t: torch.Tensor):
    """The eta = 0 step (deterministic DDIM, the ODE step of epsilon models):
    x_prev = sqrt(ab_prev) * x0_hat + sqrt(1 - ab_prev) * eps."""
    ab_prev = _bcast(alpha_bar_prev, x_t)
    return torch.sqrt(ab_prev) * x0_from_eps(eps, x_t, alpha_bar_t) + torch.sqrt(1 - ab_prev) * eps
