"""Data-parallel training under Hugging Face Accelerate: two CPU processes (gloo) running Flow-GRPO
and RWR on the tiny preset, the 2 x B == 1 x 2B equivalence of an RWR step, and resume with a
changed process count (the launch helpers are in ``accelerate_helpers.py``; DDPO, NFT and RAFT
in ``test_accelerate_online.py``).
"""

from __future__ import annotations

import json

import pytest
import torch

from t2ialign.algorithms.common import Ranks, read_log

pytest.importorskip("accelerate")

from accelerate_helpers import accelerate_train, check_two_ranks, initial_params, launch  # noqa: E402


def test_ranks_without_accelerator_is_the_identity():
    ranks = Ranks(None)
    assert (ranks.rank, ranks.world, ranks.active, ranks.is_main) == (0, 1, False, True)
    assert ranks.shard(6) == slice(0, 6)
    t = torch.arange(3.0)
    assert ranks.gather(t) is t and ranks.all_sum(t) is t
    assert ranks.mean_scalars({"a": 1.0}) == {"a": 1.0}
    g1, g2 = ranks.generator(3, 5), torch.Generator().manual_seed(3 * 1_000_003 + 5)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_grpo_two_processes_then_resume_in_one(tmp_path):
    """2 iterations of Flow-GRPO over 2 ranks, one group of 8 images per iteration split 4 + 4 over
    the ranks (advantages over the global group); then one process resumes the run."""
    args = ["--method", "grpo", "--out", str(tmp_path / "out"), "--prompts-per-iter", "1"]
    args += ["--group-size", "8", "--minibatch-size", "4"]  # one group of 8 split 4 + 4 over the ranks
    out = launch([*args, "--iterations", "2", "--dump", str(tmp_path / "dump")])
    assert json.loads(out.strip().splitlines()[-1])["processes"] == 2
    check_two_ranks(tmp_path, 2)
    rows = json.loads((tmp_path / "dump" / "rows0.json").read_text())
    assert all(0 < r["reward_std"] for r in rows)  # global group statistics, not one rank's
    # resume with a changed process count: one process continues from step 2
    accelerate_train.main([*args, "--iterations", "3", "--no-accelerator"])
    assert [r["step"] for r in read_log(tmp_path / "out")] == [1, 2, 3]


def test_rwr_two_processes_then_resume_in_one(tmp_path):
    args = ["--method", "rwr", "--out", str(tmp_path / "out"), "--beta", "0.5", "--ema", "0.5"]
    launch([*args, "--iterations", "2", "--dump", str(tmp_path / "dump")])
    check_two_ranks(tmp_path, 2)
    accelerate_train.main([*args, "--iterations", "3", "--no-accelerator"])
    assert [r["step"] for r in read_log(tmp_path / "out")] == [1, 2, 3]


def test_rwr_step_two_processes_equals_one_process_double_batch(tmp_path):
    """One RWR step (weighted and pre-training terms) with 2 processes x batch 4 gives the gradient
    and the parameters of 1 process x batch 8 on the same samples and noise."""
    common = ["--method", "rwr", "--iterations", "1", "--beta", "0.5", "--ema", "0"]
    launch(
        [*common, "--batch-size", "4", "--pretrain-batch-size", "4"]
        + ["--out", str(tmp_path / "o2"), "--dump", str(tmp_path / "d2")]
    )
    accelerate_train.main(
        [*common, "--batch-size", "8", "--pretrain-batch-size", "8", "--no-accelerator"]
        + ["--out", str(tmp_path / "o1"), "--dump", str(tmp_path / "d1")]
    )
    two = torch.load(tmp_path / "d2" / "rank0.pt")
    one = torch.load(tmp_path / "d1" / "rank0.pt")
    rows2 = json.loads((tmp_path / "d2" / "rows0.json").read_text())
    rows1 = json.loads((tmp_path / "d1" / "rows0.json").read_text())
    assert rows2[0]["loss"] == pytest.approx(rows1[0]["loss"], rel=1e-5)
    assert rows2[0]["model_loss"] == pytest.approx(rows1[0]["model_loss"], rel=1e-5)
    assert rows2[0]["pre_loss"] == pytest.approx(rows1[0]["pre_loss"], rel=1e-5)
    assert two["grads"].keys() == one["grads"].keys() and one["grads"]
    g1 = torch.cat([g.reshape(-1) for g in one["grads"].values()])
    g2 = torch.cat([two["grads"][k].reshape(-1) for k in one["grads"]])
    assert float((g2 - g1).norm()) < 1e-5 * float(g1.norm())  # float summation order only
    torch.testing.assert_close(g2, g1, rtol=0, atol=1e-5 * float(g1.abs().max()))
    before = initial_params()
    p1, p2 = one["params"], two["params"]
    moved = sum(float(((p1[k] - before[k]) ** 2).sum()) for k in p1) ** 0.5
    diff = sum(float(((p2[k] - p1[k]) ** 2).sum()) for k in p1) ** 0.5
    assert moved > 0 and diff < 1e-3 * moved, (diff, moved)  # Adam's first step ~ lr * sign(g)
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=0, atol=1e-4)
