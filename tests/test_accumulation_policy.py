"""Gradient accumulation in the policy-gradient trainers (Flow-GRPO, MixGRPO, DDPO): a minibatch in K
micro-batches is the step of the whole minibatch (the same draws, gradients, weights and logged
values up to float rounding), the configs refuse a K that does not divide the minibatch, and two
processes with K = 2 train as two processes without accumulation."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math

import pytest
import torch

import t2ialign.algorithms.run as run_module
from accelerate_helpers import accelerate_train
from model_helpers import one_thread
from t2ialign.algorithms.ddpo import DDPOConfig, train_ddpo
from t2ialign.algorithms.grpo import GRPOConfig, train_grpo
from t2ialign.algorithms.mixgrpo import MixGRPOConfig, train_mixgrpo

ROWS = [{"prompt": "a red circle", "task": "colors"}, {"prompt": "two blue squares", "task": "counting"}]
LOGGED = ("loss", "policy_loss", "clip_frac", "approx_kl", "kl", "grad_norm", "reward_mean", "reward_std")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


tiny_backend = accelerate_train.tiny_backend


def _red(images, prompts, metadata):
    return images[:, 0].mean((1, 2)), {"n": len(prompts)}


def _train(train, cfg, out, k: int):
    """Train a fresh tiny backend with ``cfg`` at accumulation ``k``: (trainable weights, the last
    step's gradients, log rows, the largest change of a denoiser weight, LoRA merged)."""
    backend = tiny_backend()
    base = {n: v.clone() for n, v in backend.gen.unet.state_dict().items()}
    cfg = dataclasses.replace(cfg, gradient_accumulation_steps=k)
    rows = train(backend, _red, ROWS, cfg, out, progress=False)
    grads = {n: p.grad.clone() for n, p in backend.denoiser().named_parameters() if p.grad is not None}
    after = backend.merged_generator().unet.state_dict()
    moved = max(float((after[n] - base[n]).abs().max()) for n in base)
    return backend.state_dict_trainable(), grads, rows, moved


def _same_rows(rows1: list[dict], rows_k: list[dict]) -> None:
    """The same logged values up to float32 rounding. The PPO loss is a mean of terms -A r of order 1
    (|A| up to 5, r about 1) that nearly cancel: its rounding is about 1e-6 absolute, whatever its
    value."""
    assert [r["step"] for r in rows_k] == [r["step"] for r in rows1]
    for a, b in zip(rows1, rows_k, strict=True):
        assert set(a) == set(b)
        for key in LOGGED:
            if key in a:
                tol = 1e-5 if key in ("loss", "policy_loss") else 1e-9
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=tol), key


