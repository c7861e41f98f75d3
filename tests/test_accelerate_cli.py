"""Data-parallel runs of the CLI and of the offline trainers under Hugging Face Accelerate: two CPU
processes (gloo) of ``t2ialign finetune`` and ``t2ialign reward train`` started by ``accelerate
launch -m t2ialign``, reward-model training whose ranks agree (and match one process), and the
2 x B == 1 x 2B equivalence of a Diffusion-DPO step and of a DRaFT-LV step. Also ``finetune dpo``
from a project in one process (the CLI's pairs)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from t2ialign.algorithms.common import read_log
from t2ialign.cli.main import main
from t2ialign.feedback import FeedbackStore
from t2ialign.feedback.simulate import SimulatedRater, simulate
from t2ialign.models import build_generator, save_generator

pytest.importorskip("accelerate")

from accelerate_helpers import (  # noqa: E402
    ROOT,
    accelerate_bin,
    accelerate_train,
    dumps,
    free_port,
    initial_params,
    launch,
)
from feedback_helpers import world_rows  # noqa: E402


def _launch_cli(args: list[str], n: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes n -m t2ialign ARGS`` on the CPU."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MASTER_PORT": str(port)}
    cmd = [accelerate_bin(), "launch", "--multi_gpu", "--num_processes", str(n), "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    cmd += ["-m", "t2ialign", *map(str, args)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "gen"
    torch.manual_seed(0)
    g = build_generator("tiny")
    with torch.no_grad():
        g.unet.conv_out.weight.normal_(0, 0.05)
    save_generator(g, d)
    return d


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Renders of 8 seen prompts (true or one attribute off), oracle labels and pairs."""
    store = FeedbackStore.create(tmp_path_factory.mktemp("proj") / "p", labels_per_image=1)
    store.add_generations(world_rows(8, 4, every=7))
    simulate(store, SimulatedRater("oracle", noise=0.1, seed=0), pairs_per_prompt=2)
    return store.path


def test_finetune_cli_grpo_two_processes(tmp_path, tiny_generator):
    """``accelerate launch -m t2ialign finetune grpo``: two ranks (announced once), the log, checkpoint
    and model written once by the main process, the summary printed once."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "two red circles"}\n{"prompt": "a blue square"}\n')
    out = tmp_path / "grpo"
    res = _launch_cli(
        ["finetune", "grpo", "--model", tiny_generator, "--reward", "partial", "--prompts", prompts]
        + ["--iterations", "2", "--set", "group_size=2", "--set", "prompts_per_iter=2"]
        + ["--set", "train_steps=2", "--set", "minibatch_size=2", "--out", out]
    )
    assert res.stdout.count("data-parallel over 2 processes (cpu, replicated weights)") == 1, res.stdout
    assert res.stdout.count("saved the fine-tuned generator") == 1, res.stdout
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2]  # one row per iteration: the main process alone logs
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["reward_mean"]) for r in log)
    assert (out / "model.safetensors").exists() and (out / "trainer_state.pt").exists()
    assert json.loads((out / "card.json").read_text())["method"] == "grpo"


def test_reward_train_cli_two_processes(tmp_path, project):
    """``accelerate launch -m t2ialign reward train``: the main process alone writes the checkpoint
    and prints the summary."""
    out = tmp_path / "r"
    args = ["reward", "train", "--project", project, "--out", out, "--epochs", "3", "--hidden", "16"]
    res = _launch_cli(args)
    assert res.stdout.count("data-parallel over 2 processes (cpu)") == 1, res.stdout
    assert res.stdout.count(f"saved {out}") == 1 and res.stdout.count("threshold") == 1, res.stdout
    card = json.loads((out / "card.json").read_text())
    assert card["epochs"] == 3 and card["data"]["pairs"] > 0
    assert all(math.isfinite(r["train_total"]) for r in card["history"])
    assert (out / "model.safetensors").exists()


def test_finetune_cli_dpo_from_a_project(tmp_path, tiny_generator, project):
    """``t2ialign finetune dpo --project``: one process, the project's decided comparisons as pairs."""
    out = tmp_path / "dpo"
    args = ["finetune", "dpo", "--model", str(tiny_generator), "--project", str(project)]
    assert main([*args, "--iterations", "2", "--set", "batch_size=2", "--out", str(out)]) == 0
    assert [r["step"] for r in read_log(out)] == [1, 2] and (out / "model.safetensors").exists()
    assert json.loads((out / "card.json").read_text())["method"] == "dpo"


