"""Shared by the Accelerate tests: launch ``benchmarks/accelerate_train.py`` over two CPU processes
(gloo) and check what the ranks dumped.

On CPU, ``accelerate launch --cpu --num_processes 2`` starts a single process unless mpirun is set
up (accelerate's multi-CPU path), so :func:`launch` asks for accelerate's torchrun launcher with
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

from t2ialign.algorithms.common import read_log

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accelerate_train.py"
if str(SCRIPT.parent) not in sys.path:
    sys.path.insert(0, str(SCRIPT.parent))
import accelerate_train  # noqa: E402


def accelerate_bin() -> str:
    exe = Path(sys.executable).with_name("accelerate")
    found = str(exe) if exe.exists() else shutil.which("accelerate")
    if not found:
        pytest.skip("no accelerate executable")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], n: int = 2, timeout: int = 240) -> str:
    """Run the script with ``args`` over ``n`` processes; returns its stdout (fails on an error)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MASTER_PORT": str(port)}
    cmd = [
        accelerate_bin(),
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


def fake_accelerator(
    kind: str, fsdp_plugin: dict | None = None, deepspeed_config: dict | None = None, mixed_precision="no"
):
    """An accelerator of rank 0 of 2 on CPU that reports ``DistributedType[kind]``, with an FSDP
    plugin of ``fsdp_plugin``'s attributes or a DeepSpeed plugin of ``deepspeed_config`` (for the
    checks ``Ranks`` makes at start, before any collective)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    class Fake:
        distributed_type = DistributedType[kind]
        process_index, num_processes, is_main_process = 0, 2, True
        device = torch.device("cpu")
        state = SimpleNamespace(
            fsdp_plugin=SimpleNamespace(**(fsdp_plugin or {})),
            deepspeed_plugin=SimpleNamespace(deepspeed_config=deepspeed_config),
        )

    Fake.mixed_precision = mixed_precision
    return Fake()


def dumps(folder: Path, n: int = 2):
    """Each rank's dumped weights and gradients, and its log rows."""
    states = [torch.load(folder / f"rank{r}.pt") for r in range(n)]
    rows = [json.loads((folder / f"rows{r}.json").read_text()) for r in range(n)]
    return states, rows


def initial_params():
    return {k: v.clone() for k, v in accelerate_train.tiny_backend().gen.unet.state_dict().items()}


def check_two_ranks(tmp_path: Path, iterations: int) -> list[dict]:
    """The two ranks of a run in ``tmp_path / "out"`` (dumped to ``tmp_path / "dump"``) logged the
    same finite values, hold the same, changed, parameters; the main rank alone wrote the log and a
    checkpoint. Returns rank 0's rows."""
    (s0, s1), (rows0, rows1) = dumps(tmp_path / "dump")
    assert len(rows0) == iterations
    untimed = [
        [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows] for rows in (rows0, rows1)
    ]
    assert untimed[0] == untimed[1]  # logged values are reduced over ranks (timings stay local)
    assert all(math.isfinite(r["loss"]) for r in rows0)
    p0, p1 = s0["params"], s1["params"]
    assert all(torch.equal(p0[k], p1[k]) for k in p0), "the ranks' parameters differ"
    before = initial_params()
    assert any(not torch.equal(p0[k], before[k]) for k in p0), "no parameter changed"
    log = read_log(tmp_path / "out")
    assert [r["step"] for r in log] == list(range(1, iterations + 1))  # written once, by the main rank
    assert (tmp_path / "out" / "trainer_state.pt").exists()
    return rows0
