"""The exact answer and the measurements a gym run is judged by (METHODS.md section 6).

For ``max_p E_p[r] - beta KL(p || p_ref)`` the optimum is ``p*(x | c) = p_ref(x | c) exp(r / beta) / Z``.
With the 0/1 reward and ``q0`` the base's success rate, ``p*`` multiplies the success region by
``e^(1/beta)`` and leaves both regions' shapes alone, so its success rate is :func:`q_star` and, inside
the success region, the weights of a class's modes stay the base's (no mode collapse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from t2ialign.gym.world import GymWorld


def q_star(q0: float, beta: float) -> float:
    """q* = q0 e^(1/beta) / (q0 e^(1/beta) + 1 - q0), written 1 / (1 + (1 - q0) / q0 * e^(-1/beta))
    so that small beta does not overflow; beta = 0 (no KL) gives 1 (for q0 > 0)."""
    if not 0.0 <= q0 <= 1.0:
        raise ValueError(f"q0 must be a probability, got {q0}")
    if beta < 0:
        raise ValueError(f"beta must be non-negative, got {beta}")
    if q0 == 0.0:
        return 0.0
    if beta == 0.0:
        return 1.0
    return 1.0 / (1.0 + (1.0 - q0) / q0 * math.exp(-1.0 / beta))


def q_star_grpo(q0: float, beta: float, group_size: int, adv_eps: float = 1e-4, tol: float = 1e-12) -> float:
    """Where Flow-GRPO's KL-regularised objective puts the success rate, with its group-normalised
    advantages A_i = (R_i - mean_G) / (std_G + adv_eps), for the 0/1 reward, if the policy stays in the
    tilted family p_lam ∝ p_ref e^(lam r) and the KL term is the exact KL (memoryless sampler).

    In that family d/dlam log p = r - q and d/dlam KL = lam q (1 - q); a group with k successes of G
    has sum_i A_i r_i = G sd_k^2 / (sd_k + adv_eps), sd_k = sqrt(k/G (1 - k/G)). Stationarity:

        E_{k ~ Bin(G, q)} [ sd_k^2 / (sd_k + adv_eps) ] = beta lam(q) q (1 - q),
        lam(q) = logit(q) - logit(q0)                       (solved by bisection on (q0, 1))

    Without normalisation (reward term E[R]) the left side is q (1 - q) and lam = 1 / beta: q*.
    With large ``adv_eps`` the left side is about (G - 1) / G q (1 - q) / adv_eps, i.e. q* with
    beta * adv_eps * G / (G - 1)."""
    if not 0.0 < q0 < 1.0 or beta <= 0 or group_size < 2:
        raise ValueError("need 0 < q0 < 1, beta > 0 and group_size >= 2")
    G = group_size
    sd = torch.tensor([math.sqrt(k / G * (1 - k / G)) for k in range(G + 1)], dtype=torch.float64)
    gain = sd**2 / (sd + adv_eps)
    logit0 = math.log(q0 / (1 - q0))

    def excess(q: float) -> float:
        pmf = torch.tensor(
            [math.comb(G, k) * q**k * (1 - q) ** (G - k) for k in range(G + 1)], dtype=torch.float64
        )
        return float((pmf * gain).sum()) - beta * (math.log(q / (1 - q)) - logit0) * q * (1 - q)

    lo, hi = q0, 1.0 - 1e-15
    while hi - lo > tol:
        q = 0.5 * (lo + hi)
        lo, hi = (q, hi) if excess(q) > 0 else (lo, q)
    return 0.5 * (lo + hi)


def entropy(weights: torch.Tensor) -> torch.Tensor:
    """H(w) = -sum_m w_m log w_m (nats) along the last dimension, 0 log 0 = 0."""
    w = weights.double()
    return -(w * torch.where(w > 0, w.log(), torch.zeros_like(w))).sum(-1)


@torch.no_grad()
def sample_points(
    backend,
    classes: torch.Tensor,
    steps: int = 20,
    guidance: float = 1.0,
    seed: int = 0,
    sampler: str = "ode",
    batch: int = 4096,
) -> torch.Tensor:
    """Samples of ``backend`` for the prompts of ``classes`` (B,): points (B, 2), by the Euler ODE
    (``"ode"``) or the backend's stochastic step at every step (``"sde"``, the policy of DDPO and
    Flow-GRPO). The noise is a pure function of ``seed`` (the same noise for every model compared)."""
    if sampler not in ("ode", "sde"):
        raise ValueError(f"sampler must be 'ode' or 'sde', got {sampler!r}")
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn((classes.shape[0], *backend.latent_shape), generator=g)
    grid = backend.timesteps(steps)
    out = []
    for i in range(0, classes.shape[0], batch):
        cond = backend.encode([backend.world.prompt(c) for c in classes[i : i + batch].tolist()])
        x = x1[i : i + batch].to(backend.device)
        for k in range(steps):
            v = backend.predict(x, grid[k], cond, guidance)
            if sampler == "ode":
                x = backend.ode_step(v, grid[k], grid[k + 1], x)
            else:
                noise = torch.randn(x.shape, generator=g).to(x.device)
                x = backend.stochastic_step(v, grid[k], grid[k + 1], x, noise=noise)[0]
        out.append(x.reshape(-1, 2).cpu())
    return torch.cat(out)


@dataclass
class GymScore:
    """What a model's samples show: ``success`` (the share within ``radius`` of a mode of the prompted
    class), ``class_success`` (K,), ``mode_weights`` (K, modes_per_class) the share of each class's
    successes in each of its modes, ``mode_entropy`` the mean over classes of their entropy (nats),
    and ``n`` the number of samples."""

    success: float
    class_success: list[float]
    mode_weights: list[list[float]]
    mode_entropy: float
    n: int

    def weights_tv(self, other: GymScore) -> float:
        """Mean over classes of the total-variation distance between the two within-class mode weights."""
        a, b = torch.tensor(self.mode_weights), torch.tensor(other.mode_weights)
        return float(0.5 * (a - b).abs().sum(1).mean())


def score_points(world: GymWorld, points: torch.Tensor, classes: torch.Tensor) -> GymScore:
    """:class:`GymScore` of points (B, 2) drawn for the prompts ``classes`` (B,)."""
    dist, mode = world.class_distance(points, classes)
    ok = dist <= world.radius
    K, R = world.n_classes, world.modes_per_class
    rank = world.mode_rank()[mode]
    counts = torch.zeros(K, R)
    counts.index_put_((classes[ok], rank[ok]), torch.ones(int(ok.sum())), accumulate=True)
    weights = counts / counts.sum(1, keepdim=True).clamp(min=1)
    per_class = [float(ok[classes == c].float().mean()) if (classes == c).any() else 0.0 for c in range(K)]
    return GymScore(
        success=float(ok.float().mean()),
        class_success=per_class,
        mode_weights=weights.tolist(),
        mode_entropy=float(entropy(weights).mean()),
        n=int(points.shape[0]),
    )


def score_backend(
    backend,
    n_per_class: int = 1024,
    steps: int = 20,
    guidance: float = 1.0,
    seed: int = 12345,
    sampler: str = "ode",
) -> GymScore:
    """Sample ``n_per_class`` points per class from ``backend`` (:func:`sample_points`) and score them."""
    world = backend.world
    classes = torch.arange(world.n_classes).repeat_interleave(n_per_class)
    return score_points(world, sample_points(backend, classes, steps, guidance, seed, sampler), classes)
