"""``benchmarks/labelling_budget.py``: the budget curve and the rounds comparison run real demos (on
tiny models here), each in its own folder, and read finished ones back instead of running them again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2ialign.models import build_generator, save_generator
from t2ialign.models.encoder import DualEncoder, encoder_preset, save_encoder

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "labelling_budget.py"


def _bench(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH), *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _tiny(tmp_path) -> list:
    torch.manual_seed(0)
    save_generator(build_generator("tiny"), tmp_path / "gen")
    save_encoder(DualEncoder(encoder_preset("tiny")), tmp_path / "enc")
    tiny = ["--", "--model", tmp_path / "gen", "--encoder", tmp_path / "enc", "--prompts-per-task", 1]
    return tiny + ["--sample-steps", 2]


def test_budget_curve_on_tiny_models(tmp_path):
    tiny = _tiny(tmp_path)
    out = tmp_path / "budget.json"
    args = ["budget", "--per-prompt", 1, 2, "--quick", "--workdir", tmp_path / "b", "--json", out]
    _bench(*args, "--plot", tmp_path / "budget.png", *tiny)
    rows = json.loads(out.read_text())["runs"]
    assert [r["per_prompt"] for r in rows] == [1, 2]
    assert rows[1]["labelled_images"] == 2 * rows[0]["labelled_images"] > 0
    assert all(0 <= r["seen"] <= 1 and r["seen_ci95"][0] <= r["seen"] <= r["seen_ci95"][1] for r in rows)
    assert (tmp_path / "budget.png").stat().st_size > 0
    stamp = (tmp_path / "b" / "k1" / "results.json").stat().st_mtime_ns
    _bench(*args, *tiny)  # finished runs are read back, not run again
    assert (tmp_path / "b" / "k1" / "results.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_rounds_against_one_round_on_tiny_models(tmp_path):
    tiny = _tiny(tmp_path)
    out = tmp_path / "rounds.json"
    _bench(
        "rounds",
        "--per-prompt",
        1,
        "--rounds",
        2,
        "--quick",
        "--workdir",
        tmp_path / "r",
        "--json",
        out,
        *tiny,
    )
    rows = json.loads(out.read_text())["runs"]
    assert [r["run"] for r in rows] == ["1 round x 2", "2 rounds x 1, random", "2 rounds x 1, uncertain"]
    assert len({r["labelled_images"] for r in rows}) == 1  # the same total labels
    assert [len(r["rounds"]) for r in rows] == [1, 2, 2]
