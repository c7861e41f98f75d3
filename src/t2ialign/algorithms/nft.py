"""DiffusionNFT: online RL on the forward process (Zheng et al. 2025; METHODS.md section 2).

No log-probabilities and no stored trajectories, only clean samples and their rewards. Each iteration

1. samples G images per prompt with the *old* policy (any solver: Euler ODE by default, and CFG-free
   by default, as published) and scores them;
2. maps the rewards to an optimality probability (:func:`nft_optimality`)

       r = 0.5 + 0.5 * clip( (R - mean_G) / Z, -1, 1 ),     Z = adv_clip * std_G;

3. re-noises every clean sample at s ~ U(0, 1) (``x_s = (1 - s) x0 + s eps``, target ``v = eps - x0``)
   and minimises, with ``v_old`` the old policy's velocity (no gradient), :func:`nft_loss`

       v_plus  = (1 - beta) v_old + beta v_theta,      v_minus = (1 + beta) v_old - beta v_theta,
       L = r ||v_plus - v||^2 + (1 - r) ||v_minus - v||^2,

   times ``adv_clip / beta`` (below), plus optional ``kl_weight * ||v_theta - v_ref||^2`` and
   ``pretrain_weight *`` the denoising loss on pre-training data;
4. moves the old policy towards the trained one by EMA: ``theta_old <- eta theta_old + (1 - eta) theta``
   with ``eta_i = min(ema_rate * i, ema_max)`` (the reference code's ramp: on-policy at first).

Why ``adv_clip / beta``: with ``a = v_old - v`` and ``d = v_theta - v_old``,
``L = ||a||^2 + 2 beta (2r - 1) <a, d> + beta^2 ||d||^2``, so ``dL/dv_theta = 2 beta (2r - 1) a + O(beta^2)``.
Scaled by ``adv_clip / beta`` the gradient at small beta is ``2 A (v_old - v)`` with
``A = adv_clip (2r - 1)`` the clipped group-normalised advantage: the gradient of the
advantage-weighted flow-matching loss ``A ||v_theta - v||^2`` at ``v_theta = v_old``. The reference
code applies the same scale. It also measures the errors in x0 space over an adaptive per-sample
weight; that is ``weighting="x0_adaptive"`` here, while the default is METHODS.md's velocity loss
(mean over dimensions), which did as well or better on the shipped model (see NFTConfig.lr).

The model saved at the end is the trained policy theta, not the EMA "old" copy.
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
    swapped_weights,
)
from t2ialign.algorithms.common import RunLogger, call_reward, check_lr_and_lora, seeded
from t2ialign.algorithms.run import TrainingRun, check_accumulation
from t2ialign.algorithms.rwr import PretrainSource

NORMALISERS = ("group_std", "global_std")
WEIGHTINGS = ("velocity", "x0_adaptive")


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    v_target: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    s: torch.Tensor | None = None,
    weighting: str = "velocity",
) -> torch.Tensor:
    """Per-sample DiffusionNFT loss (B,), squared norms averaged over dimensions:

        r ||(1 - beta) v_old + beta v_theta - v||^2 + (1 - r) ||(1 + beta) v_old - beta v_theta - v||^2

    ``v_old`` is detached here. At beta = 0 it is ``||v_old - v||^2`` (no gradient); its derivative
    in beta at 0 is ``2 (2r - 1) <v_old - v, v_theta - v_old>`` (mean over dimensions).

    ``weighting="x0_adaptive"`` (needs the noise levels ``s`` (B,)) measures each error in x0 space as
    the reference code does: ``x0_hat - x0 = -s (v_hat - v)``, and divides each squared error by its
    own detached mean absolute error (clipped at 1e-5): ``||e||^2 / sg(mean|e|)`` with ``e = s (v_hat - v)``.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    v_old = v_old.detach()
    r = r.to(v_theta.dtype)
    pos = ((1 - beta) * v_old + beta * v_theta - v_target).flatten(1)
    neg = ((1 + beta) * v_old - beta * v_theta - v_target).flatten(1)
    if weighting == "velocity":
        return r * pos.pow(2).mean(1) + (1 - r) * neg.pow(2).mean(1)
    if s is None:
        raise ValueError("weighting='x0_adaptive' needs the noise levels s")
    s = s.to(v_theta.dtype).reshape(-1, 1)

    def adaptive(err):
        err = s * err
        return (err.pow(2) / err.detach().abs().mean(1, keepdim=True).clamp(min=1e-5)).mean(1)

    return r * adaptive(pos) + (1 - r) * adaptive(neg)


