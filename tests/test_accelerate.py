"""Data-parallel training under Hugging Face Accelerate: two CPU processes (gloo) running Flow-GRPO
and RWR on the tiny preset, the 2 x B == 1 x 2B equivalence of an RWR step, and resume with a
changed process count.

On CPU, ``accelerate launch --cpu --num_processes 2`` starts a single process unless mpirun is set
up (accelerate's multi-CPU path), so the tests ask for accelerate's torchrun launcher with
``--multi_gpu``; the script's ``Accelerator(cpu=True)`` then forms a two-process gloo group.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2ialign.algorithms.common import Ranks, read_log

pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accelerate_train.py"
sys.path.insert(0, str(SCRIPT.parent))
import accelerate_train  # noqa: E402


def _accelerate_bin() -> str:
    exe = Path(sys.executable).with_name("accelerate")
    found = str(exe) if exe.exists() else shutil.which("accelerate")
    if not found:
        pytest.skip("no accelerate executable")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], n: int = 2, timeout: int = 240) -> str:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MASTER_PORT": str(port)}
    cmd = [
        _accelerate_bin(),
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(n),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        str(SCRIPT),
        *args,
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def _dumps(folder: Path, n: int = 2):
    states = [torch.load(folder / f"rank{r}.pt") for r in range(n)]
    rows = [json.loads((folder / f"rows{r}.json").read_text()) for r in range(n)]
    return states, rows


def _initial_params():
    return {k: v.clone() for k, v in accelerate_train.tiny_backend().gen.unet.state_dict().items()}


def _check_two_ranks(tmp_path: Path, iterations: int):
    (s0, s1), (rows0, rows1) = _dumps(tmp_path / "dump")
    assert len(rows0) == iterations
    untimed = [
        [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows] for rows in (rows0, rows1)
    ]
    assert untimed[0] == untimed[1]  # logged values are reduced over ranks (timings stay local)
    assert all(math.isfinite(r["loss"]) for r in rows0)
    p0, p1 = s0["params"], s1["params"]
    assert all(torch.equal(p0[k], p1[k]) for k in p0), "the ranks' parameters differ"
    before = _initial_params()
    assert any(not torch.equal(p0[k], before[k]) for k in p0), "no parameter changed"
    log = read_log(tmp_path / "out")
    assert [r["step"] for r in log] == list(range(1, iterations + 1))  # written once, by the main rank
    assert (tmp_path / "out" / "trainer_state.pt").exists()


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
    out = _launch([*args, "--iterations", "2", "--dump", str(tmp_path / "dump")])
    assert json.loads(out.strip().splitlines()[-1])["processes"] == 2
    _check_two_ranks(tmp_path, 2)
    rows = json.loads((tmp_path / "dump" / "rows0.json").read_text())
    assert all(0 < r["reward_std"] for r in rows)  # global group statistics, not one rank's
    # resume with a changed process count: one process continues from step 2
    accelerate_train.main([*args, "--iterations", "3", "--no-accelerator"])
    assert [r["step"] for r in read_log(tmp_path / "out")] == [1, 2, 3]


def test_rwr_two_processes_then_resume_in_one(tmp_path):
    args = ["--method", "rwr", "--out", str(tmp_path / "out"), "--beta", "0.5", "--ema", "0.5"]
    _launch([*args, "--iterations", "2", "--dump", str(tmp_path / "dump")])
    _check_two_ranks(tmp_path, 2)
    accelerate_train.main([*args, "--iterations", "3", "--no-accelerator"])
    assert [r["step"] for r in read_log(tmp_path / "out")] == [1, 2, 3]


def test_rwr_step_two_processes_equals_one_process_double_batch(tmp_path):
    """One RWR step (weighted and pre-training terms) with 2 processes x batch 4 gives the gradient
    and the parameters of 1 process x batch 8 on the same samples and noise."""
    common = ["--method", "rwr", "--iterations", "1", "--beta", "0.5", "--ema", "0"]
    _launch(
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
    before = _initial_params()
    p1, p2 = one["params"], two["params"]
    moved = sum(float(((p1[k] - before[k]) ** 2).sum()) for k in p1) ** 0.5
    diff = sum(float(((p2[k] - p1[k]) ** 2).sum()) for k in p1) ** 0.5
    assert moved > 0 and diff < 1e-3 * moved, (diff, moved)  # Adam's first step ~ lr * sign(g)
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=0, atol=1e-4)