# lr: plain SGD's (see below)
TINY = dict(iterations=2, train_steps=3, guidance=2.0, lora_rank=0, checkpoint_every=1, lr=0.5)
CASES = {
    # two minibatches of 4 per epoch, two epochs, the KL term: micro-batches of 1
    "grpo": (
        train_grpo,
        GRPOConfig(prompts_per_iter=2, group_size=4, minibatch_size=4, inner_epochs=2, beta=0.1, **TINY),
        4,
    ),
    # a random subset of the steps per minibatch: the same draw with and without accumulation
    "grpo-timesteps": (
        train_grpo,
        GRPOConfig(prompts_per_iter=2, group_size=4, minibatch_size=8, timestep_fraction=0.67, **TINY),
        4,
    ),
    "mixgrpo-lora": (
        train_mixgrpo,
        MixGRPOConfig(
            prompts_per_iter=2,
            group_size=4,
            minibatch_size=4,
            beta=0.1,
            window_size=2,
            window_shift_every=1,
            **{**TINY, "lora_rank": 2, "lr": 0.1},
        ),
        2,
    ),
    # the losses summed over the steps
    "ddpo-is": (
        train_ddpo,
        DDPOConfig(batch_size=8, minibatch_size=4, buffer_size=4, min_count=2, **TINY),
        4,
    ),
    # 8 samples in minibatches of 6: the last one (2 samples) splits into parts of 1 (one part empty)
    "ddpo-uneven": (
        train_ddpo,
        DDPOConfig(batch_size=8, minibatch_size=6, buffer_size=4, min_count=2, **TINY),
        3,
    ),
    "ddpo-sf": (
        train_ddpo,
        DDPOConfig(batch_size=8, minibatch_size=8, variant="sf", timestep_fraction=0.5, **TINY),
        4,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_accumulation_is_the_minibatch_step(case, tmp_path, monkeypatch):
    """Two iterations with the minibatch in K micro-batches give the weights, the last gradients and
    the log rows of K = 1. Plain SGD in place of AdamW here: AdamW's first step is about
    lr * sign(g), which turns the rounding-level differences of near-zero gradient components into
    weight differences of up to lr (the test below checks the trainers' AdamW)."""

    def sgd(backend, params, ranks, lr, weight_decay, grad_clip):
        return torch.optim.SGD(params, lr=lr)

    monkeypatch.setattr(run_module, "make_optimizer", sgd)
    train, cfg, k = CASES[case]
    p1, g1, rows1, moved = _train(train, cfg, tmp_path / "k1", 1)
    pk, gk, rows_k, _ = _train(train, cfg, tmp_path / f"k{k}", k)

    assert p1.keys() == pk.keys() and g1.keys() == gk.keys() and g1
    assert moved > 1e-3, moved  # the runs trained: the tolerance below is far below the change
    for n in p1:
        torch.testing.assert_close(pk[n], p1[n], rtol=0, atol=1e-6, msg=n)
    scale = max(float(g.abs().max()) for g in g1.values())
    for n in g1:  # the second iteration's: its weights and samples differ by rounding
        torch.testing.assert_close(gk[n], g1[n], rtol=0, atol=5e-5 * scale, msg=n)
    _same_rows(rows1, rows_k)
    assert all(math.isfinite(r["loss"]) for r in rows_k)


@pytest.mark.parametrize("case", ["grpo", "ddpo-is"])
def test_accumulation_with_the_trainers_adamw(case, tmp_path):
    """One iteration with the trainers' AdamW, one optimiser step (the minibatch is the whole
    batch): the same gradient and logged values, and the same step up to AdamW's sign-like
    amplification of rounding in near-zero gradient components."""
    train, cfg, k = CASES[case]
    n = 8
    cfg = dataclasses.replace(cfg, iterations=1, inner_epochs=1, minibatch_size=n, lr=1e-3)
    before = tiny_backend().state_dict_trainable()
    p1, g1, rows1, _ = _train(train, cfg, tmp_path / "k1", 1)
    pk, gk, rows_k, _ = _train(train, cfg, tmp_path / f"k{k}", k)
    scale = max(float(g.abs().max()) for g in g1.values())
    for name in g1:
        torch.testing.assert_close(gk[name], g1[name], rtol=0, atol=1e-5 * scale, msg=name)
    _same_rows(rows1, rows_k)
    moved = sum(float(((p1[m] - before[m]) ** 2).sum()) for m in p1) ** 0.5
    diff = sum(float(((pk[m] - p1[m]) ** 2).sum()) for m in p1) ** 0.5
    assert moved > 0 and diff < 1e-3 * moved, (diff, moved)


@pytest.mark.parametrize("config", [GRPOConfig, MixGRPOConfig, DDPOConfig])
def test_accumulation_must_divide_the_minibatch(config):
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4 does not divide minibatch_size=6"):
        config(minibatch_size=6, gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be an integer >= 1"):
        config(gradient_accumulation_steps=0)
    assert config(minibatch_size=6, gradient_accumulation_steps=3).gradient_accumulation_steps == 3
    assert config().gradient_accumulation_steps == 1


# ---- two processes ---------------------------------------------------------------------------------

FLAG = "--gradient-accumulation-steps"


def _script_has_flag() -> bool:
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        accelerate_train.main(["--help"])
    return FLAG in text.getvalue()


def test_grpo_two_processes_with_accumulation_match_without(tmp_path):
    """Flow-GRPO over 2 ranks, one group of 8 images per iteration (4 per rank, one minibatch of 4
    per rank): with K = 2 (micro-batches of 2) the ranks hold the weights and the gradients of K = 1
    and log the same values."""
    pytest.importorskip("accelerate")
    from accelerate_helpers import check_two_ranks, dumps, launch

    if not _script_has_flag():
        pytest.skip(f"benchmarks/accelerate_train.py has no {FLAG} flag")
    args = ["--method", "grpo", "--iterations", "2", "--prompts-per-iter", "1", "--group-size", "8"]
    args += ["--minibatch-size", "4", "--beta", "0.1"]
    for k in (1, 2):
        run = tmp_path / f"k{k}"
        launch([*args, FLAG, str(k), "--out", str(run / "out"), "--dump", str(run / "dump")])
        check_two_ranks(run, 2)
    (one, _), (rows1, _) = dumps(tmp_path / "k1" / "dump")
    (two, _), (rows2, _) = dumps(tmp_path / "k2" / "dump")
    assert one["grads"].keys() == two["grads"].keys() and one["grads"]
    scale = max(float(g.abs().max()) for g in one["grads"].values())
    for name in one["grads"]:
        torch.testing.assert_close(
            two["grads"][name], one["grads"][name], rtol=0, atol=1e-4 * scale, msg=name
        )
    for name in one["params"]:  # two AdamW steps: about lr * sign(g) where g is near 0
        torch.testing.assert_close(two["params"][name], one["params"][name], rtol=0, atol=1e-4, msg=name)
    _same_rows(rows1, rows2)
    for k in (1, 2):  # the flag reached the config (the model card records it)
        card = json.loads((tmp_path / f"k{k}" / "out" / "card.json").read_text())
        assert card["grpo_config"]["gradient_accumulation_steps"] == k
