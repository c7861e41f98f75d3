"""Evaluate a generator on a prompt suite: alignment (ShapesEval), fidelity (FID) and mean reward."""

from __future__ import annotations

import numpy as np
import torch

from t2ialign.sampling import generate_images
from t2ialign.world.checker import check
from t2ialign.world.imagefolder import summarize
from t2ialign.world.scene import render
from t2ialign.world.spec import Spec


def evaluate_generator(
    generator,
    rows: list[dict],
    per_prompt: int = 4,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 3.0,
    reward_fn=None,
    encoder=None,
    progress: bool = True,
    with_fid: bool = True,
) -> dict:
    """Sample ``per_prompt`` images per prompt row (seeds ``seed``, ``seed + 1``, ...) and measure them.

    Returns ``summarize``'s dict (``overall``, ``task_mean``, ``tasks``, ``splits``) plus ``fid``
    (against true renders of the same prompts, in the encoder's features), ``mean_reward`` (when a
    reward function is given) and ``images`` / ``prompts`` / ``correct`` for grids. With
    ``with_fid=False`` (images of another size than the encoder's), ``fid`` is None.
    """
    from t2ialign.evaluation.fid import fid

    expanded = [r for r in rows for _ in range(per_prompt)]
    prompts = [r["prompt"] for r in expanded]
    seeds = [seed + i for i in range(len(expanded))]
    images = generate_images(generator, prompts, seeds, steps=steps, guidance=guidance, progress=progress)
    verdicts = [check(img, Spec.from_dict(r["spec"])) for img, r in zip(images, expanded, strict=True)]
    scored = [
        {"task": r["task"], "split": r["split"], "correct": v.correct}
        for r, v in zip(expanded, verdicts, strict=True)
    ]
    out = summarize(scored)
    out["fid"] = None
    if with_fid:
        size = images.shape[1]
        true = np.stack(
            [
                render(Spec.from_dict(r["spec"]), 1_000_000 + s, size)
                for r, s in zip(expanded, seeds, strict=True)
            ]
        )
        out["fid"] = float(fid(images, true, encoder=encoder))
    if reward_fn is not None:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        from t2ialign.pipeline import score

        out["mean_reward"] = float(score(reward_fn, x, prompts, expanded).mean())
    out["images"] = images
    out["prompts"] = prompts
    out["correct"] = [v.correct for v in verdicts]
    return out


def strip_arrays(result: dict) -> dict:
    """The JSON-serialisable part of an ``evaluate_generator`` result."""
    return {k: v for k, v in result.items() if k not in ("images", "prompts", "correct")}
