"""Training the reward model on a small feedback project (store API + simulated labels): the
auxiliary loss's candidates, the split by prompt, a short smoke run, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from t2ialign.cli.main import main
from t2ialign.feedback import FeedbackStore
from t2ialign.feedback.simulate import SimulatedRater, simulate
from t2ialign.reward.model import EncoderBackbone, build_reward_model, load_reward_model
from t2ialign.reward.rewards import ModelReward
from t2ialign.reward.train import (
    RewardTrainConfig,
    build_data,
    candidate_prompts,
    init_from_similarity,
    split_prompts,
    train_reward_model,
)
from t2ialign.world import Spec, parse, perturbations, render, suite


def attribute_differences(a: Spec, b: Spec) -> int:
    """How many attributes differ: count, colour and shape per object group, background, relation."""
    if len(a.objects) != len(b.objects):
        return 99
    n = sum(
        (x.count != y.count) + (x.color != y.color) + (x.shape != y.shape)
        for x, y in zip(a.objects, b.objects, strict=True)
    )
    return n + (a.background != b.background) + (a.relation != b.relation)


def make_store(path, n_prompts=10, per_prompt=4, seed=0) -> FeedbackStore:
    """Renders of seen-suite prompts (every other task kind), half of them of a one-attribute
    perturbation (the checker says bad), plus a few unseen-suite images; simulated labels and pairs."""
    rng = np.random.default_rng(seed)
    store = FeedbackStore.create(path, labels_per_image=1)
    rows = []
    prompts = suite("seen")[::7][:n_prompts] + suite("unseen")[:2]
    for r in prompts:
        spec = parse(r["prompt"])
        others = perturbations(spec)
        for s in range(per_prompt):
            shown = spec if s % 2 == 0 else others[int(rng.integers(len(others)))][1]
            rows.append(dict(image=render(shown, seed=s), prompt=r["prompt"], model_id="render", seed=s))
    store.add_generations(rows)
    simulate(store, SimulatedRater("oracle", noise=0.1, seed=0), pairs_per_prompt=2)
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("proj") / "p")


@pytest.fixture(scope="module")
def backbone():
    return EncoderBackbone()


def test_candidates_differ_in_exactly_one_attribute():
    for row in suite("seen")[::3] + suite("unseen")[::3]:
        spec = parse(row["prompt"])
        cands = candidate_prompts(spec.to_dict())
        assert parse(cands[0]) == spec
        assert len(cands) == len(set(cands)) > 1
        for c in cands[1:]:
            assert attribute_differences(parse(c), spec) == 1, (row["prompt"], c)


def test_aux_loss_sees_only_valid_perturbations_of_good_images(store, backbone):
    cfg = RewardTrainConfig(val_fraction=0.3)
    data = build_data(store, cfg, backbone)
    recs = [r for r in store.labelled_images(load_images=False) if r.split != "unseen"]
    assert data.counts["labels"] == len(recs) and data.counts["aux_examples"] > 0
    for i in range(len(data.aux_img)):
        label_row = int(data.aux_label[i])
        rec = recs[label_row]
        assert rec.label == 1  # only images labelled good
        cands = data.aux_candidates(i)
        true = Spec.from_dict(rec.spec)
        assert parse(cands[0]) == true
        assert all(attribute_differences(parse(c), true) == 1 for c in cands[1:])
        assert data.aux_val[i] == data.label_val[label_row]
    # the ablation has no auxiliary examples
    assert build_data(store, RewardTrainConfig(aux=False), backbone).counts["aux_examples"] == 0


def test_split_is_by_prompt(store, backbone):
    data = build_data(store, RewardTrainConfig(val_fraction=0.3), backbone)
    assert not set(data.train_prompts) & set(data.val_prompts) and data.val_prompts
    recs = [r for r in store.labelled_images(load_images=False) if r.split != "unseen"]
    for r, v in zip(recs, data.label_val.tolist(), strict=True):
        assert v == (r.prompt in data.val_prompts)
    # the unseen part of the world is held out of training
    assert not any(r.split == "unseen" for r in recs if r.prompt in data.train_prompts + data.val_prompts)
    train, val = split_prompts(["a", "b", "c", "d", "e"], 0.2, seed=1)
    assert len(val) == 1 and sorted(train + val) == ["a", "b", "c", "d", "e"]
    assert split_prompts(["a"], 0.5, 0) == (["a"], [])


def test_config_is_validated():
    for bad in (
        dict(backbone="resnet"),
        dict(backbone="clip"),
        dict(labels="some"),
        dict(hidden=0),
        dict(val_fraction=1.0),
        dict(temperature=0.0),
        dict(lam=-1.0),
        dict(dropout=1.0),
        dict(patience=0),
        dict(early_stop="accuracy"),
    ):
        with pytest.raises(ValueError):
            RewardTrainConfig(**bad)


def test_training_smoke_run(store, backbone, tmp_path):
    cfg = RewardTrainConfig(max_epochs=20, patience=5, hidden=32, val_fraction=0.3)
    model = train_reward_model(store, cfg, out=tmp_path / "r", progress=False, backbone=backbone)
    card = json.loads((tmp_path / "r" / "card.json").read_text())
    assert card["data"]["labels"] > 0 and card["data"]["pairs"] > 0 and card["data"]["aux_examples"] > 0
    assert 1 <= card["best_epoch"] <= card["epochs"] <= 20
    first = card["history"][0]
    assert {"train_mse", "train_pc", "train_bt", "train_total", "val_total"} <= set(first)
    assert {"threshold", "train", "val"} <= set(card["metrics"])
    assert set(card["split"]) == {"train_prompts", "val_prompts"}
    loaded = load_reward_model(tmp_path / "r", backbone=backbone)
    x = torch.rand(2, 3, 32, 32)
    r, _ = ModelReward(loaded)(x, ["a red circle", "two squares"], None)
    with torch.no_grad():
        assert torch.allclose(r, model(x, ["a red circle", "two squares"]), atol=1e-6)


def test_cosine_skip_starts_from_the_fitted_similarity(store, backbone):
    cfg = RewardTrainConfig(max_epochs=1, hidden=16, cosine_skip=True, val_fraction=0.3)
    data = build_data(store, cfg, backbone)
    model = build_reward_model(backbone, hidden=16, cosine_skip=True)
    a, b = init_from_similarity(model, data)
    rows = torch.nonzero(~data.label_val).squeeze(1)
    cos = (data.img_emb[data.label_img[rows]] * data.txt_emb[data.label_txt[rows]]).sum(-1)
    y = data.label_y[rows]
    # least squares: the residuals are orthogonal to 1 and to cos
    res = y - (a * cos + b)
    assert abs(res.mean().item()) < 1e-5 and abs((res * (cos - cos.mean())).mean().item()) < 1e-5
    model.eval()
    with torch.no_grad():  # the MLP's output layer starts at zero: the head is a * cos + b
        r = model.score_embeddings(data.img_emb[data.label_img[rows]], data.txt_emb[data.label_txt[rows]])
    assert torch.allclose(r, a * cos + b, atol=1e-5)
    trained = train_reward_model(store, cfg, progress=False, backbone=backbone)
    assert trained.card["similarity_init"] == pytest.approx([a, b])


def test_cli_train_and_eval(store, tmp_path, capsys):
    out, js = tmp_path / "r", tmp_path / "eval.json"
    rc = main(
        ["reward", "train", "--project", str(store.path), "--out", str(out), "--epochs", "5", "--no-aux"]
    )
    assert rc == 0 and (out / "model.safetensors").exists()
    assert json.loads((out / "card.json").read_text())["data"]["aux_examples"] == 0
    assert "saved" in capsys.readouterr().out
    rc = main(["reward", "eval", "--project", str(store.path), "--reward", str(out), "--json", str(js)])
    assert rc == 0
    res = json.loads(js.read_text())
    assert {"train", "val", "unseen"} <= set(res["splits"])
    for split in res["splits"].values():
        assert {"accuracy", "auc", "ece", "n"} <= set(split["labels"]) and "accuracy" in split["checker"]
    assert "acc(checker)" in capsys.readouterr().out


def test_cli_user_errors(tmp_path, capsys):
    assert main(["reward", "train", "--project", str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    FeedbackStore.create(empty)
    assert main(["reward", "train", "--project", str(empty)]) == 2
    assert "no labels" in capsys.readouterr().err
    assert main(["reward", "train", "--project", str(empty), "--temperature", "0"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_restrict_keeps_validation_and_chosen_prompts(store, backbone):
    data = build_data(store, RewardTrainConfig(val_fraction=0.3), backbone)
    keep = data.train_prompts[:2]
    sub = data.restrict(keep)
    kept = {sub.texts[t] for t in sub.label_txt.tolist()}
    assert kept == set(keep) | set(data.val_prompts)
    assert int(sub.label_val.sum()) == int(data.label_val.sum())
    for i in range(len(sub.aux_img)):  # each aux example still points at its own (good) label row
        row = int(sub.aux_label[i])
        assert sub.label_y[row] == 1 and sub.label_img[row] == sub.aux_img[i]
    assert all(sub.texts[t] in kept for t in sub.pair_txt.tolist())
