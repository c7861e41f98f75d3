"""Gradient accumulation (``gradient_accumulation_steps``, ``t2ialign.algorithms.run``): K
micro-batches of B / K give the optimiser step of one batch of B (the same losses, gradients and
parameters up to float rounding), in one process and over two CPU processes; and the launch checks
(accumulation against the launcher's, mixed precision against the model's dtype) fail clearly
before any model loads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from accelerate_helpers import accelerate_train, fake_accelerator, initial_params, launch
from t2ialign.algorithms.dpo import DPOConfig
from t2ialign.algorithms.nft import NFTConfig
from t2ialign.algorithms.raft import RAFTConfig
from t2ialign.algorithms.refl import DRaFTConfig, ReFLConfig
from t2ialign.algorithms.run import TrainingRun, check_mixed_precision, resolve_accumulation
from t2ialign.algorithms.rwr import RWRConfig
from t2ialign.cli.finetune import check_launch, method_config


def run_script(tmp_path, name: str, args: list[str], accumulation: int, processes: int = 1):
    """Run benchmarks/accelerate_train.py (in this process, or launched over ``processes``) and
    return rank 0's dump (params, grads of the last step) and log rows."""
    out, dump = tmp_path / f"o{name}", tmp_path / f"d{name}"
    full = [*args, "--gradient-accumulation-steps", str(accumulation), "--out", str(out), "--dump", str(dump)]
    if processes == 1:
        accelerate_train.main([*full, "--no-accelerator"])
    else:
        launch(full, n=processes)
    return torch.load(dump / "rank0.pt"), json.loads((dump / "rows0.json").read_text())


def assert_same_step(a, b, keys=("loss",)):
    """Two runs took the same optimiser steps: logged losses, last gradients and parameters agree
    up to float summation order (a float32 loss near log 2 differs by about 1e-5 relative when summed
    in 4 parts), and the parameters moved."""
    (sa, ra), (sb, rb) = a, b
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb, strict=True):
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=3e-5, abs=1e-7), (k, x[k], y[k])
    assert sa["grads"].keys() == sb["grads"].keys() and sa["grads"]
    ga = torch.cat([g.reshape(-1) for g in sa["grads"].values()])
    gb = torch.cat([sb["grads"][k].reshape(-1) for k in sa["grads"]])
    assert float((ga - gb).norm()) < 5e-5 * float(ga.norm()), "the accumulated gradient differs"
    before = initial_params()
    pa, pb = sa["params"], sb["params"]
    moved = sum(float(((pa[k] - before[k]) ** 2).sum()) for k in pa) ** 0.5
    assert moved > 0
    # Adam's first steps are ~ lr * sign(g): where a gradient is ~0, rounding flips its sign, so the
    # parameters agree in norm (the gradients above agree element for element)
    diff = sum(float(((pb[k] - pa[k]) ** 2).sum()) for k in pa) ** 0.5
    assert diff < 1e-2 * moved, (diff, moved)


RWR = ["--method", "rwr", "--iterations", "2", "--beta", "0.5", "--ema", "0"]


