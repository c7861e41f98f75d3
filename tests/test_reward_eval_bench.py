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
