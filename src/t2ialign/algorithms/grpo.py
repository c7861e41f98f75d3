"""Flow-GRPO (Liu et al. 2025, METHODS.md s. 2): online RL on the SDE sampling chain of a flow model.

For each prompt, G images are sampled with the SDE (each step a Gaussian policy with an exact
log-probability) and scored; advantages are group-relative; the policy is updated with the PPO
clipped objective per denoising step, with a KL penalty to the frozen reference model:

    A_i   = (R_i - mean_G R) / (std_G R + 1e-4)                                 (per prompt group)
    r_k   = exp(log p_theta(x_{k+1} | x_k) - log p_old(x_{k+1} | x_k))
    L     = mean_k [ mean_i max(-A_i r_k, -A_i clip(r_k, 1 - eps, 1 + eps)) + beta * KL_k ]
    KL_k  = ||mean_theta - mean_ref||^2 / (2 sigma_k^2 (-dt))                    (same-std Gaussians)

Log-probabilities and KL are averaged over dimensions (as the reference code). Denoising reduction:
sampling and training run ``train_steps`` steps (10), evaluation elsewhere runs more (20 here,
40 in the paper). The machinery here (:func:`collect_rollouts`, :func:`optimise_policy`) is shared by
MixGRPO (``mixgrpo.py``) and DDPO (``ddpo.py``).
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t2ialign.algorithms.common import (
    RunLogger,
    Trajectory,
    call_reward,
    initial_noise,
    rollout,
    step_log_prob,
)
from t2ialign.algorithms.run import TrainingRun, check_accumulation
from t2ialign.sampling.flow import gaussian_kl_same_std

# ---- the losses (pure functions) -----------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (R_i - mean_G) / (std_G + eps) within consecutive groups of ``group_size`` (population
    std, as the reference code). A group of equal rewards gives 0, not NaN. rewards (N,) -> (N,)."""
    if rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"{tuple(rewards.shape)} rewards do not split into groups of {group_size}")
    r = rewards.reshape(-1, group_size).float()
    mean = r.mean(1, keepdim=True)
    std = r.std(1, unbiased=False, keepdim=True)
    return ((r - mean) / (std + eps)).reshape(-1)


def ppo_clip_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip: float) -> torch.Tensor:
    """mean_i max(-A_i r_i, -A_i clip(r_i, 1 - clip, 1 + clip)), r_i = exp(logp_i - logp_old_i)."""
    ratio = torch.exp(logp - logp_old)
    return torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)).mean()


