"""DiffusionNFT's loss on a labelled set: the per-prompt optimality against a hand computation, bad
input, a smoke run with resume (learning is shown on the gym, tests/test_gym.py)."""

from __future__ import annotations

import pytest
import torch

from t2ialign.algorithms.nft_labelled import LabelledNFTConfig, prompt_optimality, train_nft_labelled
from t2ialign.algorithms.rwr import WeightedSamples
from t2ialign.backends import ShapesBackend
from t2ialign.models import build_generator, load_generator
from t2ialign.models.pretrain import world_batch
from t2ialign.pipeline import world_pretrain_source


def test_prompt_optimality_hand_computed():
    y = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    prompts = ["a"] * 4 + ["b"] * 2 + ["c"]
    r, adv = prompt_optimality(y, prompts, adv_clip=5.0)
    # prompt a: mean 0.25, std sqrt(0.1875) = 0.4330: A = 0.75/0.4330 = 1.732, -0.25/0.4330 = -0.577
    torch.testing.assert_close(adv[:4], torch.tensor([1.7320, -0.5773, -0.5773, -0.5773]), atol=1e-3, rtol=0)
    torch.testing.assert_close(r[:4], 0.5 + 0.5 * adv[:4] / 5.0)
    # equal labels (b) and a single image (c): no signal
    assert r[4:].tolist() == [0.5, 0.5, 0.5] and adv[4:].tolist() == [0.0, 0.0, 0.0]
    # the clip
    r, adv = prompt_optimality(torch.tensor([1.0] + [0.0] * 99), ["a"] * 100, adv_clip=2.0)
    assert adv[0].item() == 2.0 and r[0].item() == 1.0
    with pytest.raises(ValueError, match="3 weights for 2 prompts"):
        prompt_optimality(torch.zeros(3), ["a", "b"])


def test_config_and_data_errors(tmp_path):
    for field in ("beta", "adv_clip", "guidance"):
        with pytest.raises(ValueError, match="must be positive"):
            LabelledNFTConfig(**{field: 0.0})
    with pytest.raises(ValueError, match="non-negative"):
        LabelledNFTConfig(pretrain_weight=-1)
    b = ShapesBackend(build_generator("tiny", seed=0))
    x, prompts, _ = world_batch(3, 0, 4)
    same = WeightedSamples(x, prompts, torch.ones(4))
    with pytest.raises(ValueError, match="no prompt has both better and worse images"):
        train_nft_labelled(b, LabelledNFTConfig(steps=1), same, tmp_path, progress=False)
    with pytest.raises(ValueError, match="pretrain_source"):
        train_nft_labelled(b, LabelledNFTConfig(steps=1, pretrain_weight=1.0), same, tmp_path, progress=False)


def _data():
    x, _, _ = world_batch(3, 0, 8)
    prompts = ["two red circles"] * 4 + ["a blue square"] * 4
    return WeightedSamples(x, prompts, torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]))


def _backend():
    g = build_generator("tiny", seed=0)
    with torch.no_grad():  # the output conv is zero-initialised: give upstream layers a gradient
        g.unet.conv_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    return ShapesBackend(g)


def test_smoke_and_resume(tmp_path):
    def run(out, steps):
        cfg = LabelledNFTConfig(
            steps=steps, batch_size=4, pretrain_weight=0.5, pretrain_batch_size=4, lr=1e-3, checkpoint_every=2
        )
        rows = train_nft_labelled(_backend(), cfg, _data(), out, world_pretrain_source(), progress=False)
        return rows, load_generator(out).unet.state_dict()

    rows, full = run(tmp_path / "full", 4)
    assert len(rows) == 4 and all(r["loss"] == r["loss"] and r["pre_loss"] > 0 for r in rows)
    base = _backend().gen.unet.state_dict()
    assert any(not torch.equal(full[k], base[k]) for k in full), "no parameter changed"
    run(tmp_path / "split", 2)
    _, resumed = run(tmp_path / "split", 4)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-4, atol=2e-5)


def test_refuses_a_data_parallel_launch(tmp_path):
    from t2ialign.cli.finetune import train_method

    with pytest.raises(ValueError, match="does not train data-parallel"):
        train_method(
            "nft-labelled",
            _backend(),
            LabelledNFTConfig(steps=1),
            tmp_path,
            labelled=_data(),
            accelerator=object(),
        )
