"""RAFT: reward-ranked fine-tuning (Dong et al. 2023; METHODS.md section 3).

In rounds: sample K images per prompt with the current model (Euler ODE), keep the best of each
prompt by reward (:func:`raft_select`), and fine-tune on the kept samples with the plain denoising
loss (flow matching for flow models)

    L(theta) = E_{x in kept} L_fm(x, z)  +  pretrain_weight * E_{(x, z) ~ D_pre} L_fm(x, z),

then repeat with the new model. Each round's kept set replaces the last one. RAFT overfits as the
rounds go on (its samples become its only data); the pre-training term is the usual remedy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from t2ialign.algorithms._online import (
    check_pretrain,
    check_prompt_rows,
    pick_rows,
    pretrain_batch,
    pretrain_part,
    sample_latents,
    scalar_info,
)
from t2ialign.algorithms.common import RunLogger, call_reward, check_lr_and_lora, seeded
from t2ialign.algorithms.run import TrainingRun, check_accumulation
from t2ialign.algorithms.rwr import PretrainSource
from t2ialign.backends.base import denoising_loss


def raft_select(rewards: torch.Tensor, k: int, min_reward: float | None = None) -> torch.Tensor:
    """Indices (into ``rewards`` (P * K,), grouped by prompt in runs of ``k``) of each prompt's best
    sample (the first on ties), dropping prompts whose best reward is below ``min_reward``."""
    if rewards.numel() % k:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {k}")
    R = rewards.detach().reshape(-1, k)
    best = R.argmax(1)
    idx = torch.arange(R.shape[0]) * k + best.cpu()
    if min_reward is not None:
        idx = idx[(R.max(1).values >= min_reward).cpu()]
    return idx


@dataclass
class RAFTConfig:
    rounds: int = 10
    """Sample-filter-train rounds."""
    prompts_per_round: int = 32
    """Prompts drawn per round (without replacement while the list lasts); global under Accelerate."""
    samples_per_prompt: int = 8
    """K: images sampled per prompt, of which the best is kept (global under Accelerate)."""
    sample_steps: int = 20
    """Euler ODE steps when sampling."""
    guidance: float = 3.0
    """Classifier-free guidance when sampling (training is on the conditional model)."""
    min_reward: float | None = None
    """Keep a prompt's best sample only if its reward reaches this (None: always keep)."""
    steps_per_round: int = 20
    """Gradient steps on each round's kept samples."""
    batch_size: int = 16
    """Kept samples per gradient step (drawn with replacement; per process under Accelerate)."""
    pretrain_weight: float = 0.0
    """Weight of the denoising loss on pre-training data (0: off)."""
    pretrain_batch_size: int = 16
    """Pre-training samples per gradient step when pretrain_weight > 0 (per process under Accelerate)."""
    lr: float = 1e-4
    """AdamW learning rate."""
    lora_rank: int = 0
    """LoRA rank through peft; 0 means full fine-tuning of the denoiser."""
    lora_alpha: float = 16.0
    """LoRA scaling alpha."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    checkpoint_every: int = 1
    """Save a resumable trainer state every this many rounds."""
    seed: int = 0
    """Seeds prompts, sampling noise and training noise (resume draws the same)."""
    gradient_accumulation_steps: int = 1
    """K: each gradient step's batches go through the model in K equal micro-batches whose gradients
    add up (the same step, a K-th of the activations; see ``t2ialign.algorithms.run``)."""

    def __post_init__(self):
        for name in (
            "rounds",
            "prompts_per_round",
            "samples_per_prompt",
            "sample_steps",
            "steps_per_round",
            "batch_size",
            "checkpoint_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.pretrain_weight < 0 or self.pretrain_batch_size < 0:
            raise ValueError("pretrain_weight and pretrain_batch_size must be non-negative")
        check_lr_and_lora(self)
        pre = self.pretrain_batch_size * (self.pretrain_weight > 0)
        check_accumulation(self, ("batch_size", self.batch_size), ("pretrain_batch_size", pre))


def train_raft(
    backend,
    reward_fn,
    prompts: list[dict],
    cfg: RAFTConfig,
    out: str | Path,
    progress: bool = True,
    logger: RunLogger | None = None,
    pretrain_source: PretrainSource | None = None,
    accelerator=None,
) -> list[dict]:
    """Fine-tune ``backend`` in place with RAFT; resumes from ``out`` (at a round boundary).

    Returns this run's log rows (one per round); the final model is saved to ``out``.

    With an ``accelerate.Accelerator`` of N processes, ``prompts_per_round`` and
    ``samples_per_prompt`` are global: every rank draws the same prompts, and the round's
    ``prompts_per_round * samples_per_prompt`` samples (which must split evenly over the ranks) are
    sharded contiguously, so a prompt's K samples may span ranks. Each rank samples and scores its
    share with its own noise stream; the rewards are gathered, the best of K is selected over the
    global set and every rank receives all kept latents (one all-reduce of the kept samples only).
    Fine-tuning is data-parallel: each rank draws ``batch_size`` kept samples per gradient step
    (``pretrain_batch_size`` per process too: each rank takes its share of the pre-training batch)
    with its own noise, and the gradients are averaged over ranks. The main process alone writes the
    log, checkpoints and the model; every rank resumes from the same ``out``.
    """
    check_prompt_rows(prompts)
    use_pre = check_pretrain(cfg.pretrain_weight, cfg.pretrain_batch_size, pretrain_source)
    run = TrainingRun(backend, cfg, out, "raft", accelerator=accelerator, logger=logger)
    ranks = run.ranks
    # before any collective: fails early on an uneven split
    mine = ranks.shard(cfg.prompts_per_round * cfg.samples_per_prompt)
    run.start()
    dev = backend.device
    K = cfg.samples_per_prompt
    B = cfg.batch_size
    for rnd in run.steps(cfg.rounds, progress, unit="round"):
        g = seeded(cfg.seed, rnd)
        # the same prompts on every rank; this rank samples its share of the global set
        meta_all = [row for row in pick_rows(prompts, cfg.prompts_per_round, g) for _ in range(K)]
        if ranks.rank:  # rank 0 goes on with the stream of one process, the others with their own
            g = ranks.generator(cfg.seed, rnd)
        meta = meta_all[mine]
        texts = [row["prompt"] for row in meta]
        cond = backend.encode(texts)
        x0 = sample_latents(backend, cond, len(texts), cfg.sample_steps, cfg.guidance, g)
        with torch.no_grad():
            images = backend.decode(x0)
        local_rewards, info = call_reward(reward_fn, images, texts, meta, ranks)
        rewards = ranks.gather(local_rewards)  # the global set, in rank order
        keep = raft_select(rewards, K, cfg.min_reward)  # indices into the global set
        if not ranks.active:
            kept_x0, kept_cond = x0[keep.to(dev)], cond.index(keep.to(dev))
        elif len(keep):  # every rank gets the kept latents: each fills in its own, then a sum
            own = (keep >= mine.start) & (keep < mine.stop)
            kept_x0 = x0.new_zeros((len(keep), *x0.shape[1:]))
            kept_x0[own.to(dev)] = x0[(keep[own] - mine.start).to(dev)]
            kept_x0 = ranks.all_sum(kept_x0)
            kept_cond = backend.encode([meta_all[int(i)]["prompt"] for i in keep])
        losses, pre_sum = [], 0.0
        if len(keep):
            for j in range(cfg.steps_per_round):
                idx = torch.randint(len(keep), (B,), generator=g).to(dev)
                eps = torch.randn((B, *x0.shape[1:]), generator=g).to(dev)
                s = torch.rand(B, generator=g).to(dev)
                step = rnd * cfg.steps_per_round + j
                pre = (
                    pretrain_batch(backend, pretrain_source, step, cfg.pretrain_batch_size, g, ranks)
                    if use_pre
                    else None
                )
                parts = run.micro_batches(B)
                pre_parts = (
                    run.micro_batches(cfg.pretrain_batch_size, len(parts)) if use_pre else [None] * len(parts)
                )
                run.zero_grad()
                step_loss = step_pre = 0.0
                for m, pm in zip(parts, pre_parts, strict=True):
                    i = idx[m]  # each micro-batch's losses count by its share of the batch
                    loss = denoising_loss(backend, kept_x0[i], kept_cond.index(i), eps[m], s[m]).mean() * (
                        len(i) / B
                    )
                    step_loss += loss.item()
                    if use_pre:
                        pre_loss = pretrain_part(backend, pre, pm)
                        loss = loss + cfg.pretrain_weight * pre_loss
                        step_pre += pre_loss.item()
                    run.backward(loss)
                run.step()
                losses.append(step_loss)
                pre_sum += step_pre
        n_steps = max(1, len(losses))
        row = {
            **ranks.mean_scalars({"loss": sum(losses) / n_steps, "pre_loss": pre_sum / n_steps}),
            "reward_mean": float(rewards.mean()),
            "kept_reward_mean": float(rewards[keep].mean()) if len(keep) else 0.0,
            "kept": float(len(keep)),
            **ranks.mean_scalars(scalar_info(info)),
        }
        run.record(row, rnd + 1, reward=f"{row['reward_mean']:.3f}", kept=len(keep))
        run.checkpoint(rnd + 1)
    return run.finish()