def kl_penalty(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(pi_theta || pi_ref) of one step, mean over the batch of ||mean - mean_ref||^2 / (2 std^2)
    (averaged over dimensions, :func:`t2ialign.sampling.flow.gaussian_kl_same_std`)."""
    return gaussian_kl_same_std(mean, mean_ref, std).mean()


@torch.no_grad()
def ppo_stats(logp: torch.Tensor, logp_old: torch.Tensor, clip: float) -> dict[str, float]:
    """Diagnostics: the fraction of clipped ratios and the approximate KL 0.5 * mean (logp - logp_old)^2."""
    d = (logp - logp_old).float()
    return {
        "clip_frac": float(((torch.exp(d) - 1).abs() > clip).float().mean()),
        "approx_kl": float(0.5 * (d**2).mean()),
    }


# ---- sampling and optimisation, shared with MixGRPO and DDPO -------------------------------------


@dataclass
class Rollouts:
    """One iteration's samples: the trajectories, their conditioning, prompts and rewards (N,)."""

    traj: Trajectory
    cond: Any
    prompts: list[str]
    rewards: torch.Tensor
    info: dict


@torch.no_grad()
def collect_rollouts(
    backend,
    reward_fn,
    rows: list[dict],
    steps: int,
    guidance: float,
    stochastic: torch.Tensor | None,
    generator: torch.Generator,
    ranks=None,
) -> Rollouts:
    """Sample one image per row (stochastic where ``stochastic`` says, all steps by default) and
    score it with ``reward_fn(images in [0, 1], prompts, rows)``."""
    prompts = [r["prompt"] for r in rows]
    cond = backend.encode(prompts)
    x1 = initial_noise(len(rows), backend.latent_shape, generator, backend.device)
    traj = rollout(backend, cond, x1, steps, guidance, stochastic=stochastic, generator=generator)
    rewards, info = call_reward(reward_fn, backend.decode(traj.x0), prompts, rows, ranks)
    return Rollouts(traj, cond, prompts, rewards.to(backend.device), info)


StepLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""step_loss(logp, logp_old, adv) -> scalar policy loss of one denoising step."""


def optimise_policy(
    backend,
    run: TrainingRun,
    batch: Rollouts,
    adv: torch.Tensor,
    steps: list[int],
    *,
    step_loss: StepLoss,
    guidance: float,
    clip_range: float,
    beta: float = 0.0,
    step_reduce: str = "mean",
    minibatch_size: int,
    inner_epochs: int = 1,
    timestep_fraction: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Inner epochs over shuffled minibatches of ``batch``; one optimiser step of ``run`` per
    minibatch, with the per-step losses of the trained ``steps`` (a random ``timestep_fraction`` of
    them per minibatch) averaged (``step_reduce='mean'``, Flow-GRPO) or summed (``'sum'``, DDPO).
    Each step adds ``beta * KL`` to the reference model when beta > 0. Returns the diagnostics, each
    a mean over (minibatch, step) pairs (so ``loss`` is per step, also when the optimised sum is
    over steps).

    Each minibatch goes through the model in the run's micro-batches (gradient accumulation,
    :meth:`~t2ialign.algorithms.run.TrainingRun.micro_batches`): every micro-batch's per-step losses
    (means over its samples, as ``step_loss`` returns) are scaled by its share of the minibatch, so
    the accumulated gradient and the diagnostics (weighted by the same shares) are the whole
    minibatch's. The draws (the permutation, the trained steps) do not depend on the accumulation.
    The run's :class:`~t2ialign.algorithms.parallel.Ranks` runs the backward passes and the step
    (the gradient average over data-parallel ranks, or DeepSpeed's engine)."""
    if step_reduce not in ("mean", "sum"):
        raise ValueError(f"step_reduce must be 'mean' or 'sum', got {step_reduce!r}")
    engine = run.ranks.engine
    n = adv.shape[0]
    dev = backend.device
    n_train = max(1, round(timestep_fraction * len(steps)))
    sums: dict[str, float] = {}
    count = 0
    updates = 0
    for _ in range(inner_epochs):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, minibatch_size):
            idx = perm[start : start + minibatch_size].to(dev)
            ks = steps
            if n_train < len(steps):
                pick = torch.randperm(len(steps), generator=generator)[:n_train]
                ks = [steps[i] for i in sorted(pick.tolist())]
            scale = 1.0 / len(ks) if step_reduce == "mean" else 1.0
            pairs: list[dict[str, float]] = [{} for _ in ks]  # each step's diagnostics over the minibatch
            run.zero_grad()
            for part in run.micro_batches(len(idx)):
                share = (part.stop - part.start) / len(idx)  # 1.0 without accumulation
                mid = idx[part]
                cond, a = batch.cond.index(mid), adv[mid]
                for k, pair in zip(ks, pairs, strict=True):
                    logp, mean, std = step_log_prob(backend, batch.traj, k, cond, guidance, mid)
                    logp_old = batch.traj.log_probs[k, mid]
                    policy = step_loss(logp, logp_old, a)
                    loss = policy
                    row = {"policy_loss": policy.item(), **ppo_stats(logp, logp_old, clip_range)}
                    if beta > 0:
                        with torch.no_grad(), backend.reference():
                            _, mean_ref, _ = step_log_prob(backend, batch.traj, k, cond, guidance, mid)
                        kl = kl_penalty(mean, mean_ref, std)
                        loss = loss + beta * kl
                        row["kl"] = kl.item()
                    # a deterministic step (std 0) has a constant log-prob; under DeepSpeed every rank
                    # still takes the backward pass (of zeros), as ZeRO's collectives need
                    if loss.requires_grad or engine is not None:
                        run.backward(loss * (scale * share))
                    row["loss"] = loss.item()
                    for key, v in row.items():
                        pair[key] = pair.get(key, 0.0) + share * v
            for pair in pairs:
                for key, v in pair.items():
                    sums[key] = sums.get(key, 0.0) + v
                count += 1
            norm = run.step()
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + norm
            updates += 1
    stats = {k: v / count for k, v in sums.items() if k != "grad_norm"}
    stats["grad_norm"] = sums["grad_norm"] / max(updates, 1)
    return stats


