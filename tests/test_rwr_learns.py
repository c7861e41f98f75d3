"""RWR learns (issue 17): reward-weighted likelihood on the checker's labels of a misaligned model's
own samples raises the checker's accuracy on its training prompts.

The model is the fixture of ``tests/misaligned_fixture.py``: a tiny 16 px generator pre-trained on
web captions whose background word is independent of the image, so that it draws a recognisable red
circle on any of the four backgrounds whatever the prompt asks (background accuracy near a quarter).
The labelled set is its own unguided samples with the checker's verdict as weight (the seed paper's
binary labels, from an exact rater); the pre-training term draws from the same web stream, as the
paper's from LAION. The known answer: the background follows the prompt (accuracy 1), objects stay.

Measured (2026-12-04, this 2-core machine, one thread, the committed fixture): overall 0.250 ->
0.375, background 0.297 -> 0.578, shape 0.766 -> 0.703 (n = 128 each), about 50 s. The assertions
ask for half of the measured gains (``python tests/misaligned_fixture.py --rwr`` prints them).
"""

from __future__ import annotations

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
