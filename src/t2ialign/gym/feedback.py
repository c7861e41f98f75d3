"""Offline feedback on the gym: the base model's samples, labelled by the 0/1 reward, as the weighted
samples of reward-weighted likelihood (:class:`t2ialign.algorithms.rwr.WeightedSamples`) and as the
preference pairs of Diffusion-DPO (:class:`t2ialign.algorithms.dpo.PairSamples`)."""

from __future__ import annotations

import torch

from t2ialign.algorithms.dpo import PairSamples
from t2ialign.algorithms.rwr import WeightedSamples
from t2ialign.gym.measure import sample_points
from t2ialign.gym.world import points_to_images


def labelled_samples(backend, n_per_class: int, steps: int = 20, seed: int = 1):
    """``n_per_class`` Euler-ODE samples per class from ``backend`` (guidance 1): (images
    (N, 2, 1, 1), classes (N,), labels (N,) in {0, 1}: the 0/1 reward)."""
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be positive, got {n_per_class}")
    world = backend.world
    classes = torch.arange(world.n_classes).repeat_interleave(n_per_class)
    points = sample_points(backend, classes, steps, 1.0, seed)
    return points_to_images(points), classes, world.success(points, classes).float()


def weighted_samples(backend, n_per_class: int, steps: int = 20, seed: int = 1) -> WeightedSamples:
    """The base's samples with weight = reward (1 kept, 0 dropped: the fixed point is the base
    restricted to the success region)."""
    images, classes, labels = labelled_samples(backend, n_per_class, steps, seed)
    return WeightedSamples(images, [backend.world.prompt(c) for c in classes.tolist()], labels)


def preference_pairs(backend, n_per_class: int, steps: int = 20, seed: int = 1) -> PairSamples:
    """Pairs (winner = a success, loser = a failure) of the same class: every failure among the
    ``n_per_class`` samples of a class is paired with a success of that class drawn at random (with
    replacement). Classes with no success or no failure give no pairs (ties carry no preference)."""
    images, classes, labels = labelled_samples(backend, n_per_class, steps, seed)
    g = torch.Generator().manual_seed(seed)
    win, lose, prompts = [], [], []
    for c in range(backend.world.n_classes):
        good = torch.nonzero((classes == c) & (labels == 1)).flatten()
        bad = torch.nonzero((classes == c) & (labels == 0)).flatten()
        if len(good) == 0 or len(bad) == 0:
            continue
        win.append(images[good[torch.randint(len(good), (len(bad),), generator=g)]])
        lose.append(images[bad])
        prompts += [backend.world.prompt(c)] * len(bad)
    if not prompts:
        raise ValueError("no preference pairs: every class's samples all succeed or all fail")
    return PairSamples(torch.cat(win), torch.cat(lose), prompts)