def scalar_info(info: dict, prefix: str = "reward_") -> dict[str, float]:
    """The numeric entries of a reward's info dict as loggable scalars (numeric or boolean arrays
    and tensors by their mean); anything else is left out."""
    out = {}
    for k, v in info.items():
        if isinstance(v, numbers.Number):
            out[prefix + str(k)] = float(v)
        elif isinstance(v, torch.Tensor) and v.numel() and not v.is_complex():
            out[prefix + str(k)] = float(v.detach().float().mean())
        elif isinstance(v, np.ndarray) and v.size and (np.issubdtype(v.dtype, np.number) or v.dtype == bool):
            out[prefix + str(k)] = float(np.mean(v))
    return out


def choose_prompts(prompts: list[dict], k: int, rng: np.random.Generator) -> list[dict]:
    """``k`` prompt rows, without replacement when there are enough."""
    idx = rng.choice(len(prompts), size=k, replace=k > len(prompts))
    return [prompts[int(i)] for i in idx]


def check_prompts(prompts: list[dict]) -> None:
    if not prompts:
        raise ValueError("no prompts to train on")
    bad = [r for r in prompts if not isinstance(r, dict) or "prompt" not in r]
    if bad:
        raise ValueError(f"prompt rows must be dicts with a 'prompt' key, got {bad[0]!r}")


# ---- Flow-GRPO -----------------------------------------------------------------------------------


