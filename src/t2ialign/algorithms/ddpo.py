"""DDPO (Black et al. 2023, METHODS.md s. 2): policy gradients on the stochastic sampling chain.

The policy step is the backend's ``stochastic_step``: DDIM with eta = 1 for epsilon-prediction
models (:func:`t2ialign.sampling.ddim.ddim_step`), Flow-GRPO's SDE step for flow models. Every step
of the chain is stochastic and trained. Advantages are normalised per prompt with running statistics
(a buffer of the last 32 rewards of each prompt; below 16 of them, the batch's statistics):

    A     = (R - mean_prompt) / (std_prompt + 1e-6), clipped to [-5, 5]
    DDPO-SF (REINFORCE):  L = mean_i [ -A_i * sum_k log p_theta(x_{k+1} | x_k) ]
    DDPO-IS (PPO):        L = sum_k mean_i max(-A_i r_ik, -A_i clip(r_ik, 1 - eps, 1 + eps)),
                          r_ik = exp(log p_theta - log p_old)

No KL and no critic. Log-probabilities are averaged over dimensions (as the reference code).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from t2ialign.algorithms.common import RunLogger
from t2ialign.algorithms.grpo import (
    check_prompts,
    collect_rollouts,
    optimise_policy,
    ppo_clip_loss,
    scalar_info,
)
from t2ialign.algorithms.run import TrainingRun, check_accumulation


def reinforce_loss(logp: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """DDPO-SF's loss of one step: mean_i -A_i log p_i (summed over steps by the trainer)."""
    return -(adv * logp).mean()