@pytest.mark.parametrize(
    "name,args,keys,k",
    [
        (
            "rwr",
            [*RWR, "--batch-size", "8", "--pretrain-batch-size", "8"],
            ("loss", "model_loss", "pre_loss"),
            4,
        ),
        (
            "dpo",
            ["--method", "dpo", "--iterations", "1", "--batch-size", "8"],
            ("loss", "d_mean", "model_mse"),
            4,
        ),
        (
            "nft",
            ["--method", "nft", "--iterations", "2", "--prompts-per-iter", "2", "--group-size", "4"]
            + ["--minibatch-size", "4", "--beta", "0.5", "--pretrain-batch-size", "4", "--train-steps", "3"],
            ("loss", "nft_loss", "pre_loss"),
            4,
        ),
        (
            "raft",
            ["--method", "raft", "--iterations", "1", "--prompts-per-iter", "2", "--group-size", "2"]
            + ["--batch-size", "4", "--beta", "0.5", "--pretrain-batch-size", "4", "--train-steps", "3"],
            ("loss", "pre_loss"),
            2,
        ),
        (
            "refl",
            ["--method", "refl", "--iterations", "2", "--batch-size", "4", "--beta", "0.5"]
            + ["--pretrain-batch-size", "4", "--train-steps", "3"],
            ("loss", "reward_loss", "pre_loss", "reward_mean"),
            2,
        ),
        (
            "draft-lv",
            ["--method", "draft", "--iterations", "1", "--batch-size", "4", "--lv-samples", "2"]
            + ["--train-steps", "3"],
            ("loss", "reward_mean"),
            4,
        ),
    ],
)
def test_accumulated_step_equals_one_batch(tmp_path, name, args, keys, k):
    """K micro-batches of B / K give the step of one batch of B: same draws, losses, gradients and
    parameters (pre-training terms included)."""
    one = run_script(tmp_path, "1", args, 1)
    acc = run_script(tmp_path, str(k), args, k)
    assert_same_step(one, acc, keys)


def test_rwr_two_processes_accumulating_equal_one_process_one_batch(tmp_path):
    """2 processes x (2 micro-batches of 2) = 1 process x one batch of 8, weighted and pre-training
    terms (the weighted term normalised by the global batch's total weight)."""
    two = run_script(
        tmp_path, "2p", [*RWR, "--batch-size", "4", "--pretrain-batch-size", "4"], 2, processes=2
    )
    one = run_script(tmp_path, "1p", [*RWR, "--batch-size", "8", "--pretrain-batch-size", "8"], 1)
    assert_same_step(one, two, ("loss", "model_loss", "pre_loss"))


def test_dpo_two_processes_accumulating_equal_one_process_one_batch(tmp_path):
    args = ["--method", "dpo", "--iterations", "1"]  # beta = 500 amplifies float rounding in step 2
    two = run_script(tmp_path, "2p", [*args, "--batch-size", "4"], 4, processes=2)
    one = run_script(tmp_path, "1p", [*args, "--batch-size", "8"], 1)
    assert_same_step(one, two, ("loss", "d_mean", "model_mse"))


def test_nft_two_processes_accumulating_equal_two_processes_without(tmp_path):
    """Under two processes each rank's train batch is accumulated in parts: the same steps."""
    args = ["--method", "nft", "--iterations", "2", "--prompts-per-iter", "2", "--group-size", "4"]
    args += ["--minibatch-size", "4", "--beta", "0.5", "--pretrain-batch-size", "4", "--train-steps", "3"]
    plain = run_script(tmp_path, "k1", args, 1, processes=2)
    acc = run_script(tmp_path, "k2", args, 2, processes=2)
    assert_same_step(plain, acc, ("loss", "nft_loss", "pre_loss"))


