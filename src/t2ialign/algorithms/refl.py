"""Reward-gradient fine-tuning: ReFL (Xu et al. 2023, ImageReward) and DRaFT-K / DRaFT-LV (Clark et al.
2023); METHODS.md section 3. Both need a reward that is differentiable w.r.t. the pixels.

ReFL: sample without gradient (Euler ODE) down to a random late grid step k (one of the last
``late_steps``), take one network evaluation with gradient there and predict the clean image
``x0_hat = predict_x0(out_theta(x_k, s_k), x_k, s_k)``; decode and score it:

    L(theta) = E phi( R(decode(x0_hat), c) )  +  pretrain_weight * E_{D_pre} L_fm(x, z),

with ``phi(R) = ReLU(margin - R)`` (ImageReward's ReLU(2 - R)) or ``phi(R) = -R`` (:func:`refl_phi`).

DRaFT-K: the full sampler, with gradient through its last K Euler steps only (K = 1: DRaFT-1), the
same loss on the final image. DRaFT-LV (K = 1): sample the whole chain without gradient, re-noise the
final x0 ``lv_samples`` times to the last step's noise level, ``x = (1 - s_{T-1}) x0 + s_{T-1} eps_i``,
take the last step with gradient from each, and average the loss over them (lower variance per
sample for the same number of chains).

The published pre-training term uses ``beta`` for ``pretrain_weight``; without it the images
degrade (the reward is easy to exploit through its gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from t2ialign.algorithms._online import (
    check_pretrain,
    check_prompt_rows,
    pick_rows,
    pretrain_batch,
    pretrain_part,
    scalar_info,
)
from t2ialign.algorithms.common import RunLogger, call_reward, check_lr_and_lora, seeded
from t2ialign.algorithms.run import TrainingRun, check_accumulation
from t2ialign.algorithms.rwr import PretrainSource

PHIS = ("relu", "neg")


def refl_phi(rewards: torch.Tensor, kind: str = "relu", margin: float = 2.0) -> torch.Tensor:
    """The per-sample reward loss: ``ReLU(margin - R)`` ("relu", ReFL as published with margin 2) or
    ``-R`` ("neg"). The ReLU form stops pushing a sample once its reward reaches ``margin``."""
    if kind == "relu":
        return F.relu(margin - rewards)
    if kind == "neg":
        return -rewards
    raise ValueError(f"phi must be one of {PHIS}, got {kind!r}")


def _euler(
    backend, cond, x: torch.Tensor, grid: torch.Tensor, start: int, stop: int, guidance: float
) -> torch.Tensor:
    """Euler (ODE) steps ``start .. stop - 1`` of the grid from ``x`` (with gradient if enabled)."""
    for j in range(start, stop):
        x = backend.ode_step(backend.predict(x, grid[j], cond, guidance=guidance), grid[j], grid[j + 1], x)
    return x


def refl_images(backend, cond, x1: torch.Tensor, grid: torch.Tensor, k: int, guidance: float) -> torch.Tensor:
    """ReFL's images: Euler steps 0..k-1 without gradient, then ``x0_hat`` from one prediction with
    gradient at ``grid[k]``, decoded (B, 3, H, W)."""
    with torch.no_grad():
        x = _euler(backend, cond, x1, grid, 0, k, guidance)
    out = backend.predict(x, grid[k], cond, guidance=guidance)
    return backend.decode(backend.predict_x0(out, x, grid[k]))


def draft_images(
    backend, cond, x1: torch.Tensor, grid: torch.Tensor, k: int, guidance: float
) -> torch.Tensor:
    """DRaFT-K's images: the Euler chain with gradient through its last ``k`` steps only, decoded."""
    steps = len(grid) - 1
    with torch.no_grad():
        x = _euler(backend, cond, x1, grid, 0, steps - k, guidance)
    return backend.decode(_euler(backend, cond, x, grid, steps - k, steps, guidance))


def draft_lv_images(
    backend, cond, x1: torch.Tensor, grid: torch.Tensor, noises: list[torch.Tensor], guidance: float
) -> torch.Tensor:
    """DRaFT-LV's images: the chain without gradient, its x0 re-noised to ``grid[-2]`` once by each
    of ``noises`` (each shaped like ``x1``) and denoised by one Euler step with gradient:
    (len(noises) * B, 3, H, W), the i-th block from the i-th noise."""
    steps = len(grid) - 1
    with torch.no_grad():
        x0 = _euler(backend, cond, x1, grid, 0, steps, guidance)
    s = torch.full((x0.shape[0],), float(grid[-2]), device=x0.device)
    outs = []
    for eps in noises:
        x = backend.add_noise(x0, eps, s)
        outs.append(backend.decode(_euler(backend, cond, x, grid, steps - 1, steps, guidance)))
    return torch.cat(outs)