def nft_optimality(
    rewards: torch.Tensor, group_size: int, adv_clip: float = 5.0, normaliser: str = "group_std"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (P * G,), grouped by prompt in consecutive runs of ``group_size``, to
    (r (P * G,) in [0, 1], A (P * G,) the clipped advantage in [-adv_clip, adv_clip]).

    ``A = clip((R - mean_G) / (std + 1e-4), -adv_clip, adv_clip)`` and ``r = 0.5 + 0.5 A / adv_clip``,
    i.e. the normaliser is ``Z = adv_clip * std``. ``std`` is the group's (population) standard
    deviation for ``"group_std"`` (as the reference code) or that of all rewards of the iteration for
    ``"global_std"`` (the paper's example). A group of equal rewards gets r = 0.5 everywhere.
    """
    if normaliser not in NORMALISERS:
        raise ValueError(f"normaliser must be one of {NORMALISERS}, got {normaliser!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    R = rewards.detach().float().reshape(-1, group_size)
    centred = R - R.mean(1, keepdim=True)
    if normaliser == "group_std":
        std = R.std(1, correction=0, keepdim=True)
    else:
        std = R.flatten().std(correction=0) if R.numel() > 1 else R.new_zeros(())
    adv = (centred / (std + 1e-4)).clamp(-adv_clip, adv_clip).flatten()
    return 0.5 + 0.5 * adv / adv_clip, adv


def ema_decay(iteration: int, rate: float, maximum: float) -> float:
    """eta_i = min(rate * i, maximum): the weight of the old policy in its EMA update."""
    return min(rate * iteration, maximum)


@dataclass
class NFTConfig:
    iterations: int = 100
    """Sample-score-train iterations."""
    prompts_per_iter: int = 8
    """Prompts drawn per iteration (without replacement while the list lasts); global under Accelerate."""
    group_size: int = 8
    """Images per prompt (G); advantages are relative to the group (global under Accelerate)."""
    sample_steps: int = 10
    """Sampler steps of the old policy."""
    sampler: str = "ode"
    """"ode" (Euler, deterministic) or "sde" (the backend's stochastic step): NFT needs no log-probs."""
    guidance: float = 1.0
    """Classifier-free guidance for sampling and for the trained velocity; 1.0 is CFG-free (as
    published). Other values train the guided velocity (two network passes per prediction)."""
    beta: float = 1.0
    """NFT's mixing strength between the old and the trained velocity (> 0)."""
    adv_clip: float = 5.0
    """Advantages are clipped to +-adv_clip; Z = adv_clip * std (the reference code's 5)."""
    normaliser: str = "group_std"
    """Standard deviation in Z: "group_std" (per prompt) or "global_std" (over the iteration)."""
    weighting: str = "velocity"
    """Error measure of the loss: "velocity" (METHODS.md) or "x0_adaptive" (the reference code's x0-space
    error over its detached mean; see nft_loss)."""
    train_batch_size: int = 16
    """Samples per gradient step (per process under Accelerate)."""
    inner_epochs: int = 1
    """Passes over each iteration's samples, each with fresh (s, eps)."""
    kl_weight: float = 0.0
    """Weight of ||v_theta - v_ref||^2 (mean over dimensions) to the frozen reference model (0: off)."""
    cond_dropout: float = 0.0
    """Share of each iteration's samples trained under the null prompt (their loss, old and reference
    velocities all unconditional; sampling keeps every prompt), drawn per sample as pre-training's
    condition dropout: the unconditional prediction then follows the prompt-independent part of the
    update, so that guidance does not amplify it. 0 keeps the published loss."""
    pretrain_weight: float = 0.0
    """Weight of the denoising loss on pre-training data (0: off)."""
    pretrain_batch_size: int = 16
    """Pre-training samples per gradient step when pretrain_weight > 0 (per process under Accelerate)."""
    ema_rate: float = 0.01
    """The old policy's EMA decay grows by this much per iteration ..."""
    ema_max: float = 0.5
    """... up to this (0 keeps the old policy equal to the last iteration's weights)."""
    lr: float = 3e-5
    """AdamW learning rate. Measured on the shipped model (full fine-tuning, checker reward, 8 seen
    prompts, G = 8, 60 iterations, one seed, on an H100; 256 held-out images per evaluation): 3e-5
    raised checker accuracy 0.51 -> 0.64 (CFG-free); 1e-4 first lost accuracy (0.45 at 20 iterations)
    and ended at 0.56; x0_adaptive at 1e-4 collapsed (0.28). Gains need tens of iterations: 12
    iterations at G = 6 on CPU showed none (0.60 -> 0.53 on 128 images, within noise)."""
    lora_rank: int = 0
    """LoRA rank through peft; 0 means full fine-tuning of the denoiser."""
    lora_alpha: float = 16.0
    """LoRA scaling alpha."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    checkpoint_every: int = 10
    """Save a resumable trainer state (with the EMA copy) every this many iterations."""
    seed: int = 0
    """Seeds prompts, noise and re-noising (resume draws the same)."""
    gradient_accumulation_steps: int = 1
    """K: each gradient step's samples (``train_batch_size``, and the pre-training batch) go through
    the model in K equal micro-batches whose gradients add up (the same step, a K-th of the
    activations; see ``t2ialign.algorithms.run``)."""

    def __post_init__(self):
        for name in (
            "iterations",
            "prompts_per_iter",
            "sample_steps",
            "train_batch_size",
            "inner_epochs",
            "checkpoint_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(
                f"group_size must be at least 2 (advantages are group-relative), got {self.group_size}"
            )
        if self.sampler not in ("ode", "sde"):
            raise ValueError(f"sampler must be 'ode' or 'sde', got {self.sampler!r}")
        if self.normaliser not in NORMALISERS:
            raise ValueError(f"normaliser must be one of {NORMALISERS}, got {self.normaliser!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if self.adv_clip <= 0:
            raise ValueError(f"adv_clip must be positive, got {self.adv_clip}")
        if self.kl_weight < 0 or self.pretrain_weight < 0 or self.pretrain_batch_size < 0:
            raise ValueError("kl_weight, pretrain_weight and pretrain_batch_size must be non-negative")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.ema_rate < 0 or not 0 <= self.ema_max < 1:
            raise ValueError(f"need ema_rate >= 0 and 0 <= ema_max < 1, got {self.ema_rate}, {self.ema_max}")
        check_lr_and_lora(self)
        pre = self.pretrain_batch_size * (self.pretrain_weight > 0)
        check_accumulation(self, ("train_batch_size", self.train_batch_size), ("pretrain_batch_size", pre))


def train_nft(
    backend,
    reward_fn,
    prompts: list[dict],
    cfg: NFTConfig,
    out: str | Path,
    progress: bool = True,
    logger: RunLogger | None = None,
    pretrain_source: PretrainSource | None = None,
    accelerator=None,
) -> list[dict]:
    """Fine-tune ``backend`` in place with DiffusionNFT; resumes from ``out``.

    ``prompts`` are rows with at least "prompt" (they are passed to ``reward_fn`` as metadata).
    Returns this run's log rows (one per iteration); the final model is saved to ``out``.

    With an ``accelerate.Accelerator`` of N processes, ``prompts_per_iter`` and ``group_size`` are
    global: every rank draws the same prompts, and the iteration's ``prompts_per_iter * group_size``
    samples (which must split evenly over the ranks) are sharded contiguously, so a group may span
    ranks. Each rank samples and scores its share with its own noise stream; the rewards are
    gathered and the optimality probabilities computed over the global groups (or the global
    batch's std). Each rank trains on its share, ``train_batch_size`` samples per process per
    gradient step (``pretrain_batch_size`` per process too: each rank takes its share of the
    pre-training batch), with the gradients averaged over ranks, so the weights, and with them the
    EMA old policy, stay identical on every rank. The main process alone writes the log,
    checkpoints and the model; every rank resumes from the same ``out``.
    """
    check_prompt_rows(prompts)
    if cfg.weighting == "x0_adaptive" and backend.prediction != "flow":
        raise ValueError("weighting='x0_adaptive' is written for flow models (x0_hat - x0 = -s (v_hat - v))")
    use_pre = check_pretrain(cfg.pretrain_weight, cfg.pretrain_batch_size, pretrain_source)
    run = TrainingRun(backend, cfg, out, "nft", accelerator=accelerator, logger=logger)
    ranks = run.ranks
    # before any collective: fails early on an uneven split
    mine = ranks.shard(cfg.prompts_per_iter * cfg.group_size)
    run.start()
    dev = backend.device
    live = backend.state_dict_trainable()
    # the EMA old policy; from a checkpoint full tensors, under FSDP cut into this rank's shards
    ema = (
        {k: ranks.local_like(v.to(dev), live[k]) for k, v in run.extra["ema"].items()}
        if run.extra.get("ema")
        else live
    )
    # N: this process's samples per iteration (all of them in one process)
    P, G, N, B = (
        cfg.prompts_per_iter,
        cfg.group_size,
        cfg.prompts_per_iter * cfg.group_size // ranks.world,
        cfg.train_batch_size,
    )
    steps_per_iter = cfg.inner_epochs * -(-N // B)
    scale = cfg.adv_clip / cfg.beta
    for it in run.steps(cfg.iterations, progress, unit="it"):
        g = seeded(cfg.seed, it)
        # the same prompts on every rank; this rank's share of the global groups
        meta = [row for row in pick_rows(prompts, P, g) for _ in range(G)][mine]
        if ranks.rank:  # rank 0 goes on with the stream of one process, the others with their own
            g = ranks.generator(cfg.seed, it)
        texts = [row["prompt"] for row in meta]
        cond = backend.encode(texts)
        with torch.no_grad(), swapped_weights(backend, ema):
            x0 = sample_latents(backend, cond, N, cfg.sample_steps, cfg.guidance, g, cfg.sampler)
            images = backend.decode(x0)
        local_rewards, info = call_reward(reward_fn, images, texts, meta, ranks)
        rewards = ranks.gather(local_rewards)  # the global groups, in rank order
        r_all, adv = nft_optimality(rewards, G, cfg.adv_clip, cfg.normaliser)
        r = r_all[mine].to(dev)
        s_all = torch.rand(cfg.inner_epochs, N, generator=g).to(dev)
        eps_all = torch.randn(cfg.inner_epochs, N, *x0.shape[1:], generator=g).to(dev)
        orders = [torch.randperm(N, generator=g) for _ in range(cfg.inner_epochs)]
        train_cond = cond
        if cfg.cond_dropout > 0:  # drawn after the stream above, so 0 leaves every draw as it was
            drop = (torch.rand(N, generator=g) < cfg.cond_dropout).tolist()
            train_cond = backend.encode(["" if d else t for d, t in zip(drop, texts, strict=True)])
        stats = {"loss": 0.0, "nft_loss": 0.0, "old_deviation": 0.0, "kl": 0.0, "pre_loss": 0.0}
        j = 0
        for e in range(cfg.inner_epochs):
            s, eps = s_all[e], eps_all[e]
            x_s, v = backend.add_noise(x0, eps, s), backend.target(x0, eps, s)
            with torch.no_grad(), swapped_weights(backend, ema):
                v_old = torch.cat(
                    [
                        backend.predict(
                            x_s[i : i + B],
                            s[i : i + B],
                            train_cond.index(slice(i, i + B)),
                            guidance=cfg.guidance,
                        )
                        for i in range(0, N, B)
                    ]
                )
            for idx in orders[e].split(B):
                idx_d = idx.to(dev)
                pre = None
                if use_pre:
                    step = it * steps_per_iter + j
                    pre = pretrain_batch(backend, pretrain_source, step, cfg.pretrain_batch_size, g, ranks)
                parts = run.micro_batches(len(idx_d))
                pre_parts = (
                    run.micro_batches(cfg.pretrain_batch_size, len(parts)) if use_pre else [None] * len(parts)
                )
                run.zero_grad()
                sums = dict.fromkeys(stats, 0.0)
                for m, pm in zip(parts, pre_parts, strict=True):
                    i, share = idx_d[m], len(idx_d[m]) / len(idx_d)  # a micro-batch counts by its share
                    v_theta = backend.predict(x_s[i], s[i], train_cond.index(i), guidance=cfg.guidance)
                    per = nft_loss(v_theta, v_old[i], v[i], r[i], cfg.beta, s[i], cfg.weighting)
                    loss = scale * per.mean() * share
                    if cfg.kl_weight > 0:
                        with torch.no_grad(), backend.reference():
                            v_ref = backend.predict(x_s[i], s[i], train_cond.index(i), guidance=cfg.guidance)
                        kl = (v_theta - v_ref).pow(2).flatten(1).mean(1).mean() * share
                        loss = loss + cfg.kl_weight * kl
                        sums["kl"] += kl.item()
                    if use_pre:
                        pre_loss = pretrain_part(backend, pre, pm)
                        loss = loss + cfg.pretrain_weight * pre_loss
                        sums["pre_loss"] += pre_loss.item()
                    run.backward(loss)
                    sums["loss"] += loss.item()
                    sums["nft_loss"] += per.mean().item() * share
                    sums["old_deviation"] += (v_theta.detach() - v_old[i]).pow(2).mean().item() * share
                run.step()
                for key, v_sum in sums.items():
                    stats[key] += v_sum / steps_per_iter
                j += 1
        eta = ema_decay(it, cfg.ema_rate, cfg.ema_max)
        with torch.no_grad():
            for k, w in backend.state_dict_trainable().items():
                ema[k].mul_(eta).add_(w, alpha=1 - eta)
        zero_std = (rewards.reshape(-1, G).std(1, correction=0) == 0).float().mean()
        row = {
            **ranks.mean_scalars(stats),
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(correction=0)),
            "r_mean": float(r_all.to(dev).mean()),
            "adv_abs_mean": float(adv.abs().mean()),
            "zero_std_groups": float(zero_std),
            "ema_decay": eta,
            **ranks.mean_scalars(scalar_info(info)),
        }
        run.record(row, it + 1, reward=f"{row['reward_mean']:.3f}", loss=f"{row['loss']:.4f}")
        run.checkpoint(it + 1, extra={"ema": ema})
    return run.finish()
