"""Rule rewards built from the ShapesEval checker, and mixing rewards."""

from __future__ import annotations

import pytest
import torch

from t2ialign.reward.rewards import checker_reward, counting_reward, mix_rewards, partial_credit_reward
from t2ialign.world import parse, render


def batch(*prompts_rendered: str) -> torch.Tensor:
    return torch.stack(
        [
            torch.from_numpy(render(parse(p), seed=i)).permute(2, 0, 1).float() / 255
            for i, p in enumerate(prompts_rendered)
        ]
    )


def test_checker_reward():
    x = batch("two blue circles", "three blue circles")
    r, info = checker_reward(x, ["two blue circles"] * 2, None)
    assert r.tolist() == [1.0, 0.0] and r.dtype == torch.float32
    assert info["failed"][0] == [] and "count" in info["failed"][1]


def test_counting_reward_is_flow_grpo():
    # 1 - |N_gen - N_ref| / N_ref: three circles for "two circles" -> 1 - 1/2; for "four" -> 1 - 1/4
    x = batch("three circles", "three circles", "three circles", "a square")
    r, info = counting_reward(x, ["two circles", "four circles", "three circles", "four circles"], None)
    assert r.tolist() == pytest.approx([0.5, 0.75, 1.0, 0.0])  # no circle at all: 1 - 4/4
    assert info["counts"][0] == {"found": [3], "wanted": [2]}
    # per group, averaged: a red circle found, no blue square -> (1 + 0) / 2
    r, _ = counting_reward(batch("a red circle and a green square"), ["a red circle and a blue square"], None)
    assert r.tolist() == [0.5]
    # clamped at 0 when far too many
    r, _ = counting_reward(batch("four circles"), ["a circle"], None)
    assert r.tolist() == [0.0]


def test_partial_credit_reward():
    x = batch("a red circle", "a blue circle", "a blue square")
    r, info = partial_credit_reward(x, ["a red circle"] * 3, None)
    # checks: count, shape, colour -> 3/3; colour wrong -> 2/3; shape and colour wrong -> 1/3
    assert r.tolist() == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert info["checks"][1] == {"count": True, "shape": True, "color": False}


def test_metadata_spec_overrides_the_prompt():
    x = batch("two blue circles")
    meta = [{"spec": parse("two blue circles").to_dict()}]
    r, _ = checker_reward(x, ["a prompt outside the grammar"], meta)
    assert r.tolist() == [1.0]


def test_mix_rewards():
    x = batch("a red circle", "a blue circle")
    mixed = mix_rewards([(checker_reward, 0.5), (partial_credit_reward, 2.0)])
    r, info = mixed(x, ["a red circle"] * 2, None)
    assert r.tolist() == pytest.approx([0.5 + 2.0, 0.0 + 2.0 * 2 / 3])
    assert len(info["components"]) == 2 and info["weights"] == [0.5, 2.0]
    with pytest.raises(ValueError):
        mix_rewards([])
    with pytest.raises(ValueError):
        mix_rewards([("checker", 1.0)])


def test_inputs_are_checked():
    x = batch("a red circle")
    with pytest.raises(ValueError, match="prompts"):
        checker_reward(x, ["a", "b"], None)
    with pytest.raises(ValueError, match="metadata"):
        checker_reward(x, ["a red circle"], [{}, {}])
    with pytest.raises(ValueError, match="B, 3, H, W"):
        checker_reward(x[0], ["a red circle"], None)
