"""DiffusionNFT's loss on a labelled set: the seed paper's data, good *and* bad images used.

The seed paper's objective (:mod:`t2ialign.algorithms.rwr`) fits the model to the images labelled
good. On a model's own samples that is mostly self-distillation (the model re-learns what it drew,
drifting further from the data each time), and only a little selection: on this world's models it
lowered the checker's accuracy even with the checker's own labels (docs/RESULTS.md). Here the same
labelled images feed DiffusionNFT's contrast between an implicit positive and negative policy
(Zheng et al. 2025; METHODS.md s. 2), with the old policy held at the frozen base model:

    r_i = 0.5 + 0.5 * clip((y_i - mean_c y) / std_c y, -adv_clip, adv_clip) / adv_clip
    v_plus  = (1 - beta) v_ref + beta v_theta,      v_minus = (1 + beta) v_ref - beta v_theta,
    L = adv_clip / beta * E_i [ r_i ||v_plus - v||^2 + (1 - r_i) ||v_minus - v||^2 ]
        + pretrain_weight * E_pre [ ||v_theta - v||^2 ]

with ``y`` the label (or reward) and mean and std over the images of the same prompt ``c``. At small
beta its gradient is that of ``A_i ||v_theta - v||^2``, ``A`` the prompt-centred advantage: the
paper's reward-weighted likelihood with a per-prompt baseline, so a prompt whose images are all good
(or all bad) teaches nothing and what the model drew anyway cancels between good and bad.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from t2ialign.algorithms._online import pretrain_batch, pretrain_part
from t2ialign.algorithms.common import RunLogger, check_lr_and_lora, seeded
from t2ialign.algorithms.nft import nft_loss
from t2ialign.algorithms.run import TrainingRun, check_accumulation
from t2ialign.algorithms.rwr import PretrainSource, WeightedSamples


def prompt_optimality(
    weights: torch.Tensor, prompts: list[str], adv_clip: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels or rewards (N,) to (r (N,) in [0, 1], A (N,) in [-adv_clip, adv_clip]), normalised
    within each prompt's images: ``A = clip((y - mean_c) / (std_c + 1e-4))``, ``r = 0.5 + 0.5 A /
    adv_clip`` (:func:`~t2ialign.algorithms.nft.nft_optimality` with groups of any size). A prompt
    with one image, or with equal labels, gets r = 0.5: no signal."""
    if len(prompts) != weights.numel():
        raise ValueError(f"{weights.numel()} weights for {len(prompts)} prompts")
    y = weights.detach().double()
    adv = torch.zeros_like(y)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    for idx in groups.values():
        g = y[idx]
        adv[idx] = (g - g.mean()) / (g.std(correction=0) + 1e-4)
    adv = adv.clamp(-adv_clip, adv_clip).float()
    return 0.5 + 0.5 * adv / adv_clip, adv


@dataclass
class LabelledNFTConfig:
    steps: int = 300
    """Optimisation steps."""
    batch_size: int = 32
    """Labelled images per step (drawn from those with signal, r != 0.5)."""
    beta: float = 1.0
    """NFT's mixing strength between the reference and the trained velocity (> 0)."""
    adv_clip: float = 5.0
    """Advantages are clipped to +-adv_clip; the loss is scaled by adv_clip / beta."""
    guidance: float = 1.0
    """Classifier-free guidance of the trained and the reference velocity (1: the conditional one)."""
    pretrain_weight: float = 0.0
    """Weight of the denoising loss on pre-training data (0: off)."""
    pretrain_batch_size: int = 32
    """Pre-training samples per step when pretrain_weight > 0."""
    lr: float = 3e-5
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
    """K: each step's batches go through the model in K equal micro-batches whose gradients add up."""

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, batch_size and checkpoint_every must be positive")
        if self.beta <= 0 or self.adv_clip <= 0 or self.guidance <= 0:
            raise ValueError(
                "beta, adv_clip and guidance must be positive, "
                f"got {self.beta}, {self.adv_clip}, {self.guidance}"
            )
        if self.pretrain_weight < 0 or self.pretrain_batch_size < 0:
            raise ValueError("pretrain_weight and pretrain_batch_size must be non-negative")
        check_lr_and_lora(self)
        pre = self.pretrain_batch_size * (self.pretrain_weight > 0)
        check_accumulation(self, ("batch_size", self.batch_size), ("pretrain_batch_size", pre))


