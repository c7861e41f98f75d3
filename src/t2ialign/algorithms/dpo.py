"""Diffusion-DPO, offline from pairwise preferences (Wallace et al. 2023; METHODS.md section 4).

For a pair (winner w, loser l) of images of the same prompt, both noised with the same ``eps`` and
``s`` (``x_s = (1 - s) x0 + s eps``, target ``v = eps - x0`` for flow models, ``eps`` for epsilon
models), with ``err_theta(x) = mean_dims ||v - out_theta(x_s)||^2`` and ``err_ref`` the same for the
frozen reference model (``with backend.reference():``):

    d = (err_theta(w) - err_ref(w)) - (err_theta(l) - err_ref(l))
    L = -log sigmoid(-beta / 2 * d)                                  (:func:`dpo_loss`)

``d < 0`` means the model has moved towards the winner more than towards the loser, relative to the
reference; at ``d = 0`` (the start of training) ``L = log 2``.

The scale of beta. The squared norms here are means over dimensions, as in the public Diffusion-DPO
training code, which used beta = 5000 with exactly that reduction on SD 1.5 latents (the paper
writes the factor as ``beta T omega(lambda_t)``). What matters is ``beta * |d| / 2``: the sigmoid
saturates once it is a few units, and then the per-pair noise of d (one random s and eps per pair)
dominates the loss. Measured on the shipped 32x32 flow model (96 checker-labelled pairs from 8 seen
prompts, 40 steps, batch 8, lr 1e-5, full fine-tuning): |d| reached 1e-3 to 5e-3; with beta = 100,
500, 1000, 2000, 5000 the last-10-step loss was 0.68, 0.68, 0.78, 1.02, 1.95 (above log 2 from
beta = 1000 on, the noise regime) and the implicit accuracy on 20 held-out pairs 0.61, 0.69, 0.70,
0.66, 0.65 (80 noisy d values each: those differences are within noise). The default, 500, keeps
``beta |d| / 2`` of order one. Ties are excluded by the caller (see :class:`PairSamples`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from t2ialign.algorithms.common import RunLogger, check_lr_and_lora, seeded
from t2ialign.algorithms.run import TrainingRun, check_accumulation


def dpo_loss(
    err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-pair Diffusion-DPO loss (B,): ``-log sigmoid(-beta / 2 * d)`` with
    ``d = (err_w - ref_err_w) - (err_l - ref_err_l)`` (the reference errors carry no gradient)."""
    d = (err_w - ref_err_w.detach()) - (err_l - ref_err_l.detach())
    return -F.logsigmoid(-0.5 * beta * d)


@dataclass
class PairSamples:
    """Preference pairs: winner and loser images in [0, 1] (N, C, H, W), one prompt per pair. Ties
    carry no preference and must be left out by the caller."""

    winners: torch.Tensor
    losers: torch.Tensor
    prompts: list[str]

    def __post_init__(self):
        n = self.winners.shape[0]
        if self.winners.dim() != 4 or self.winners.shape != self.losers.shape:
            raise ValueError(
                f"winners {tuple(self.winners.shape)} and losers {tuple(self.losers.shape)} must be "
                "two (N, C, H, W) tensors of the same shape"
            )
        if len(self.prompts) != n:
            raise ValueError(f"{n} pairs but {len(self.prompts)} prompts")
        for name, t in (("winners", self.winners), ("losers", self.losers)):
            if not t.is_floating_point() or (n and (float(t.min()) < 0.0 or float(t.max()) > 1.0)):
                raise ValueError(f"{name} must be float images in [0, 1]")

    def __len__(self) -> int:
        return self.winners.shape[0]


