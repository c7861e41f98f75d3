"""Glue between the stages: feedback store -> training data, the world -> pre-training data.

The algorithms see tensors and callables only; these functions build them from a feedback project,
a reward function and the embedded world.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from t2ialign.algorithms.rwr import PretrainSource, WeightedSamples
from t2ialign.world.captions import WEB, CaptionNoise


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def labelled_from_store(
    store, simulated: bool | None = None
) -> tuple[np.ndarray, list[str], np.ndarray, list]:
    """One row per labelled image: the image, its prompt, the mean label over its annotators (good = 1)
    and its generation id. Skips are ignored; every active label counts."""
    votes: dict[int, list[int]] = defaultdict(list)
    first: dict[int, tuple] = {}
    for r in store.labelled_images(simulated=simulated):
        votes[r.generation_id].append(r.label)
        first.setdefault(r.generation_id, (r.image, r.prompt, r.spec))
    gids = sorted(votes)
    if not gids:
        raise ValueError(
            "the project has no good/bad labels yet: label some images first "
            "('t2ialign label serve' or 'label simulate')"
        )
    images = np.stack([first[g][0] for g in gids])
    prompts = [first[g][1] for g in gids]
    labels = np.array([np.mean(votes[g]) for g in gids], dtype=np.float32)
    metadata = [{"prompt": first[g][1], "spec": first[g][2], "generation_id": g} for g in gids]
    return images, prompts, labels, metadata


@torch.no_grad()
def score(
    reward_fn, images: torch.Tensor, prompts: list[str], metadata=None, batch: int = 256
) -> torch.Tensor:
    out = []
    for i in range(0, images.shape[0], batch):
        md = metadata[i : i + batch] if metadata is not None else None
        r, _ = reward_fn(images[i : i + batch], prompts[i : i + batch], md)
        out.append(torch.as_tensor(r, dtype=torch.float32).detach())
    return torch.cat(out) if out else torch.zeros(0)


def weights_from(
    mode: str, labels: torch.Tensor | None, rewards: torch.Tensor | None, threshold: float = 0.5
) -> torch.Tensor:
    """The reward weight of each sample: ``label`` (the human label), ``reward`` (the reward model's
    score, clipped to [0, 1]) or ``filter`` (1 where the score, or the label, exceeds ``threshold``)."""
    if mode == "label":
        if labels is None:
            raise ValueError("weight mode 'label' needs labels")
        return labels.float()
    if rewards is None:
        raise ValueError(f"weight mode {mode!r} needs a reward model")
    if mode == "reward":
        return rewards.clamp(0, 1)
    if mode == "filter":
        return (rewards > threshold).float()
    raise ValueError(f"unknown weight mode {mode!r}; use label, reward or filter")


def rwr_data_from_store(
    store, reward_fn=None, weight: str = "label", threshold: float = 0.5, simulated: bool | None = None
) -> WeightedSamples:
    """The labelled model samples of a feedback project, weighted by label or by the reward model."""
    images, prompts, labels, md = labelled_from_store(store, simulated)
    x = to_tensor(images)
    rewards = score(reward_fn, x, prompts, md) if reward_fn is not None and weight != "label" else None
    if weight == "filter" and rewards is None:
        rewards = torch.from_numpy(labels)
    return WeightedSamples(x, prompts, weights_from(weight, torch.from_numpy(labels), rewards, threshold))


def pairs_from_store(store, simulated: bool | None = None):
    """The project's active pairwise comparisons as Diffusion-DPO pairs (winner, loser, prompt), in
    comparison order; ties carry no preference and are left out."""
    from t2ialign.algorithms.dpo import PairSamples

    pairs = [p for p in store.pairs(simulated=simulated) if not p.tie]
    if not pairs:
        raise ValueError(
            "the project has no decided pairwise comparisons yet: compare some images first "
            "('t2ialign label serve' or 'label simulate')"
        )
    return PairSamples(
        to_tensor(np.stack([p.img_w for p in pairs])),
        to_tensor(np.stack([p.img_l for p in pairs])),
        [p.prompt for p in pairs],
    )


def pseudo_labelled(
    generator,
    prompt_rows: list[dict],
    per_prompt: int,
    reward_fn,
    weight: str = "filter",
    threshold: float = 0.5,
    seed: int = 10_000,
    steps: int = 20,
    guidance: float = 3.0,
    progress: bool = True,
) -> WeightedSamples:
    """Unlabelled samples of the base model, scored by the reward model (the paper's pseudo-labels)."""
    from t2ialign.sampling import generate_images

    rows = [r for r in prompt_rows for _ in range(per_prompt)]
    prompts = [r["prompt"] for r in rows]
    imgs = generate_images(
        generator,
        prompts,
        [seed + i for i in range(len(rows))],
        steps=steps,
        guidance=guidance,
        progress=progress,
    )
    x = to_tensor(imgs)
    rewards = score(reward_fn, x, prompts, rows)
    mode = "reward" if weight == "label" else weight
    return WeightedSamples(x, prompts, weights_from(mode, None, rewards, threshold))


def world_pretrain_source(
    seed: int = 777, size: int = 32, cond_dropout: float = 0.1, captions: CaptionNoise = WEB
) -> PretrainSource:
    """Pre-training data of the embedded world (renders of random specs with their web captions),
    batch k a pure function of (seed, k): the paper's LAION term.

    The captions are the web's (:data:`~t2ialign.world.captions.WEB`) by default, as the paper's
    pre-training data was LAION, not aligned data: the term keeps fidelity and pulls alignment back
    towards the base's, and fine-tuning has to win against it. ``EXACT`` is the counterfactual of
    perfect pre-training captions.

    As in pre-training, ``cond_dropout`` of the prompts are replaced by the null prompt, so that the
    unconditional prediction (the other half of classifier-free guidance) stays anchored to the data
    while fine-tuning moves the conditional one; without it, guidance amplifies the drift between
    the two."""
    from t2ialign.models.pretrain import world_batch

    def source(step: int, batch_size: int):
        x, prompts, _ = world_batch(
            seed, step, batch_size, size, cond_dropout=cond_dropout, captions=captions
        )
        return x, prompts

    return source
