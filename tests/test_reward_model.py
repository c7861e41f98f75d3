"""The reward model: gradients to the pixels, save/load, and clear errors for bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from t2ialign.cli.main import main
from t2ialign.models.generator import CheckpointError
from t2ialign.reward.model import (
    EncoderBackbone,
    RewardHead,
    RewardHeadConfig,
    build_reward_model,
    load_reward_model,
    save_reward_model,
)
from t2ialign.reward.rewards import ModelReward, SimilarityReward
from t2ialign.world import parse, render, to_prompt

PROMPTS = ["two blue circles", "a red square on a white background", "a green triangle left of a red circle"]


@pytest.fixture(scope="module")
def backbone():
    return EncoderBackbone()


@pytest.fixture(scope="module")
def saved(backbone, tmp_path_factory):
    model = build_reward_model(backbone, hidden=32, seed=0)
    folder = tmp_path_factory.mktemp("reward") / "r"
    save_reward_model(model, folder, card={"name": "test", "data": {"labels": 0}})
    return model, folder


def images(n=3):
    return torch.stack(
        [
            torch.from_numpy(render(parse(p), seed=i)).permute(2, 0, 1).float() / 255
            for i, p in enumerate(PROMPTS)
        ]
    )[:n]


def test_gradients_flow_to_pixels(saved, backbone):
    model, _ = saved
    for fn in (ModelReward(model), SimilarityReward(backbone)):
        x = images().requires_grad_(True)
        r, info = fn(x, PROMPTS, None)
        assert r.shape == (3,) and r.dtype == torch.float32 and "reward" in info
        r.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # the head's gradient reaches only the pixels: the backbone stays frozen
    assert all(not p.requires_grad for p in model.backbone.parameters())


def test_save_load_round_trip(saved):
    model, folder = saved
    loaded = load_reward_model(folder)
    x = images()
    with torch.no_grad():
        assert torch.allclose(model.eval()(x, PROMPTS), loaded(x, PROMPTS), atol=1e-6)
    card = json.loads((folder / "card.json").read_text())
    assert card["kind"] == "t2ialign-reward" and card["name"] == "test"
    assert card["backbone"]["type"] == "t2ialign-encoder" and card["backbone"]["path"] is None
    assert card["head"]["embed_dim"] == model.backbone.embed_dim
    assert loaded.card["data"] == {"labels": 0}


def test_head_broadcasts_over_candidates():
    head = RewardHead(RewardHeadConfig(embed_dim=8, hidden=4)).eval()
    img, txt = torch.randn(2, 1, 8), torch.randn(2, 5, 8)
    out = head(img, txt)
    assert out.shape == (2, 5)
    assert torch.allclose(out[1, 3], head(img[1, 0], txt[1, 3]))


def _copy(folder, dst):
    dst.mkdir()
    for f in ("model.safetensors", "card.json"):
        (dst / f).write_bytes((folder / f).read_bytes())
    return dst


def _edit_card(folder, **changes):
    card = json.loads((folder / "card.json").read_text())
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(card.get(k), dict):
            card[k].update(v)
        else:
            card[k] = v
    (folder / "card.json").write_text(json.dumps(card))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "model.safetensors").write_bytes(b"not a safetensors file"), "corrupt"),
        (lambda f: (f / "model.safetensors").unlink(), "missing model.safetensors"),
        (lambda f: (f / "card.json").write_text("{ truncated"), "not valid JSON"),
        (lambda f: _edit_card(f, kind="t2ialign-generator"), "expected a 't2ialign-reward'"),
        (lambda f: _edit_card(f, format_version=99), "format_version"),
        (lambda f: _edit_card(f, head={"embed_dim": 64}), "64-d"),
        (lambda f: _edit_card(f, head={"hidden": 16}), "do not fit"),
        (lambda f: _edit_card(f, head={"nonsense": 1}), "bad head"),
        (lambda f: _edit_card(f, backbone={"fingerprint": "0123456789abcdef"}), "retrain"),
        (lambda f: _edit_card(f, backbone={"type": "resnet"}), "unknown backbone"),
        (lambda f: _edit_card(f, backbone={"path": "/no/such/encoder"}), "does not exist"),
    ],
)
def test_corrupt_or_incompatible_checkpoint(saved, tmp_path, damage, message):
    _, folder = saved
    bad = _copy(folder, tmp_path / "bad")
    damage(bad)
    with pytest.raises(CheckpointError, match=message):
        load_reward_model(bad)


def test_missing_folder_and_cli_error(tmp_path, capsys, saved):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_reward_model(tmp_path / "nothing")
    _, folder = saved
    bad = _copy(folder, tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"\x00" * 10)
    proj = tmp_path / "proj"
    from t2ialign.feedback import FeedbackStore

    FeedbackStore.create(proj)
    assert main(["reward", "eval", "--project", str(proj), "--reward", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "corrupt" in err


def test_reward_inputs_are_checked(saved):
    fn = ModelReward(saved[0])
    with pytest.raises(ValueError, match="2 prompts"):
        fn(images(), PROMPTS[:2], None)
    with pytest.raises(ValueError, match="float"):
        fn((images() * 255).to(torch.uint8), PROMPTS, None)
    assert to_prompt(parse(PROMPTS[0])) == PROMPTS[0]


def test_head_options():
    img, txt = (
        torch.nn.functional.normalize(torch.randn(4, 8), dim=-1),
        torch.nn.functional.normalize(torch.randn(4, 8), dim=-1),
    )
    prod = RewardHead(RewardHeadConfig(embed_dim=8, hidden=4, features="product")).eval()
    assert prod.fc1.in_features == 8 and prod(img, txt).shape == (4,)
    skip = RewardHead(RewardHeadConfig(embed_dim=8, hidden=4, cosine_skip=True)).eval()
    with torch.no_grad():
        skip.skip.fill_(2.0)
    # the MLP's output layer starts at zero: the untrained head is 2 * cos + init_bias
    assert torch.allclose(skip(img, txt), 2.0 * (img * txt).sum(-1) + 0.5, atol=1e-6)
    for bad in (dict(features="sum"), dict(hidden=0), dict(dropout=1.0), dict(embed_dim=0)):
        with pytest.raises(ValueError):
            RewardHeadConfig(**{"embed_dim": 8} | bad)