# ---- configuration errors, before any model loads --------------------------------------------------


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: RWRConfig(batch_size=6, gradient_accumulation_steps=4), "batch_size=6"),
        (
            lambda: RWRConfig(batch_size=8, pretrain_batch_size=6, gradient_accumulation_steps=4),
            "pretrain_batch_size",
        ),
        (lambda: DPOConfig(batch_size=16, gradient_accumulation_steps=3), "batch_size=16"),
        (lambda: NFTConfig(train_batch_size=16, gradient_accumulation_steps=5), "train_batch_size=16"),
        (lambda: RAFTConfig(batch_size=16, gradient_accumulation_steps=0), "integer >= 1"),
        (lambda: ReFLConfig(batch_size=8, gradient_accumulation_steps=3), "batch_size=8"),
        (lambda: DRaFTConfig(batch_size=8, pretrain_batch_size=6, gradient_accumulation_steps=4), "pretrain"),
    ],
)
def test_accumulation_that_does_not_divide_the_batch_is_an_error(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_a_pre_training_batch_that_is_off_does_not_need_to_divide():
    RWRConfig(batch_size=8, pretrain_batch_size=6, beta=0.0, gradient_accumulation_steps=4)
    RAFTConfig(batch_size=8, pretrain_batch_size=6, gradient_accumulation_steps=4)  # pretrain_weight 0


def deepspeed_accelerator(steps):
    acc = fake_accelerator("DEEPSPEED", deepspeed_config={"zero_optimization": {"stage": 2}})
    acc.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"] = steps
    return acc


def test_launch_accumulation_is_taken_and_a_different_one_refused():
    assert resolve_accumulation(1, None) == 1
    assert resolve_accumulation(4, None) == 4
    launched = SimpleNamespace(gradient_accumulation_steps=4, mixed_precision="no")
    assert resolve_accumulation(1, launched) == 4  # accelerate launch --gradient_accumulation_steps 4
    assert resolve_accumulation(4, launched) == 4
    with pytest.raises(
        ValueError, match="gradient_accumulation_steps=2 in the trainer's config, 4 in the launch"
    ):
        resolve_accumulation(2, launched)
    assert resolve_accumulation(2, deepspeed_accelerator("auto")) == 2
    assert resolve_accumulation(1, deepspeed_accelerator(8)) == 8
    with pytest.raises(ValueError, match="DeepSpeed config"):
        resolve_accumulation(2, deepspeed_accelerator(8))


def test_the_cli_checks_the_launch_before_the_model_loads():
    cfg = method_config("grpo", ["gradient_accumulation_steps=2", "minibatch_size=32"])
    with pytest.raises(ValueError, match="in the launch"):
        check_launch(cfg, deepspeed_accelerator(4))
    bf16 = SimpleNamespace(gradient_accumulation_steps=1, mixed_precision="bf16")
    check_launch(cfg, bf16, "bf16")  # the model in bfloat16: the two agree
    with pytest.raises(ValueError, match="--mixed_precision bf16, but the model's weights are float32"):
        check_launch(cfg, bf16, "float32")
    with pytest.raises(ValueError, match="--mixed_precision bf16, but the model's weights are float32"):
        check_launch(cfg, bf16)  # the embedded model: float32


def test_mixed_precision_must_agree_with_the_model_dtype():
    check_mixed_precision(None, None)
    check_mixed_precision(SimpleNamespace(mixed_precision="no"), torch.float16)
    check_mixed_precision(SimpleNamespace(mixed_precision="fp16"), torch.float16)
    with pytest.raises(ValueError, match="fp16, but the model's weights are bfloat16"):
        check_mixed_precision(SimpleNamespace(mixed_precision="fp16"), torch.bfloat16)
    with pytest.raises(ValueError, match="not supported"):
        check_mixed_precision(SimpleNamespace(mixed_precision="fp8"), torch.bfloat16)


def test_micro_batches_split_evenly_and_never_empty():
    run = TrainingRun.__new__(TrainingRun)
    run.accumulation = 4
    assert run.micro_batches(8) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    sizes = [s.stop - s.start for s in run.micro_batches(6)]  # the last minibatch of an epoch
    assert sum(sizes) == 6 and max(sizes) - min(sizes) <= 1
    assert run.micro_batches(2) == [slice(0, 1), slice(1, 2)]  # fewer rows than K: one part each
    assert run.micro_batches(8, parts=2) == [slice(0, 4), slice(4, 8)]
    run.accumulation = 1
    assert run.micro_batches(5) == [slice(0, 5)]


def test_memory_benchmark_shows_the_activations_divided(tmp_path):
    """benchmarks/accumulation_memory.py on a tiny SD3: 4 micro-batches hold about a quarter of the
    activations of one batch."""
    import accumulation_memory

    rows = accumulation_memory.main(["--out", str(tmp_path), "--methods", "rwr", "--batch", "16"])
    one, four = rows
    assert one["activations_mb"] > 0 and four["accumulation"] == 4
    assert 0.2 < four["ratio"] < 0.35, rows
