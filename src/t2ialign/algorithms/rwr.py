"""Reward-weighted likelihood fine-tuning: the seed paper's method (Lee et al. 2023, METHODS.md s. 1).

    L(theta) = E_{(x,z) ~ D_model} [ -r(x, z) log p_theta(x | z) ]
             + beta * E_{(x,z) ~ D_pre} [ -log p_theta(x | z) ]

with ``-log p_theta`` replaced by the denoising (flow-matching) loss. ``D_model`` holds the labelled
model samples (weight = the human label, or the reward model's score) and, optionally, unlabelled
model samples scored by the reward model (the paper's pseudo-labels); ``D_pre`` is pre-training
data, passed in as a callable so that the trainer never sees where it comes from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from t2ialign.algorithms.common import RunLogger, check_lr_and_lora, seeded
from t2ialign.algorithms.run import TrainingRun, check_accumulation
from t2ialign.backends.base import denoising_loss


def rwr_loss(
    model_losses: torch.Tensor, weights: torch.Tensor, pre_losses: torch.Tensor | None, beta: float
) -> torch.Tensor:
    """sum_i w_i L_fm(x_i, z_i) / sum_i w_i  +  beta * mean_j L_fm(x_pre_j, z_j).

    The weighted term is normalised by the total weight, so binary weights give the plain loss on
    the kept samples (a batch whose weights are all 0 contributes nothing).
    """
    total = weights.sum()
    weighted = (weights * model_losses).sum() / total if total > 0 else model_losses.sum() * 0.0
    if pre_losses is None or beta == 0:
        return weighted
    return weighted + beta * pre_losses.mean()


def rwr_loss_shard(
    model_losses: torch.Tensor,
    weights: torch.Tensor,
    pre_losses: torch.Tensor | None,
    beta: float,
    global_weight: torch.Tensor,
    world: int,
    micro_batches: int = 1,
) -> torch.Tensor:
    """One part of :func:`rwr_loss` over a global batch split evenly over ``world`` ranks, each rank's
    share in ``micro_batches`` equal micro-batches (gradient accumulation):

        world * sum_{i in part} w_i L_i / global_weight  +  beta * mean_{j in part} L_pre_j / micro_batches

    Summed over a rank's micro-batches and averaged over ranks (what accumulating and then averaging
    the gradients computes), these are :func:`rwr_loss` of the global batch."""
    weighted = (
        (weights * model_losses).sum() * world / global_weight
        if global_weight > 0
        else model_losses.sum() * 0.0
    )
    if pre_losses is None or beta == 0:
        return weighted
    return weighted + beta * pre_losses.mean() / micro_batches


@dataclass
class RWRConfig:
    steps: int = 300
    """Optimisation steps."""
    batch_size: int = 32
    """Model samples (labelled and pseudo-labelled) per step."""
    pretrain_batch_size: int = 32
    """Pre-training samples per step (the paper used half of each batch)."""
    beta: float = 1.0
    """Weight of the pre-training term; 0 removes it."""
    pseudo_fraction: float = 0.5
    """Share of each step's model samples drawn from the pseudo-labelled pool (0: labelled only)."""
    lr: float = 1e-4
    """AdamW learning rate."""
    lora_rank: int = 0
    """LoRA rank through peft; 0 means full fine-tuning of the denoiser."""
    lora_alpha: float = 16.0
    """LoRA scaling alpha."""
    sample_guidance: float = 1.0
    """The classifier-free guidance the model samples were drawn with: their loss is taken on the
    guided prediction at this scale (``denoising_loss``), so that the tuned model, sampled the same
    way, reproduces the samples it was rewarded for. 1 trains the conditional prediction alone (right
    for samples drawn without guidance). The pre-training term is always the plain conditional loss.
    Measured on the shipped model with checker labels (docs/RESULTS.md, "Why reward-weighted
    likelihood lowers alignment here"): 3 did no better than 1 (seen accuracy 0.335 vs 0.346, base
    0.445) at twice the cost; the drift is self-distillation, not compounded guidance."""
    cond_dropout: float = 0.0
    """Share of the model samples' prompts replaced by the null prompt, drawn per sample and step (as
    pre-training's condition dropout). The unconditional prediction then learns the kept samples'
    prompt-independent content (the objects) as the conditional one does, so classifier-free
    guidance amplifies only what the prompt changes; with 0 only the conditional prediction moves
    and guidance amplifies its whole drift. 0 keeps the paper's loss exactly."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    ema: float = 0.99
    """Decay of an exponential moving average of the trained weights; the saved model is the average
    (as pre-training samples from an EMA). 0 saves the raw weights."""
    checkpoint_every: int = 50
    """Save a resumable trainer state every this many steps."""
    seed: int = 0
    """Seeds the batch composition and the noise (resume draws the same)."""
    gradient_accumulation_steps: int = 1
    """K: each step's batches (``batch_size``, ``pretrain_batch_size``) go through the model in K equal
    micro-batches whose gradients add up (the same step, a K-th of the activations; see
    ``t2ialign.algorithms.run``)."""

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.pretrain_batch_size < 0:
            raise ValueError("steps and batch_size must be positive, pretrain_batch_size non-negative")
        if self.beta < 0:
            raise ValueError(f"beta must be non-negative, got {self.beta}")
        if self.sample_guidance <= 0:
            raise ValueError(f"sample_guidance must be positive, got {self.sample_guidance}")
        if not 0.0 <= self.pseudo_fraction <= 1.0:
            raise ValueError(f"pseudo_fraction must be in [0, 1], got {self.pseudo_fraction}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        check_lr_and_lora(self)
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        check_accumulation(
            self,
            ("batch_size", self.batch_size),
            ("pretrain_batch_size", self.pretrain_batch_size * (self.beta > 0)),
        )


@dataclass
class WeightedSamples:
    """Model samples with their weights: images in [0, 1] (N, 3, H, W), prompts, weights (N,)."""

    images: torch.Tensor
    prompts: list[str]
    weights: torch.Tensor

    def __post_init__(self):
        n = self.images.shape[0]
        if len(self.prompts) != n or self.weights.shape != (n,):
            raise ValueError(f"{n} images, {len(self.prompts)} prompts, weights {tuple(self.weights.shape)}")
        if (self.weights < 0).any():
            raise ValueError("reward weights must be non-negative (rescale rewards to [0, 1])")

    def __len__(self) -> int:
        return self.images.shape[0]


PretrainSource = Callable[[int, int], tuple[torch.Tensor, list[str]]]
"""pretrain_source(step, batch_size) -> (images in [0, 1] (B, 3, H, W), prompts)."""


def train_rwr(
    backend,
    cfg: RWRConfig,
    labelled: WeightedSamples,
    out: str | Path,
    pseudo: WeightedSamples | None = None,
    pretrain_source: PretrainSource | None = None,
    progress: bool = True,
    logger: RunLogger | None = None,
    accelerator=None,
) -> list[dict]:
    """Fine-tune ``backend`` in place by reward-weighted likelihood; resumes from ``out``.

    Returns the log rows (step, loss, model_loss, pre_loss). The final model is saved to ``out``.

    With an ``accelerate.Accelerator`` of N processes, ``batch_size`` and ``pretrain_batch_size``
    are per process: every rank draws the same global batch of N times as many (the draw a single
    process with the global batch size would make, noise included), trains on its contiguous share
    and the gradients are averaged (:class:`~t2ialign.algorithms.common.Ranks`), with the weighted
    term normalised by the global weight, so a step equals one step of one process on the global
    batch. The main process alone writes the log, checkpoints and the model; all ranks resume from
    the same ``out`` (a changed process count resumes too, with the new global batch).
    """
    if cfg.beta > 0 and cfg.pretrain_batch_size > 0 and pretrain_source is None:
        raise ValueError("beta > 0 needs pre-training data (pretrain_source), or set beta = 0")
    if len(labelled) == 0 and (pseudo is None or len(pseudo) == 0):
        raise ValueError("no model samples to train on")
    run = TrainingRun(backend, cfg, out, "rwr", accelerator=accelerator, logger=logger).start()
    ranks, params = run.ranks, run.params
    if run.extra.get("ema"):  # full tensors: under FSDP, cut into this rank's shards
        ema = [ranks.local_like(e, p) for e, p in zip(run.extra["ema"], params, strict=True)]
    else:
        ema = [p.detach().clone() for p in params]
    batch_size = cfg.batch_size * ranks.world  # the global batch
    pre_batch_size = cfg.pretrain_batch_size * ranks.world
    n_pseudo = 0 if pseudo is None or len(pseudo) == 0 else round(batch_size * cfg.pseudo_fraction)
    n_lab = batch_size - n_pseudo if len(labelled) else 0
    if n_lab == 0 and n_pseudo == 0:
        n_pseudo = batch_size
    mine = ranks.shard(batch_size)
    use_pre = cfg.beta > 0 and cfg.pretrain_batch_size > 0
    dev = backend.device
    for k in run.steps(cfg.steps, progress):
        g = seeded(cfg.seed, k)
        rng = np.random.default_rng([cfg.seed, k])
        parts = []
        if n_lab:
            parts.append((labelled, rng.integers(len(labelled), size=n_lab)))
        if n_pseudo:
            parts.append((pseudo, rng.integers(len(pseudo), size=n_pseudo)))
        imgs = torch.cat([d.images[i] for d, i in parts])[mine].to(dev)
        prompts = [d.prompts[j] for d, i in parts for j in i]
        if cfg.cond_dropout > 0:  # the global batch's draw, as the noise below
            drop = rng.random(len(prompts)) < cfg.cond_dropout
            prompts = ["" if d else p for d, p in zip(drop, prompts, strict=True)]
        prompts = prompts[mine]
        w = torch.cat([d.weights[i] for d, i in parts])[mine].to(dev)
        x0 = backend.encode_images(imgs)
        # the noise of the global batch, this rank's share: any process count draws the same
        eps = torch.randn((batch_size, *x0.shape[1:]), generator=g)[mine].to(dev)
        s = torch.rand(batch_size, generator=g)[mine].to(dev)
        cond = backend.encode(prompts)
        if use_pre:
            pmine = ranks.shard(pre_batch_size)
            pimgs, pprompts = pretrain_source(k, pre_batch_size)
            px0 = backend.encode_images(pimgs[pmine].to(dev))
            peps = torch.randn((pre_batch_size, *px0.shape[1:]), generator=g)[pmine].to(dev)
            ps = torch.rand(pre_batch_size, generator=g)[pmine].to(dev)
            pcond = backend.encode(list(pprompts)[pmine])
        K = run.accumulation
        split = ranks.active or K > 1
        total_weight = ranks.all_sum(w.sum()) if split else None
        run.zero_grad()
        loss_sum, model_parts, pre_parts = 0.0, [], []
        micro = run.micro_batches(len(w))
        pre_micro = run.micro_batches(len(px0)) if use_pre else [None] * len(micro)
        for m, pm in zip(micro, pre_micro, strict=True):
            model_losses = denoising_loss(backend, x0[m], cond.index(m), eps[m], s[m], cfg.sample_guidance)
            pre_losses = None
            if use_pre:
                pre_losses = denoising_loss(backend, px0[pm], pcond.index(pm), peps[pm], ps[pm])
                pre_parts.append(pre_losses.detach())
            if split:
                loss = rwr_loss_shard(model_losses, w[m], pre_losses, cfg.beta, total_weight, ranks.world, K)
            else:
                loss = rwr_loss(model_losses, w[m], pre_losses, cfg.beta)
            run.backward(loss)
            loss_sum += loss.item()
            model_parts.append(model_losses.detach())
        run.step()
        with torch.no_grad():
            for pe, p in zip(ema, params, strict=True):
                pe.lerp_(p.detach(), 1.0 - cfg.ema)
        ml = torch.cat(model_parts)
        row = {
            "loss": loss_sum,
            "model_loss": float((w * ml).sum() / w.sum().clamp(min=1e-8)),
            "pre_loss": float(torch.cat(pre_parts).mean()) if pre_parts else 0.0,
            "mean_weight": float(w.mean()),
        }
        if ranks.active:  # the global batch's values (equal shards: means of the ranks' means)
            wl, ws = ranks.all_sum(torch.stack([(w * ml).sum(), w.sum()])).tolist()
            row = {**ranks.mean_scalars(row), "model_loss": wl / max(ws, 1e-8)}
        run.record(row, k + 1, loss=f"{row['loss']:.4f}")
        run.checkpoint(k + 1, extra={"ema": ema})
    if cfg.ema > 0:
        with torch.no_grad():
            for pe, p in zip(ema, params, strict=True):
                p.copy_(pe)
    return run.finish()