@dataclass
class GRPOConfig:
    iterations: int = 100
    """Outer iterations, each: sample, score, then optimise on the samples."""
    prompts_per_iter: int = 8
    """Prompts sampled (without replacement where possible) per iteration."""
    group_size: int = 8
    """G, images per prompt (24 published; the group-relative baseline needs >= 2)."""
    train_steps: int = 10
    """Denoising steps of the sampled (and trained) chains: the denoising reduction (evaluation
    elsewhere uses 20)."""
    guidance: float = 3.0
    """Classifier-free guidance while sampling and training (1 disables it and halves the cost)."""
    beta: float = 0.04
    """KL weight to the reference model (0.04 published for GenEval; 0 skips the reference pass)."""
    clip_range: float = 1e-4
    """PPO clip epsilon on the ratio (1e-4 published: log-probs are means over dimensions)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max] (as the reference code)."""
    adv_eps: float = 1e-4
    """The epsilon of the group-relative advantage's denominator."""
    inner_epochs: int = 1
    """Passes over each iteration's samples."""
    minibatch_size: int = 32
    """Samples per optimiser step."""
    timestep_fraction: float = 1.0
    """Share of the chain's steps trained per minibatch (a random subset; 1 trains every step)."""
    lr: float = 3e-4
    """AdamW learning rate (3e-4 published, with LoRA). Full fine-tuning needs far less (1e-5, as
    MixGRPO's full runs): at 3e-4 it degraded the shipped model within 8 iterations."""
    weight_decay: float = 1e-4
    """AdamW weight decay (as the reference code)."""
    lora_rank: int = 32
    """LoRA rank through peft (32 published); 0 means full fine-tuning of the denoiser."""
    lora_alpha: float = 64.0
    """LoRA scaling alpha (64 published)."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    checkpoint_every: int = 10
    """Save a resumable trainer state every this many iterations."""
    seed: int = 0
    """Seeds the prompts, the noise and the minibatches (resume draws the same)."""
    gradient_accumulation_steps: int = 1
    """K: each optimiser step's minibatch (``minibatch_size``) goes through the model in K equal
    micro-batches whose gradients add up (the same step, a K-th of the activations; see
    ``t2ialign.algorithms.run``)."""

    def __post_init__(self):
        for name in (
            "iterations",
            "prompts_per_iter",
            "group_size",
            "train_steps",
            "inner_epochs",
            "minibatch_size",
            "checkpoint_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(
                f"group_size must be at least 2 (no baseline in a group of 1), got {self.group_size}"
            )
        if self.beta < 0 or self.clip_range <= 0 or self.adv_clip_max <= 0 or self.adv_eps <= 0:
            raise ValueError("beta must be >= 0; clip_range, adv_clip_max and adv_eps positive")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be positive, weight_decay non-negative")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        check_accumulation(self, ("minibatch_size", self.minibatch_size))


Window = Callable[[int], tuple[int, int]]
"""window(iteration) -> (first, end): the steps [first, end) that are stochastic and trained."""


def train_group_policy(
    backend,
    reward_fn,
    prompts: list[dict],
    cfg: GRPOConfig,
    out: str | Path,
    method: str,
    window: Window | None = None,
    progress: bool = True,
    logger: RunLogger | None = None,
    accelerator=None,
) -> list[dict]:
    """The GRPO loop, with the SDE and the training restricted to ``window(iteration)`` when given
    (MixGRPO); see :func:`train_grpo`.

    With an ``accelerate.Accelerator`` of N processes, ``prompts_per_iter`` and ``group_size`` are
    global: the iteration's ``prompts_per_iter * group_size`` samples (which must split evenly over
    the ranks) are sharded contiguously, so a group may span ranks; each rank samples its share
    (with its own noise stream), the rewards are gathered, the group advantages computed over the
    global groups and each rank trains on its slice, ``minibatch_size`` samples per process per
    optimiser step, with the gradients averaged over ranks. The main process alone writes the log,
    checkpoints and the model; every rank resumes from the same ``out``."""
    check_prompts(prompts)
    run = TrainingRun(backend, cfg, out, method, accelerator=accelerator, logger=logger)
    ranks = run.ranks
    ranks.shard(cfg.prompts_per_iter * cfg.group_size)  # before any collective: fail early on an uneven split
    run.start()
    G, T = cfg.group_size, cfg.train_steps
    for it in run.steps(cfg.iterations, progress, unit="it"):
        g = ranks.generator(cfg.seed, it)
        rng = np.random.default_rng([cfg.seed, it])
        chosen = choose_prompts(prompts, cfg.prompts_per_iter, rng)
        first, end = window(it) if window is not None else (0, T)
        stochastic = torch.zeros(T, dtype=torch.bool)
        stochastic[first:end] = True
        t0 = time.perf_counter()
        group_rows = [r for r in chosen for _ in range(G)]
        mine = ranks.shard(len(group_rows))
        batch = collect_rollouts(backend, reward_fn, group_rows[mine], T, cfg.guidance, stochastic, g, ranks)
        rewards = ranks.gather(batch.rewards)  # the global groups, in rank order
        adv = group_advantages(rewards, G, cfg.adv_eps).clamp(-cfg.adv_clip_max, cfg.adv_clip_max)[mine]
        t1 = time.perf_counter()
        stats = optimise_policy(
            backend,
            run,
            batch,
            adv,
            list(range(first, end)),
            step_loss=lambda lp, old, a: ppo_clip_loss(lp, old, a, cfg.clip_range),
            guidance=cfg.guidance,
            clip_range=cfg.clip_range,
            beta=cfg.beta,
            step_reduce="mean",
            minibatch_size=cfg.minibatch_size,
            inner_epochs=cfg.inner_epochs,
            timestep_fraction=cfg.timestep_fraction,
            generator=g,
        )
        groups = rewards.reshape(-1, G)
        row = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)),
            **ranks.mean_scalars(stats),
            "zero_std_groups": float((groups.std(1, unbiased=False) == 0).float().mean()),
            "sample_s": t1 - t0,
            "train_s": time.perf_counter() - t1,
            **ranks.mean_scalars(scalar_info(batch.info)),
        }
        if window is not None:
            row["window_start"] = float(first)
        run.record(row, it + 1, reward=f"{row['reward_mean']:.3f}", loss=f"{row['loss']:.2e}")
        run.checkpoint(it + 1)
    return run.finish()


def train_grpo(
    backend,
    reward_fn,
    prompts: list[dict],
    cfg: GRPOConfig,
    out: str | Path,
    progress: bool = True,
    logger: RunLogger | None = None,
    accelerator=None,
) -> list[dict]:
    """Fine-tune ``backend`` in place with Flow-GRPO; resumes from ``out``; data-parallel over the
    processes of ``accelerator`` when given (see :func:`train_group_policy`).

    ``reward_fn(images in [0, 1] (B, 3, H, W), prompts, metadata=prompt rows) -> (rewards (B,), info)``.
    Returns this call's log rows (reward_mean/std, loss, policy_loss, kl, clip_frac, approx_kl, ...).
    The final model is saved to ``out``.
    """
    return train_group_policy(
        backend, reward_fn, prompts, cfg, out, "grpo", None, progress, logger, accelerator=accelerator
    )
