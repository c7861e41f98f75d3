"""The main job end to end (``demo --quick`` on tiny models) and ``finetune`` through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from t2ialign.models import build_generator, load_generator, save_generator
from t2ialign.models.encoder import DualEncoder, encoder_preset, save_encoder


def _cli(*args, cwd=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "t2ialign", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    g = build_generator("tiny")
    with torch.no_grad():
        g.unet.conv_out.weight.normal_(0, 0.05)
    save_generator(g, d / "gen")
    save_encoder(DualEncoder(encoder_preset("tiny")), d / "enc")
    return d / "gen", d / "enc"


def test_demo_quick_end_to_end(tmp_path, tiny_models):
    gen, enc = tiny_models
    out = tmp_path / "demo"
    proc = _cli(
        "demo",
        "--quick",
        "--model",
        gen,
        "--encoder",
        enc,
        "--out",
        out,
        "--prompts-per-task",
        1,
        "--sample-steps",
        4,
        "--ablation",
        "--ceiling",
        gen,
    )
    assert "t2ialign label serve" in proc.stdout  # tells the user how to label by hand
    for f in ("report.html", "report.md", "results.json", "grid_before.png", "grid_after.png", "curves.png"):
        assert (out / f).exists(), f
    res = json.loads((out / "results.json").read_text())
    for when in ("before", "after"):
        for split in ("seen", "unseen"):
            r = res[when][split]
            assert {"overall", "tasks", "fid", "mean_reward"} <= set(r)
            assert 0.0 <= r["overall"] <= 1.0 and r["fid"] >= 0
            assert all({"accuracy", "n"} <= set(t) for t in r["tasks"].values())
    # the paper's Table 3: base, labelled only, + pseudo-labels, + pre-training term (= the demo's run),
    # then the ceiling (here the base itself, so its row equals the base's)
    t3 = res["table3"]
    assert [r["training data"] for r in t3][0] == "base model" and len(t3) == 5
    assert t3[-1]["training data"].startswith("ceiling")
    assert (t3[-1]["accuracy"], t3[-1]["fid"]) == (t3[0]["accuracy"], t3[0]["fid"])
    assert all({"fid", "reward", "accuracy", "n"} <= set(r) for r in t3)
    after = res["after"]["seen"]
    assert (t3[-2]["accuracy"], t3[-2]["fid"]) == (after["overall"], after["fid"])
    assert "Table 3" in (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html.split("<body>")[1]  # self-contained
    # the fine-tuned model loads like any generator
    assert load_generator(out / "rwr").model_id == res["tuned_model"]
    # the demo never overwrites
    again = _cli("demo", "--quick", "--model", gen, "--encoder", enc, "--out", out, check=False)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_demo_rounds_keep_every_label_and_resume(tmp_path, tiny_models):
    """``demo --quick --rounds 2 --select uncertain``: round 2 labels new images of round 1's model
    (chosen from a 3x pool by the reward's uncertainty), the reward and the fine-tuning see every
    label so far; a round killed after its fine-tuning resumes to the same result without labelling
    anything twice; ``--resume --rounds 3`` adds a round; other settings are refused."""
    from t2ialign.feedback import FeedbackStore

    gen, enc = tiny_models
    out = tmp_path / "demo"
    common = ("--quick", "--model", gen, "--encoder", enc, "--out", out, "--prompts-per-task", 1)
    common += ("--train-guidance", 1)
    _cli("demo", *common, "--sample-steps", 2, "--rounds", 2, "--select", "uncertain")
    res = json.loads((out / "results.json").read_text())
    r1, r2 = res["rounds"]
    n = r1["feedback"]["sent"]
    assert r1["feedback"] == {"generated": n, "sent": n, "labels": n, "select": "random"}
    assert r2["feedback"] == {"generated": 3 * n, "sent": n, "labels": n, "select": "uncertain"}
    assert (r1["labelled_images"], r2["labelled_images"]) == (n, 2 * n)
    assert (
        r2["model"] == str(out / "round2" / "rwr")
        and res["tuned_model"] == load_generator(out / "round2" / "rwr").model_id
    )
    assert "Relabelling rounds" in (out / "report.md").read_text()
    with FeedbackStore.open(out / "feedback") as store:
        assert len(store.label_rows()) == 2 * n
        # the images labelled for training are drawn at the training guidance, not at the evaluation's
        assert {g["settings"]["guidance"] for g in store.generations()} == {1.0}
    # killed after round 2's fine-tuning, before its record: resumes to the same result
    (out / "round2" / "round.json").unlink()
    (out / "results.json").unlink()
    _cli("demo", *common, "--sample-steps", 2, "--rounds", 2, "--select", "uncertain", "--resume")
    again = json.loads((out / "results.json").read_text())
    assert again["rounds"][1]["feedback"]["labels"] == 0  # its images were labelled before the kill
    again["rounds"][1]["feedback"]["labels"] = n
    assert again["rounds"] == res["rounds"] and again["after"] == res["after"]
    with FeedbackStore.open(out / "feedback") as store:
        assert len(store.label_rows()) == 2 * n  # nothing labelled twice, nothing lost
    _cli("demo", *common, "--sample-steps", 2, "--rounds", 3, "--select", "uncertain", "--resume")
    assert [r["labelled_images"] for r in json.loads((out / "results.json").read_text())["rounds"]] == [
        n,
        2 * n,
        3 * n,
    ]
    p = _cli("demo", *common, "--sample-steps", 3, "--rounds", 3, "--resume", check=False)
    assert p.returncode == 2 and "other settings" in p.stderr and "sample_steps" in p.stderr
    p = _cli("demo", *common, "--rounds", 2, "--ablation", check=False)
    assert p.returncode == 2 and "rounds 1" in p.stderr


def test_uncertain_choice_takes_the_scores_nearest_the_threshold_per_prompt():
    from t2ialign.loop import uncertain_choice

    scores = [0.9, 0.45, 0.1, 0.6, 0.2, 0.52, 0.05, 0.99]
    groups = ["a", "a", "a", "a", "b", "b", "b", "b"]
    assert uncertain_choice(scores, groups, 2, 0.5) == [1, 3, 4, 5]
    assert uncertain_choice(scores, groups, 1, 0.0) == [2, 6]
    with pytest.raises(ValueError, match="3 scores for 2 items"):
        uncertain_choice([0.1, 0.2, 0.3], ["a", "b"], 1, 0.5)


@pytest.mark.parametrize("method", ["grpo", "nft", "raft"])
def test_finetune_cli_online(tmp_path, tiny_models, method):
    gen, _ = tiny_models
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "two red circles"}\n{"prompt": "a blue square"}\n')
    out = tmp_path / method
    _cli(
        "finetune",
        method,
        "--model",
        gen,
        "--reward",
        "partial",
        "--prompts",
        prompts,
        "--iterations",
        1,
        "--set",
        "group_size=2" if method != "raft" else "samples_per_prompt=2",
        "--out",
        out,
    )
    assert (out / "model.safetensors").exists() and (out / "log.jsonl").exists()
    load_generator(out)


def test_finetune_cli_errors(tmp_path, tiny_models):
    gen, _ = tiny_models
    p = _cli("finetune", "grpo", "--model", gen, "--out", tmp_path / "x", check=False)
    assert p.returncode == 2 and "needs --reward" in p.stderr
    p = _cli("finetune", "grpo", "--model", gen, "--reward", "nonsense", "--out", tmp_path / "x", check=False)
    assert p.returncode == 2 and "not a known reward" in p.stderr
    p = _cli(
        "finetune",
        "grpo",
        "--model",
        gen,
        "--reward",
        "checker",
        "--set",
        "bogus=1",
        "--out",
        tmp_path / "x",
        check=False,
    )
    assert p.returncode == 2 and "no such field" in p.stderr
    p = _cli("finetune", "rwr", "--model", gen, "--out", tmp_path / "x", check=False)
    assert p.returncode == 2 and "--project" in p.stderr


@pytest.mark.parametrize("method", ["rwr", "nft-labelled"])
def test_finetune_cli_on_a_labelled_project(tmp_path, tiny_models, method):
    """The labelled-data methods through the CLI, on a project labelled by the simulated oracle."""
    from feedback_helpers import make_project
    from t2ialign.feedback.simulate import SimulatedRater, simulate

    gen, _ = tiny_models
    store = make_project(tmp_path / "proj", n_prompts=3, per_prompt=4, k=1)
    simulate(store, SimulatedRater("oracle", seed=0), pairs=False)
    out = tmp_path / method
    _cli(
        "finetune",
        method,
        "--model",
        gen,
        "--project",
        tmp_path / "proj",
        "--iterations",
        2,
        "--set",
        "batch_size=4",
        "--set",
        "pretrain_batch_size=4",
        "--out",
        out,
    )
    assert (out / "model.safetensors").exists() and len((out / "log.jsonl").read_text().splitlines()) == 2
    load_generator(out)


def test_demo_quick_with_labelled_nft(tmp_path, tiny_models):
    gen, enc = tiny_models
    out = tmp_path / "demo"
    common = ("--quick", "--model", gen, "--encoder", enc, "--out", out, "--prompts-per-task", 1)
    _cli("demo", *common, "--sample-steps", 2, "--method", "nft-labelled")
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["method"] == "nft-labelled" and res["feedback"]["pseudo_images"] == 0
    assert "nft_loss" in (out / "rwr" / "log.jsonl").read_text()
    p = _cli("demo", *common, "--method", "nft-labelled", "--ablation", check=False)
    assert p.returncode == 2 and "method rwr" in p.stderr
