"""DDPO, DiffusionNFT and RAFT data-parallel under Hugging Face Accelerate: two CPU processes (gloo)
on the tiny preset for 2 iterations, then one process resumes the run to iteration 3 (see
``accelerate_helpers.py`` for the launch)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from t2ialign.algorithms.common import read_log

pytest.importorskip("accelerate")

from accelerate_helpers import accelerate_train, check_two_ranks, launch  # noqa: E402


def _run_then_resume(tmp_path, args: list[str]) -> list[dict]:
    launch([*args, "--out", str(tmp_path / "out"), "--iterations", "2", "--dump", str(tmp_path / "dump")])
    rows = check_two_ranks(tmp_path, 2)
    # resume with a changed process count: one process continues from iteration 2
    accelerate_train.main([*args, "--out", str(tmp_path / "out"), "--iterations", "3", "--no-accelerator"])
    assert [r["step"] for r in read_log(tmp_path / "out")] == [1, 2, 3]
    return rows


def test_ddpo_two_processes_then_resume_in_one(tmp_path):
    """8 samples per iteration split 4 + 4; the per-prompt tracker sees the gathered global batch."""
    _run_then_resume(tmp_path, ["--method", "ddpo", "--batch-size", "8", "--minibatch-size", "4"])
    # the checkpoint of iteration 3 (one process) holds the tracker that the two ranks handed on: it
    # saw every prompt drawn in the global batches (rank 1's shares included)
    state = torch.load(tmp_path / "out" / "trainer_state.pt", weights_only=False)
    drawn = [np.random.default_rng([0, it]).integers(4, size=8) for it in range(3)]
    counts = np.bincount(np.concatenate(drawn), minlength=4)
    stats = state["extra"]["stats"]
    prompts = [p["prompt"] for p in accelerate_train.PROMPTS]
    assert {p: len(v) for p, v in stats.items()} == {
        prompts[i]: min(int(c), 4) for i, c in enumerate(counts) if c
    }


def test_nft_two_processes_then_resume_in_one(tmp_path):
    """One group of 8 images per iteration split 4 + 4 over the ranks (optimality over the global
    group), with the pre-training term sharded over the ranks."""
    args = ["--method", "nft", "--prompts-per-iter", "1", "--group-size", "8", "--minibatch-size", "4"]
    rows = _run_then_resume(tmp_path, [*args, "--beta", "0.5", "--pretrain-batch-size", "2"])
    assert all(r["reward_std"] > 0 and r["pre_loss"] > 0 for r in rows)
    assert rows[1]["ema_decay"] == pytest.approx(0.01)


def test_raft_two_processes_then_resume_in_one(tmp_path):
    """3 prompts x 4 samples split 6 + 6 (the second prompt's samples span the ranks); the best of
    each prompt is chosen over the global set and every rank fine-tunes on all 3 kept samples."""
    args = ["--method", "raft", "--prompts-per-iter", "3", "--group-size", "4", "--batch-size", "2"]
    rows = _run_then_resume(tmp_path, [*args, "--beta", "0.5", "--pretrain-batch-size", "2"])
    assert all(r["kept"] == 3 and r["kept_reward_mean"] >= r["reward_mean"] for r in rows)


@pytest.mark.parametrize("method", ["ddpo", "nft", "raft"])
def test_uneven_global_batch_fails_early(tmp_path, method):
    """A global batch that does not split over the processes is refused before any collective."""
    from t2ialign.algorithms.ddpo import DDPOConfig, train_ddpo
    from t2ialign.algorithms.nft import NFTConfig, train_nft
    from t2ialign.algorithms.raft import RAFTConfig, train_raft

    acc = SimpleNamespace(process_index=0, num_processes=2, is_main_process=True, device=torch.device("cpu"))
    train, cfg = {
        "ddpo": (train_ddpo, DDPOConfig(batch_size=3)),
        "nft": (train_nft, NFTConfig(prompts_per_iter=3, group_size=3)),
        "raft": (train_raft, RAFTConfig(prompts_per_round=1, samples_per_prompt=3)),
    }[method]
    backend = accelerate_train.tiny_backend()
    with pytest.raises(ValueError, match="does not split over 2 processes"):
        train(backend, accelerate_train.red_reward, accelerate_train.PROMPTS, cfg, tmp_path, accelerator=acc)
    assert not (tmp_path / "log.jsonl").exists()