class PerPromptStatTracker:
    """Running reward statistics per prompt (DDPO's ``per_prompt_stat_tracking``).

    ``update(prompts, rewards)`` adds the rewards to each prompt's buffer (the last ``buffer_size``)
    and returns A = (R - mean) / (std + eps) with the prompt's statistics once its buffer holds
    ``min_count`` rewards, the whole batch's statistics before (population std, as the reference).
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, eps: float = 1e-6):
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.stats: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        r = rewards.detach().double().cpu().numpy()
        if len(prompts) != r.shape[0]:
            raise ValueError(f"{len(prompts)} prompts, {r.shape[0]} rewards")
        keys = np.array(prompts, dtype=object)
        adv = np.empty_like(r)
        for p in dict.fromkeys(prompts):
            sel = keys == p
            buf = self.stats.setdefault(p, deque(maxlen=self.buffer_size))
            buf.extend(r[sel].tolist())
            ref = np.asarray(buf) if len(buf) >= self.min_count else r
            adv[sel] = (r[sel] - ref.mean()) / (ref.std() + self.eps)
        return torch.as_tensor(adv, dtype=torch.float32, device=rewards.device)

    def state_dict(self) -> dict[str, list[float]]:
        return {p: list(b) for p, b in self.stats.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.stats = {p: deque(v, maxlen=self.buffer_size) for p, v in state.items()}


@dataclass
class DDPOConfig:
    iterations: int = 100
    """Outer iterations, each: sample, score, then optimise on the samples."""
    batch_size: int = 32
    """Samples per iteration, one prompt drawn uniformly (with replacement) per sample (256 published);
    global under Accelerate (split over the processes)."""
    train_steps: int = 10
    """Denoising steps of the sampled (and trained) chains (50 published; evaluation uses 20 here)."""
    guidance: float = 3.0
    """Classifier-free guidance while sampling and training (5 published)."""
    variant: str = "is"
    """'is' (importance sampling with the PPO clip, DDPO-IS) or 'sf' (score function, REINFORCE)."""
    clip_range: float = 1e-4
    """PPO clip epsilon on the ratio (1e-4 published)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max] (published)."""
    per_prompt_stats: bool = True
    """Normalise rewards per prompt with running statistics; False uses the batch's statistics."""
    buffer_size: int = 32
    """Rewards kept per prompt for its statistics."""
    min_count: int = 16
    """Rewards a prompt needs before its own statistics replace the batch's."""
    inner_epochs: int = 1
    """Passes over each iteration's samples ('sf' needs 1: it is on-policy)."""
    minibatch_size: int = 16
    """Samples per optimiser step (per process under Accelerate)."""
    timestep_fraction: float = 1.0
    """Share of the chain's steps trained per minibatch (a random subset; 1 trains every step)."""
    lr: float = 3e-4
    """AdamW learning rate (3e-4 published, with LoRA; full fine-tuning needs about 1e-5)."""
    weight_decay: float = 1e-4
    """AdamW weight decay (as the reference code)."""
    lora_rank: int = 4
    """LoRA rank through peft (4 published); 0 means full fine-tuning of the denoiser."""
    lora_alpha: float = 4.0
    """LoRA scaling alpha (= rank: diffusers' LoRA scale 1, as the reference code)."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    checkpoint_every: int = 10
    """Save a resumable trainer state (with the per-prompt statistics) every this many iterations."""
    seed: int = 0
    """Seeds the prompts, the noise and the minibatches (resume draws the same)."""
    gradient_accumulation_steps: int = 1
    """K: each optimiser step's minibatch (``minibatch_size``) goes through the model in K equal
    micro-batches whose gradients add up (the same step, a K-th of the activations; see
    ``t2ialign.algorithms.run``)."""

    def __post_init__(self):
        for name in (
            "iterations",
            "batch_size",
            "train_steps",
            "inner_epochs",
            "minibatch_size",
            "checkpoint_every",
            "buffer_size",
            "min_count",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.variant not in ("is", "sf"):
            raise ValueError(f"variant must be 'is' or 'sf', got {self.variant!r}")
        if self.variant == "sf" and self.inner_epochs != 1:
            raise ValueError("the score-function variant is on-policy: inner_epochs must be 1")
        if self.min_count > self.buffer_size:
            raise ValueError(f"min_count ({self.min_count}) cannot exceed buffer_size ({self.buffer_size})")
        if self.clip_range <= 0 or self.adv_clip_max <= 0:
            raise ValueError("clip_range and adv_clip_max must be positive")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be positive, weight_decay non-negative")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        check_accumulation(self, ("minibatch_size", self.minibatch_size))


def train_ddpo(
    backend,
    reward_fn,
    prompts: list[dict],
    cfg: DDPOConfig,
    out: str | Path,
    progress: bool = True,
    logger: RunLogger | None = None,
    accelerator=None,
) -> list[dict]:
    """Fine-tune ``backend`` in place with DDPO (any backend: it only calls ``stochastic_step``);
    resumes from ``out``.

    ``reward_fn(images in [0, 1] (B, 3, H, W), prompts, metadata=prompt rows) -> (rewards (B,), info)``.
    Returns this call's log rows (reward_mean/std, loss, clip_frac, approx_kl, ...). The final model
    is saved to ``out``.

    With an ``accelerate.Accelerator`` of N processes, ``batch_size`` is global: every rank draws the
    same ``batch_size`` prompts, samples and scores its contiguous share (which must split evenly,
    with its own noise stream), and the rewards are gathered, so the per-prompt statistics (or the
    batch's) see the global batch and every rank holds the same tracker. Each rank then trains on
    its slice of the advantages, ``minibatch_size`` samples per process per optimiser step, with the
    gradients averaged over ranks (:class:`~t2ialign.algorithms.common.Ranks`). The main process
    alone writes the log, checkpoints and the model; every rank resumes from the same ``out``.
    """
    check_prompts(prompts)
    run = TrainingRun(backend, cfg, out, "ddpo", accelerator=accelerator, logger=logger)
    ranks = run.ranks
    mine = ranks.shard(cfg.batch_size)  # before any collective: fails early on an uneven split
    run.start()
    tracker = PerPromptStatTracker(cfg.buffer_size, cfg.min_count)
    tracker.load_state_dict(run.extra.get("stats", {}))
    if cfg.variant == "is":

        def step_loss(lp, old, a):
            return ppo_clip_loss(lp, old, a, cfg.clip_range)
    else:

        def step_loss(lp, old, a):
            return reinforce_loss(lp, a)

    steps = list(range(cfg.train_steps))
    for it in run.steps(cfg.iterations, progress, unit="it"):
        g = ranks.generator(cfg.seed, it)
        rng = np.random.default_rng([cfg.seed, it])
        chosen = [prompts[int(i)] for i in rng.integers(len(prompts), size=cfg.batch_size)]
        t0 = time.perf_counter()
        batch = collect_rollouts(
            backend, reward_fn, chosen[mine], cfg.train_steps, cfg.guidance, None, g, ranks
        )
        rewards = ranks.gather(batch.rewards)  # the global batch, in rank order (= the order of chosen)
        if cfg.per_prompt_stats:
            adv = tracker.update([r["prompt"] for r in chosen], rewards)
        else:
            adv = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)
        adv = adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max)[mine]
        t1 = time.perf_counter()
        stats = optimise_policy(
            backend,
            run,
            batch,
            adv,
            steps,
            step_loss=step_loss,
            guidance=cfg.guidance,
            clip_range=cfg.clip_range,
            beta=0.0,
            step_reduce="sum",
            minibatch_size=cfg.minibatch_size,
            inner_epochs=cfg.inner_epochs,
            timestep_fraction=cfg.timestep_fraction,
            generator=g,
        )
        row = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)),
            **ranks.mean_scalars(stats),
            "sample_s": t1 - t0,
            "train_s": time.perf_counter() - t1,
            **ranks.mean_scalars(scalar_info(batch.info)),
        }
        run.record(row, it + 1, reward=f"{row['reward_mean']:.3f}", loss=f"{row['loss']:.2e}")
        run.checkpoint(it + 1, extra={"stats": tracker.state_dict()})
    return run.finish()