def train_nft_labelled(
    backend,
    cfg: LabelledNFTConfig,
    labelled: WeightedSamples,
    out: str | Path,
    pretrain_source: PretrainSource | None = None,
    progress: bool = True,
    logger: RunLogger | None = None,
) -> list[dict]:
    """Fine-tune ``backend`` in place on ``labelled`` (weights: labels or rewards; images of one
    prompt are one group); resumes from ``out``. Returns the log rows; the model is saved to ``out``.
    One process (no ``accelerator``: the CLI refuses ``accelerate launch`` for this method)."""
    use_pre = cfg.pretrain_weight > 0 and cfg.pretrain_batch_size > 0
    if use_pre and pretrain_source is None:
        raise ValueError("pretrain_weight > 0 needs pre-training data (pretrain_source)")
    r_all, adv = prompt_optimality(labelled.weights, labelled.prompts, cfg.adv_clip)
    active = torch.nonzero(r_all != 0.5).flatten()
    if len(active) == 0:
        raise ValueError(
            "no prompt has both better and worse images: the labels hold no contrast to learn from "
            "(label more images per prompt)"
        )
    run = TrainingRun(backend, cfg, out, "nft-labelled", logger=logger).start()
    B, PB, scale = cfg.batch_size, cfg.pretrain_batch_size, cfg.adv_clip / cfg.beta
    dev = backend.device
    for k in run.steps(cfg.steps, progress):
        g = seeded(cfg.seed, k)
        pick = active[np.random.default_rng([cfg.seed, k]).integers(len(active), size=B)]
        x0 = backend.encode_images(labelled.images[pick].to(dev))
        cond = backend.encode([labelled.prompts[i] for i in pick.tolist()])
        eps = torch.randn(x0.shape, generator=g).to(dev)
        s = torch.rand(B, generator=g).to(dev)
        r = r_all[pick].to(dev)
        x_s, v = backend.add_noise(x0, eps, s), backend.target(x0, eps, s)
        with torch.no_grad(), backend.reference():
            v_ref = backend.predict(x_s, s, cond, guidance=cfg.guidance)
        pre = pretrain_batch(backend, pretrain_source, k, PB, g) if use_pre else None
        run.zero_grad()
        sums = {"loss": 0.0, "nft_loss": 0.0, "pre_loss": 0.0}
        micro = run.micro_batches(len(pick))
        pre_micro = run.micro_batches(PB, len(micro)) if use_pre else [None] * len(micro)
        for m, pm in zip(micro, pre_micro, strict=True):
            share = (m.stop - m.start) / len(pick)
            v_theta = backend.predict(x_s[m], s[m], cond.index(m), guidance=cfg.guidance)
            per = nft_loss(v_theta, v_ref[m], v[m], r[m], cfg.beta)
            loss = scale * per.mean() * share
            sums["nft_loss"] += per.mean().item() * share
            if use_pre:
                pre_loss = pretrain_part(backend, pre, pm)
                loss = loss + cfg.pretrain_weight * pre_loss
                sums["pre_loss"] += pre_loss.item()
            run.backward(loss)
            sums["loss"] += loss.item()
        run.step()
        row = {**sums, "mean_advantage": float(adv[pick].abs().mean())}
        run.record(row, k + 1, loss=f"{row['loss']:.4f}")
        run.checkpoint(k + 1)
    return run.finish()
