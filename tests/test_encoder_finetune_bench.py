"""``benchmarks/encoder_gen_data.py`` / ``encoder_finetune.py``: the encoder's fine-tuning data never
names a test prompt of ``benchmarks/reward_eval.py``, and detection captions describe the image."""

from __future__ import annotations

import sys
from pathlib import Path

from t2ialign.world import suite
from t2ialign.world.checker import check, detect
from t2ialign.world.grammar import parse, to_prompt
from t2ialign.world.scene import render
from t2ialign.world.suites import is_unseen

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import encoder_finetune  # noqa: E402
import encoder_gen_data  # noqa: E402
import reward_eval  # noqa: E402


def test_generation_prompts_avoid_every_test_prompt():
    banned = encoder_gen_data.test_prompts()
    assert {r["prompt"] for r in suite("unseen")} <= banned
    # the held-out seen prompts are reward_eval's test project minus the unseen suite
    seen = {r["prompt"] for r in suite("seen")}
    assert len(banned & seen) == round(len(seen) * encoder_gen_data.HELDOUT_FRACTION)
    prompts = encoder_gen_data.prompt_stream(500)
    assert not set(prompts) & banned
    assert not any(is_unseen(parse(p)) for p in prompts)
    assert encoder_gen_data.HELDOUT_FRACTION == reward_eval.HELDOUT_FRACTION


def test_caption_of_a_render_is_accepted_by_the_checker():
    for p in ["two red circles on a black background", "a blue square left of a yellow triangle", "a circle"]:
        spec = parse(p)
        img = render(spec, 3, 32)
        cap = encoder_finetune.caption_spec(spec, detect(img))
        assert cap is not None and check(img, cap).correct
        assert to_prompt(cap) == p or check(img, spec).correct
    # another prompt's level of detail: a wrong prompt gets the detection's description
    img = render(parse("two green squares on a white background"), 4, 32)
    cap = encoder_finetune.caption_spec(parse("two red circles on a gray background"), detect(img))
    assert to_prompt(cap) == "two green squares on a white background"
