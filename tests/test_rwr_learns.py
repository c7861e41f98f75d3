"""RWR learns (issue 17): reward-weighted likelihood on the checker's labels of a misaligned model's
own samples raises the checker's accuracy on its training prompts.

The model is the fixture of ``tests/misaligned_fixture.py``: a tiny 16 px generator pre-trained on
web captions whose background word is independent of the image, so that it draws a recognisable red
circle on any of the four backgrounds whatever the prompt asks (background accuracy near a quarter).
The labelled set is its own unguided samples with the checker's verdict as weight (the seed paper's
binary labels, from an exact rater); the pre-training term draws from the same web stream, as the
paper's from LAION. The known answer: the background follows the prompt (accuracy 1), objects stay.

Measured (docs/RESULTS.md, "RWR on the misaligned fixture"; 2-core CPU, one thread): the fast run
below (300 steps at lr 2e-3, 256 labelled) is seeded and moves overall 0.250 -> 0.375 and
background 0.297 -> 0.578 at its seed (n = 128, about 50 s); over three seeds, evaluated on 256
images, its overall gain is +0.01 to +0.10 and its background gain +0.06 to +0.22, so the fast test
pins one seed's run and asserts half of its gains. The slow test is the recipe that learns at every
seed measured: 1,024 labelled, 1,000 steps at lr 5e-4, condition dropout 0.1 in both terms (overall
0.254 -> 0.47 to 0.55, background 0.31 -> 0.66 to 0.74, about 4 minutes).
"""

from __future__ import annotations

import pytest

from misaligned_fixture import rwr_on_checker_labels
from t2ialign.algorithms.rwr import RWRConfig


def test_rwr_on_checker_labels_aligns_a_misaligned_model(tmp_path):
    cfg = RWRConfig(steps=300, lr=2e-3, beta=0.5, ema=0.9, checkpoint_every=10**6)  # batches 32 + 32
    res = rwr_on_checker_labels(cfg, tmp_path / "rwr", n=256)
    before, after = res["before"], res["after"]
    assert before["background"] < 0.4 and before["shape"] > 0.6  # misaligned, not untrained
    assert 0.1 < res["good_rate"] < 0.4
    assert after["background"] >= before["background"] + 0.14, res
    assert after["overall"] >= before["overall"] + 0.06, res
    assert after["shape"] >= before["shape"] - 0.15, res  # the objects are kept


@pytest.mark.slow
def test_rwr_long_recipe_aligns_at_another_seed(tmp_path):
    cfg = RWRConfig(steps=1000, lr=5e-4, beta=0.5, ema=0.9, cond_dropout=0.1, seed=1, checkpoint_every=10**6)
    res = rwr_on_checker_labels(cfg, tmp_path / "rwr", n=1024, eval_n=256, pre_dropout=0.1)
    before, after = res["before"], res["after"]
    assert after["overall"] >= before["overall"] + 0.15, res
    assert after["background"] >= before["background"] + 0.25, res
    assert after["shape"] >= before["shape"] - 0.15, res