@dataclass
class RewardGradConfig:
    iterations: int = 100
    """Optimisation steps (one batch of chains each)."""
    batch_size: int = 8
    """Prompts (one image each) per step."""
    sample_steps: int = 20
    """Euler ODE steps of the sampler."""
    guidance: float = 3.0
    """Classifier-free guidance while sampling (the gradient flows through the guided velocity)."""
    phi: str = "relu"
    """Reward loss: "relu" (ReLU(margin - R)) or "neg" (-R); see refl_phi."""
    margin: float = 2.0
    """The margin of the "relu" loss (ImageReward's 2; use ~1 for rewards in [0, 1])."""
    pretrain_weight: float = 1.0
    """Weight (the published beta) of the denoising loss on pre-training data; 0 removes it."""
    pretrain_batch_size: int = 8
    """Pre-training samples per step."""
    lr: float = 1e-5
    """AdamW learning rate."""
    lora_rank: int = 0
    """LoRA rank through peft; 0 means full fine-tuning of the denoiser."""
    lora_alpha: float = 16.0
    """LoRA scaling alpha."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    checkpoint_every: int = 25
    """Save a resumable trainer state every this many steps."""
    seed: int = 0
    """Seeds prompts, noise and the stop step (resume draws the same)."""
    gradient_accumulation_steps: int = 1
    """K: each step's prompts (and pre-training batch) go through the model in K equal micro-batches
    whose gradients add up (the same step, a K-th of the activations; see ``t2ialign.algorithms.run``)."""

    def __post_init__(self):
        for name in ("iterations", "batch_size", "sample_steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.phi not in PHIS:
            raise ValueError(f"phi must be one of {PHIS}, got {self.phi!r}")
        if self.pretrain_weight < 0 or self.pretrain_batch_size < 0:
            raise ValueError("pretrain_weight and pretrain_batch_size must be non-negative")
        check_lr_and_lora(self)
        pre = self.pretrain_batch_size * (self.pretrain_weight > 0)
        check_accumulation(self, ("batch_size", self.batch_size), ("pretrain_batch_size", pre))


@dataclass
class ReFLConfig(RewardGradConfig):
    late_steps: int = 5
    """The gradient step is drawn uniformly among the last ``late_steps`` steps of the grid (ImageReward:
    the last 10 of 40)."""

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.late_steps <= self.sample_steps:
            raise ValueError(f"late_steps must be in [1, sample_steps], got {self.late_steps}")


@dataclass
class DRaFTConfig(RewardGradConfig):
    phi: str = "neg"
    """Reward loss: "neg" (-R, DRaFT as published) or "relu" (ReLU(margin - R))."""
    k: int = 1
    """Backpropagate through the last K sampler steps (K = 1: DRaFT-1; K = sample_steps: full DRaFT)."""
    lv_samples: int = 0
    """DRaFT-LV: re-noisings of the final image per chain (needs k = 1; 0: off; the paper used 2)."""

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.k <= self.sample_steps:
            raise ValueError(f"k must be in [1, sample_steps], got {self.k}")
        if self.lv_samples < 0 or (self.lv_samples > 0 and self.k != 1):
            raise ValueError(f"lv_samples must be >= 0, and needs k = 1 (got k = {self.k})")


def _train_reward_gradient(
    method: str,
    backend,
    reward_fn,
    prompts,
    cfg: RewardGradConfig,
    out,
    progress,
    logger,
    pretrain_source,
    accelerator=None,
) -> list[dict]:
    """The loop ReFL and DRaFT share: only the way the images are made differs."""
    check_prompt_rows(prompts)
    use_pre = check_pretrain(cfg.pretrain_weight, cfg.pretrain_batch_size, pretrain_source)
    run = TrainingRun(backend, cfg, out, method, accelerator=accelerator, logger=logger).start()
    ranks = run.ranks
    batch_size = cfg.batch_size * ranks.world  # the global batch
    mine = ranks.shard(batch_size)
    dev = backend.device
    grid = backend.timesteps(cfg.sample_steps)
    for it in run.steps(cfg.iterations, progress):
        g = seeded(cfg.seed, it)
        # the global batch's prompts and noise, this rank's share: any process count draws the same
        meta = pick_rows(prompts, batch_size, g)[mine]
        texts = [row["prompt"] for row in meta]
        cond = backend.encode(texts)
        x1 = torch.randn((batch_size, *backend.latent_shape), generator=g)[mine].to(dev)
        extra = {}
        if method == "refl":
            k = cfg.sample_steps - 1 - int(torch.randint(cfg.late_steps, (1,), generator=g))
            extra["stop_step"] = float(k)
        elif cfg.lv_samples > 0:  # DRaFT-LV's re-noisings, drawn for the global batch
            noises = [
                torch.randn((batch_size, *x1.shape[1:]), generator=g)[mine].to(dev)
                for _ in range(cfg.lv_samples)
            ]
        pre = (
            pretrain_batch(backend, pretrain_source, it, cfg.pretrain_batch_size, g, ranks)
            if use_pre
            else None
        )
        n = len(texts)
        parts = run.micro_batches(n)
        pre_parts = run.micro_batches(cfg.pretrain_batch_size, len(parts)) if use_pre else [None] * len(parts)
        run.zero_grad()
        sums = {"loss": 0.0, "reward_loss": 0.0, "pre_loss": 0.0}
        info_sums: dict[str, float] = {}
        all_rewards = []
        for m, pm in zip(parts, pre_parts, strict=True):
            c, share = cond.index(m), (m.stop - m.start) / n  # each micro-batch counts by its share
            meta_m, texts_m = meta[m], texts[m]
            if method == "refl":
                images = refl_images(backend, c, x1[m], grid, k, cfg.guidance)
            elif cfg.lv_samples > 0:
                images = draft_lv_images(backend, c, x1[m], grid, [e[m] for e in noises], cfg.guidance)
                meta_m, texts_m = meta_m * cfg.lv_samples, texts_m * cfg.lv_samples
            else:
                images = draft_images(backend, c, x1[m], grid, cfg.k, cfg.guidance)
            rewards, info = call_reward(reward_fn, images, texts_m, meta_m, ranks)
            if not rewards.requires_grad:
                raise ValueError(
                    f"{method} needs a reward differentiable w.r.t. the pixels; reward_fn returned "
                    "rewards without gradient"
                )
            reward_loss = refl_phi(rewards, cfg.phi, cfg.margin).mean() * share
            loss = reward_loss
            if use_pre:
                pre_loss = pretrain_part(backend, pre, pm)
                loss = loss + cfg.pretrain_weight * pre_loss
                sums["pre_loss"] += pre_loss.item()
            run.backward(loss)
            sums["loss"] += loss.item()
            sums["reward_loss"] += reward_loss.item()
            all_rewards.append(rewards.detach())
            for key, v in scalar_info(info).items():
                info_sums[key] = info_sums.get(key, 0.0) + v * share
        grad_norm = run.step()
        row = {
            **sums,
            "reward_mean": float(torch.cat(all_rewards).mean()),
            "grad_norm": float(grad_norm),
            **extra,
            **info_sums,
        }
        row = ranks.mean_scalars(row)  # means over equal shards: the global batch's values
        run.record(row, it + 1, reward=f"{row['reward_mean']:.3f}", loss=f"{row['loss']:.4f}")
        run.checkpoint(it + 1)
    return run.finish()


def train_refl(
    backend,
    reward_fn,
    prompts: list[dict],
    cfg: ReFLConfig,
    out: str | Path,
    progress: bool = True,
    logger: RunLogger | None = None,
    pretrain_source: PretrainSource | None = None,
    accelerator=None,
) -> list[dict]:
    """Fine-tune ``backend`` in place with ReFL; resumes from ``out``. ``reward_fn`` must return rewards
    differentiable w.r.t. the images. Returns this run's log rows; the final model is saved to ``out``.

    With an ``accelerate.Accelerator`` of N processes, ``batch_size`` and ``pretrain_batch_size`` are
    per process: every rank draws the same global batch of N times as many prompts (the draw one
    process with the global batch size would make: prompts, noise, the stop step), samples and
    scores its contiguous share, and the gradients are averaged
    (:class:`~t2ialign.algorithms.common.Ranks`); the losses are means over the rank's share, so a
    step of 2 processes x B equals one of 1 process x 2B. The logged values are the global batch's.
    The main process alone writes the log, checkpoints and the model; all ranks resume from ``out``.
    """
    return _train_reward_gradient(
        "refl", backend, reward_fn, prompts, cfg, out, progress, logger, pretrain_source, accelerator
    )


def train_draft(
    backend,
    reward_fn,
    prompts: list[dict],
    cfg: DRaFTConfig,
    out: str | Path,
    progress: bool = True,
    logger: RunLogger | None = None,
    pretrain_source: PretrainSource | None = None,
    accelerator=None,
) -> list[dict]:
    """Fine-tune ``backend`` in place with DRaFT-K (or DRaFT-LV); resumes from ``out``. ``reward_fn`` must
    return rewards differentiable w.r.t. the images. Returns this run's log rows; the final model is
    saved to ``out``.

    With an ``accelerate.Accelerator`` of N processes, data-parallel as :func:`train_refl` (per-process
    batch sizes, the global batch's draws sharded, DRaFT-LV's re-noisings included)."""
    return _train_reward_gradient(
        "draft", backend, reward_fn, prompts, cfg, out, progress, logger, pretrain_source, accelerator
    )
