"""The math of a rectified-flow backend, written once for every flow model of this project.

``x_s = (1 - s) x0 + s eps``, the network predicts ``v = eps - x0``; the deterministic step is Euler
and the stochastic step Flow-GRPO's SDE (:mod:`t2ialign.sampling.flow`). A backend that mixes this in
provides ``device`` and ``sde_a`` (Flow-GRPO's noise scale ``a``).
"""

from __future__ import annotations

import torch

from t2ialign.sampling import flow


class RectifiedFlowMath:
    """``add_noise``, ``target``, ``predict_x0``, ``timesteps``, ``ode_step`` and ``stochastic_step``
    of the :class:`~t2ialign.backends.base.Backend` protocol for a rectified-flow model."""

    prediction = "flow"
    device: torch.device
    sde_a: float

    def add_noise(self, x0, eps, s):
        return flow.add_noise(x0, eps, s)

    def target(self, x0, eps, s):
        return flow.velocity_target(x0, eps)

    def predict_x0(self, out, x_s, s):
        return flow.x0_from_velocity(out, x_s, s)

    def timesteps(self, steps: int) -> torch.Tensor:
        return flow.time_grid(steps, device=self.device)

    def ode_step(self, out, s, s_next, x):
        return flow.euler_step(out, s, s_next, x)

    def stochastic_step(self, out, s, s_next, x, noise=None, x_next=None, s_cap: float | None = None):
        """Flow-GRPO's SDE step; ``s_cap`` (default: the first grid point below 1 of a uniform grid
        whose first step is ``s - s_next``) replaces s = 1 in sigma's denominator."""
        if s_cap is None:
            s_cap = 1.0 - float(torch.as_tensor(s - s_next).flatten()[0])
        return flow.sde_step(out, s, s_next, x, self.sde_a, s_cap, noise=noise, x_next=x_next)