def _reward_run(tmp_path: Path, name: str, project: Path, two: bool) -> tuple[dict, list]:
    args = ["--method", "reward", "--project", str(project), "--iterations", "6", "--batch-size", "8"]
    args += ["--dropout", "0", "--out", str(tmp_path / f"o{name}"), "--dump", str(tmp_path / f"d{name}")]
    if two:
        launch(args)
    else:
        accelerate_train.main([*args, "--no-accelerator"])
    return torch.load(tmp_path / f"d{name}" / "rank0.pt"), json.loads(
        (tmp_path / f"o{name}" / "card.json").read_text()
    )


def test_reward_model_two_processes_agree_with_one(tmp_path, project):
    """Reward-head training over 2 ranks: both end with the same head and history, the main rank
    wrote the card, and (without dropout) the run is the one-process run up to float order."""
    two, card2 = _reward_run(tmp_path, "2", project, two=True)
    (s0, s1), (h0, h1) = dumps(tmp_path / "d2")
    assert all(torch.equal(s0["params"][k], s1["params"][k]) for k in s0["params"])
    assert h0 == h1 == card2["history"] and len(h0) == 6
    assert all(math.isfinite(r["train_total"]) and math.isfinite(r["val_total"]) for r in h0)
    assert {"train_mse", "train_pc", "train_bt", "train_total"} <= set(h0[0])
    assert card2["training_command"] == "accelerate_train.py"  # written by one rank, not torn
    one, card1 = _reward_run(tmp_path, "1", project, two=False)
    assert card2["best_epoch"] == card1["best_epoch"]
    for r2, r1 in zip(card2["history"], card1["history"], strict=True):
        assert r2.keys() == r1.keys()
        for k in r1:
            assert r2[k] == pytest.approx(r1[k], abs=2e-5), k  # history values are rounded to 1e-5
    for k, v in one["params"].items():
        torch.testing.assert_close(two["params"][k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "method, extra",
    [
        ("dpo", []),
        ("draft", ["--lv-samples", "2", "--beta", "0.5", "--train-steps", "2"]),
    ],
)
def test_step_two_processes_equals_one_process_double_batch(tmp_path, method, extra):
    """One step of Diffusion-DPO (pairs) or DRaFT-LV (with the pre-training term) with 2 processes x
    batch 2 gives the loss, gradient and parameters of 1 process x batch 4 on the same draws."""
    common = ["--method", method, "--iterations", "1", *extra]
    launch([*common, "--batch-size", "2", "--pretrain-batch-size", "2"] + _io(tmp_path, "2"))
    accelerate_train.main(
        [*common, "--batch-size", "4", "--pretrain-batch-size", "4", "--no-accelerator"] + _io(tmp_path, "1")
    )
    (two, two_b), (rows2, rows2_b) = dumps(tmp_path / "d2")
    one = torch.load(tmp_path / "d1" / "rank0.pt")
    rows1 = json.loads((tmp_path / "d1" / "rows0.json").read_text())
    assert rows2 == rows2_b  # both ranks logged the global batch's values
    assert rows2[0].keys() == rows1[0].keys()
    for k in rows1[0]:
        if k != "reward/n":  # the reward's info: a count of the rank's images, averaged over ranks
            assert rows2[0][k] == pytest.approx(rows1[0][k], rel=1e-5, abs=1e-7), k
    assert two["grads"].keys() == one["grads"].keys() and one["grads"]
    g1 = torch.cat([g.reshape(-1) for g in one["grads"].values()])
    g2 = torch.cat([two["grads"][k].reshape(-1) for k in one["grads"]])
    assert float(g1.norm()) > 0 and float((g2 - g1).norm()) < 1e-5 * float(g1.norm())
    p1, p2 = one["params"], two["params"]
    assert all(torch.equal(p2[k], two_b["params"][k]) for k in p2)
    before = initial_params()
    moved = sum(float(((p1[k] - before[k]) ** 2).sum()) for k in p1) ** 0.5
    diff = sum(float(((p2[k] - p1[k]) ** 2).sum()) for k in p1) ** 0.5
    # Adam's first step is ~ lr * sign(g): a gradient entry near 0 may flip with the summation order
    assert moved > 0 and diff < 1e-2 * moved, (diff, moved)
    assert [r["step"] for r in read_log(tmp_path / "o2")] == [1]


def _io(tmp_path: Path, name: str) -> list[str]:
    return ["--out", str(tmp_path / f"o{name}"), "--dump", str(tmp_path / f"d{name}")]
