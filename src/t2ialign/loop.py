"""Relabelling rounds: the seed paper's loop run more than once (the part the paper leaves for later).

A round takes the current generator and:

1. **collects feedback**: generates ``per_prompt`` images for each feedback prompt and sends them to
   be labelled (a simulated rater here; people through ``t2ialign label serve``). With
   ``select="uncertain"`` it generates ``pool_factor`` times as many and sends, per prompt, the
   images whose learned reward is nearest its decision threshold (active learning); the first
   round, which has no reward yet, always sends a random choice;
2. **retrains the reward** on every label of the project so far;
3. **fine-tunes** the current generator by reward-weighted likelihood on every labelled image so far,
   with reward-scored unlabelled samples of the current generator and the pre-training term.

Nothing is ever deleted from the feedback project, so every label survives every round; a round
killed midway resumes (the project keeps what was labelled, generation is deterministic and adds
nothing twice, the fine-tuning resumes from its checkpoint, and a finished round leaves
``round.json``).
"""

from __future__ import annotations

import numpy as np

SELECT = ("random", "uncertain")


def uncertain_choice(scores: np.ndarray, groups: list, k: int, threshold: float) -> list[int]:
    """Indices of the ``k`` items of each group whose score is nearest ``threshold`` (ties: the
    earlier item), in the items' order. ``groups[i]`` names item ``i``'s group (its prompt)."""
    if len(scores) != len(groups):
        raise ValueError(f"{len(scores)} scores for {len(groups)} items")
    by_group: dict = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    chosen = []
    for idx in by_group.values():
        dist = np.abs(np.asarray(scores, dtype=np.float64)[idx] - threshold)
        order = np.argsort(dist, kind="stable")[:k]
        chosen.extend(idx[j] for j in order)
    return sorted(chosen)


def collect_feedback(
    generator,
    prompt_rows: list[dict],
    per_prompt: int,
    store,
    rater,
    *,
    seed: int,
    steps: int,
    guidance: float,
    select: str = "random",
    pool_factor: int = 3,
    reward_fn=None,
    threshold: float = 0.5,
    progress: bool = True,
) -> dict:
    """Generate, choose and label one round's feedback images; returns what was done.

    ``select="uncertain"`` needs ``reward_fn`` (the previous round's reward) and ``threshold`` (its
    decision threshold); without a reward the choice is random (the first round)."""
    from t2ialign.feedback.simulate import simulate
    from t2ialign.pipeline import score, to_tensor
    from t2ialign.sampling import generate_images

    if select not in SELECT:
        raise ValueError(f"select must be one of {', '.join(SELECT)}, got {select!r}")
    if per_prompt < 1 or pool_factor < 1:
        raise ValueError(f"per_prompt and pool_factor must be at least 1, got {per_prompt}, {pool_factor}")
    active = select == "uncertain" and reward_fn is not None
    pool = per_prompt * (pool_factor if active else 1)
    rows = [r for r in prompt_rows for _ in range(pool)]
    seeds = [seed + i for i in range(len(rows))]
    prompts = [r["prompt"] for r in rows]
    imgs = generate_images(generator, prompts, seeds, steps=steps, guidance=guidance, progress=progress)
    if active:
        scores = score(reward_fn, to_tensor(imgs), prompts, rows).numpy()
        chosen = uncertain_choice(scores, prompts, per_prompt, threshold)
    else:
        chosen = list(range(len(rows)))
    settings = {"steps": steps, "guidance": guidance}
    store.add_generations(
        [
            {
                "image": imgs[i],
                "prompt": rows[i]["prompt"],
                "spec": rows[i]["spec"],
                "task": rows[i]["task"],
                "split": rows[i]["split"],
                "model_id": generator.model_id,
                "seed": seeds[i],
                "settings": settings,
            }
            for i in chosen
        ]
    )
    sim = simulate(store, rater, pairs=False)
    chose = "uncertain" if active else "random"
    return {"generated": len(rows), "sent": len(chosen), "labels": sim["labels"], "select": chose}
