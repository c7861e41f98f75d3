"""``benchmarks/reward_eval.py --extra-prompts``: the extra training prompts never touch a test prompt."""

from __future__ import annotations

import sys
from pathlib import Path

from t2ialign.world import suite
from t2ialign.world.grammar import parse

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reward_eval  # noqa: E402


def test_extra_prompts_are_new_seen_split_prompts():
    extra = reward_eval.extra_prompts(60)
    prompts = [r["prompt"] for r in extra]
    assert len(prompts) == 60 == len(set(prompts))
    in_suites = {r["prompt"] for r in suite("seen") + suite("unseen")}
    assert not in_suites & set(prompts)  # never a held-out seen or an unseen test prompt
    assert {r["split"] for r in extra} == {"seen"}
    for r in extra:
        assert parse(r["prompt"]).to_dict() == r["spec"]
    counts = [[r["task"] for r in extra].count(t) for t in {r["task"] for r in extra}]
    assert max(counts) - min(counts) <= 1  # round robin over the tasks with prompts left
    assert reward_eval.extra_prompts(60) == extra  # a fixed order


def test_training_labels_are_those_of_the_training_and_validation_prompts():
    """``similarity-all-labels`` fits its threshold on every label of the training project's
    training and validation prompts, and on nothing else (held-out and unseen labels stay out)."""
    import numpy as np

    from t2ialign.reward.eval import ProjectScores

    ps = ProjectScores(
        gids=[1, 2, 3, 4],
        prompts=["a", "b", "c", "d"],
        world_split=["seen", "seen", "seen", "unseen"],
        scores=np.array([0.1, 0.2, 0.3, 0.4]),
        checker=[True, False, True, False],
        label_index=np.array([0, 0, 1, 2, 3]),  # image 0 labelled twice
        label_values=np.array([1, 0, 0, 1, 1]),
    )
    scores, labels = reward_eval.training_labels(ps, (["a"], ["b"]))
    assert scores.tolist() == [0.1, 0.1, 0.2] and labels.tolist() == [1, 0, 0]