@dataclass
class DPOConfig:
    steps: int = 500
    """Optimisation steps."""
    batch_size: int = 16
    """Pairs per step (drawn with replacement)."""
    beta: float = 500.0
    """DPO's inverse temperature for mean-over-dimension squared errors (see the module docstring)."""
    lr: float = 1e-5
    """AdamW learning rate."""
    lora_rank: int = 0
    """LoRA rank through peft; 0 means full fine-tuning of the denoiser."""
    lora_alpha: float = 16.0
    """LoRA scaling alpha."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    checkpoint_every: int = 50
    """Save a resumable trainer state every this many steps."""
    seed: int = 0
    """Seeds the batches and the noise (resume draws the same)."""
    gradient_accumulation_steps: int = 1
    """K: each step's pairs go through the model in K equal micro-batches whose gradients add up
    (the same step, a K-th of the activations; see ``t2ialign.algorithms.run``)."""

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, batch_size and checkpoint_every must be positive")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        check_lr_and_lora(self)
        check_accumulation(self, ("batch_size", self.batch_size))


def train_dpo(
    backend,
    pairs: PairSamples,
    cfg: DPOConfig,
    out: str | Path,
    progress: bool = True,
    logger: RunLogger | None = None,
    accelerator=None,
) -> list[dict]:
    """Fine-tune ``backend`` in place with Diffusion-DPO on ``pairs``; resumes from ``out``.

    Returns this run's log rows (loss, implicit_acc = share of pairs with d < 0, d_mean, model_mse,
    ref_mse); the final model is saved to ``out``.

    With an ``accelerate.Accelerator`` of N processes, ``batch_size`` is per process: every rank
    draws the same global batch of N times as many pairs (the draw one process with the global batch
    size would make, noise included), trains on its contiguous share and the gradients are averaged
    (:class:`~t2ialign.algorithms.common.Ranks`). The loss is the mean over the rank's pairs, so the
    average over ranks is the mean over the global batch: a step of 2 processes x B pairs equals one
    of 1 process x 2B pairs. The logged values are the global batch's. The main process alone writes
    the log, checkpoints and the model; all ranks resume from the same ``out``.
    """
    if len(pairs) == 0:
        raise ValueError("no preference pairs to train on")
    run = TrainingRun(backend, cfg, out, "dpo", accelerator=accelerator, logger=logger).start()
    ranks = run.ranks
    batch_size = cfg.batch_size * ranks.world  # the global batch
    mine = ranks.shard(batch_size)
    dev = backend.device
    for k in run.steps(cfg.steps, progress):
        g = seeded(cfg.seed, k)
        # the global batch's pairs and noise, this rank's share: any process count draws the same
        idx = torch.randint(len(pairs), (batch_size,), generator=g)[mine]
        texts = [pairs.prompts[int(i)] for i in idx]
        x_w, x_l = backend.encode_images(torch.cat([pairs.winners[idx], pairs.losers[idx]]).to(dev)).chunk(2)
        eps = torch.randn((batch_size, *x_w.shape[1:]), generator=g)[mine].to(dev)
        s = torch.rand(batch_size, generator=g)[mine].to(dev)
        n = len(idx)
        run.zero_grad()
        parts = []  # per micro-batch: loss, err_w, err_l, ref_w, ref_l
        for m in run.micro_batches(n):
            x0 = torch.cat([x_w[m], x_l[m]])
            e, t = torch.cat([eps[m], eps[m]]), torch.cat([s[m], s[m]])  # winner and loser: one noise
            cond = backend.encode(texts[m] + texts[m])
            x_s, target = backend.add_noise(x0, e, t), backend.target(x0, e, t)
            err = (backend.predict(x_s, t, cond) - target).pow(2).flatten(1).mean(1)
            with torch.no_grad(), backend.reference():
                ref_err = (backend.predict(x_s, t, cond) - target).pow(2).flatten(1).mean(1)
            err_w, err_l = err.chunk(2)
            ref_w, ref_l = ref_err.chunk(2)
            # the batch's mean loss, this micro-batch's share of it
            loss = dpo_loss(err_w, err_l, ref_w, ref_l, cfg.beta).mean() * ((m.stop - m.start) / n)
            run.backward(loss)
            parts.append((loss.detach(), err_w.detach(), err_l.detach(), ref_w, ref_l))
        run.step()
        loss = sum(p[0] for p in parts)
        err_w, err_l, ref_w, ref_l = (torch.cat([p[i] for p in parts]) for i in range(1, 5))
        d = (err_w - ref_w) - (err_l - ref_l)
        row = {
            "loss": loss.item(),
            "implicit_acc": float((d < 0).float().mean()),
            "d_mean": float(d.mean()),
            "model_mse": float(torch.cat([err_w, err_l]).mean()),
            "ref_mse": float(torch.cat([ref_w, ref_l]).mean()),
        }
        row = ranks.mean_scalars(row)  # means over equal shards: the global batch's values
        run.record(row, k + 1, loss=f"{row['loss']:.4f}", acc=f"{row['implicit_acc']:.2f}")
        run.checkpoint(k + 1)
    return run.finish()
