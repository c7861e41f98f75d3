"""Each loss of the reward model against a hand-computed case."""

from __future__ import annotations

import math

import pytest
import torch

from t2ialign.reward.losses import bradley_terry_loss, mse_loss, prompt_classification_loss, total_loss


def test_mse_hand_computed():
    # ((1 - 0.9)^2 + (0 - 0.2)^2) / 2 = (0.01 + 0.04) / 2
    r = torch.tensor([0.9, 0.2])
    y = torch.tensor([1.0, 0.0])
    assert mse_loss(r, y).item() == pytest.approx(0.025)
    # weights 3 and 1: (3 * 0.01 + 1 * 0.04) / 4
    assert mse_loss(r, y, torch.tensor([3.0, 1.0])).item() == pytest.approx(0.0175)
    with pytest.raises(ValueError, match="shape"):
        mse_loss(r, y[:1])


def test_prompt_classification_hand_computed():
    # rewards 1, 0, -1 for (true, perturbed, perturbed), T = 2: logits 0.5, 0, -0.5
    # CE = -0.5 + log(e^0.5 + e^0 + e^-0.5) = -0.5 + log(1.6487213 + 1 + 0.6065307) = 0.6802697
    s = torch.tensor([[1.0, 0.0, -1.0]])
    assert prompt_classification_loss(s, temperature=2.0).item() == pytest.approx(0.6802697, abs=1e-6)
    # the true prompt in column 1: CE = 0 + log(3.2552520) = 1.1802697
    assert prompt_classification_loss(s, 2.0, true_index=torch.tensor([1])).item() == pytest.approx(
        1.1802697, abs=1e-6
    )
    # padding is ignored: -0.5 + log(e^0.5 + 1) = 0.4740770, whatever the padded score
    padded = torch.tensor([[1.0, 0.0, 99.0]])
    mask = torch.tensor([[True, True, False]])
    assert prompt_classification_loss(padded, 2.0, mask=mask).item() == pytest.approx(0.4740770, abs=1e-6)
    # batch mean
    both = torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.0, 99.0]])
    m2 = torch.tensor([[True, True, True], [True, True, False]])
    want = (0.6802697 + 0.4740770) / 2
    assert prompt_classification_loss(both, 2.0, mask=m2).item() == pytest.approx(want, abs=1e-6)
    # a lower temperature sharpens: the loss of a correct ranking falls
    assert prompt_classification_loss(s, 0.5).item() < prompt_classification_loss(s, 2.0).item()
    with pytest.raises(ValueError, match="temperature"):
        prompt_classification_loss(s, 0.0)
    with pytest.raises(ValueError, match="B, N"):
        prompt_classification_loss(s[0])


def test_bradley_terry_hand_computed():
    # -log sigmoid(1 - 0) = log(1 + e^-1) = 0.3132617
    r_w, r_l = torch.tensor([1.0]), torch.tensor([0.0])
    assert bradley_terry_loss(r_w, r_l).item() == pytest.approx(0.3132617, abs=1e-6)
    # a tie: 0.5 * log(1 + e^-1) + 0.5 * log(1 + e^1) = 0.8132617
    assert bradley_terry_loss(r_w, r_l, torch.tensor([True])).item() == pytest.approx(0.8132617, abs=1e-6)
    # a tie is symmetric, and least at equal rewards: log 2
    tie = torch.tensor([True])
    assert bradley_terry_loss(r_l, r_w, tie).item() == pytest.approx(0.8132617, abs=1e-6)
    assert bradley_terry_loss(r_l, r_l, tie).item() == pytest.approx(math.log(2), abs=1e-6)
    # mean over a batch of one decided comparison and one tie
    both = bradley_terry_loss(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), torch.tensor([False, True]))
    assert both.item() == pytest.approx((0.3132617 + 0.8132617) / 2, abs=1e-6)
    # stable for large margins
    assert bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([0.0])).item() == pytest.approx(100.0)


def test_total_loss():
    one, two, three = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)
    assert total_loss(one, two).item() == pytest.approx(1 + 0.5 * 2)  # lambda 0.5 by default
    assert total_loss(one, two, three, lam=0.25, bt_weight=2).item() == pytest.approx(1 + 0.5 + 6)
    assert total_loss(one).item() == 1.0
    assert total_loss(None, None, three).item() == 3.0
    with pytest.raises(ValueError):
        total_loss(None)
