"""End to end run of benchmarks/compare_methods.py in its --tiny mode (a random tiny generator)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_methods.py"


def load_script():
    spec = importlib.util.spec_from_file_location("compare_methods", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_spread_covers_every_task():
    from t2ialign.world.suites import suite

    mod = load_script()
    seen = suite("seen")
    tasks = {r["task"] for r in seen}
    rows = mod.spread(seen, len(tasks))
    assert len(rows) == len(tasks) and {r["task"] for r in rows} == tasks
    assert mod.spread(seen, 3) == rows[:3]
    assert len(mod.spread(seen, 10_000)) == len(seen)


def test_tiny_end_to_end(tmp_path):
    mod = load_script()
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Other section\n\ntext\n")
    out_json, img = tmp_path / "res.json", tmp_path / "img"
    argv = [
        "--tiny",
        "--methods",
        "grpo,nft,raft",
        "--seeds",
        "0,1",
        "--chunk",
        "1",
        "--max-iterations",
        "2",
        "--budget-seconds",
        "1000",
        "--json",
        str(out_json),
        "--img-dir",
        str(img),
        "--name",
        "cmp",
        "--results",
        str(results),
        "--quiet",
    ]
    assert mod.main(argv) == 0
    res = json.loads(out_json.read_text())
    runs = {(r["method"], r["seed"]): r for r in res["runs"]}
    assert set(runs) == {(m, s) for m in ("grpo", "nft", "raft") for s in (0, 1)}
    for (method, _), run in runs.items():
        pts = run["points"]
        # the base point at 0 s, then one point per chunk of one iteration
        assert [p["iteration"] for p in pts] == [0, 1, 2]
        times = [p["train_wall_s"] for p in pts]
        assert times[0] == 0 and all(b > a for a, b in zip(times, times[1:], strict=False)), times
        for p in pts:
            for key in ("seen_acc", "unseen_acc", "overall_acc", "proxy_reward"):
                assert 0.0 <= p[key] <= 1.0, (method, key, p[key])
            assert p["fid"] >= 0
            assert p["n_images"] == len(res["settings"]["eval_prompts"])
        assert run["config"][run["iteration_field"]] == 2
        assert run["config"]["seed"] == run["seed"]
    # the checker is not differentiable: ReFL / DRaFT are not in the default list
    assert res["settings"]["reward_differentiable"] is False
    assert res["settings"]["eval_seen"] == res["settings"]["eval_unseen"] == 2
    for name in ("cmp_accuracy.png", "cmp_reward.png"):
        data = (img / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    text = results.read_text()
    section = text[text.index("## Method comparison") :]
    assert text.index("## Other section") < text.index("## Method comparison")
    assert "python benchmarks/compare_methods.py --tiny" in section and "| nft | 2 |" in section
    assert "nproc" in section


def test_gradient_methods_need_a_differentiable_reward(tmp_path):
    mod = load_script()
    with pytest.raises(SystemExit):
        mod.main(["--tiny", "--methods", "refl", "--json", str(tmp_path / "x.json"), "--quiet"])


def test_prompts_file_rows_and_bad_lines(tmp_path):
    mod = load_script()
    f = tmp_path / "prompts.txt"
    f.write_text("a red circle on a black background\n\ntwo squares\n")
    rows = mod.prompt_rows(str(f))
    assert [r["prompt"] for r in rows] == ["a red circle on a black background", "two squares"]
    assert rows[0]["spec"]["background"] == "black" and rows[1]["spec"]["objects"][0]["count"] == 2
    assert {(r["task"], r["split"]) for r in rows} == {("prompts", "seen")}
    f.write_text("a red circle\na purple elephant\n")
    with pytest.raises(SystemExit, match=r"prompts.txt:2: .*'a purple elephant'"):
        mod.prompt_rows(str(f))
    f.write_text("\n")
    with pytest.raises(SystemExit, match="no prompts"):
        mod.prompt_rows(str(f))


def test_fixture_prompts_end_to_end_without_fid(tmp_path):
    """On the 16 px fixture (another size than the encoder's) with its prompts file: no FID, no
    unseen split, accuracies from the checker."""
    mod = load_script()
    fixture = Path(__file__).resolve().parent / "fixtures" / "misaligned16"
    out_json = tmp_path / "res.json"
    argv = ["--model", str(fixture), "--prompts", str(fixture / "prompts.txt"), "--methods", "nft"]
    argv += ["--seeds", "0", "--chunk", "1", "--max-iterations", "1", "--eval-per-prompt", "2"]
    argv += ["--eval-steps", "2", "--set", "nft.prompts_per_iter=2", "--set", "nft.group_size=2"]
    argv += ["--set", "nft.sample_steps=2", "--json", str(out_json), "--img-dir", str(tmp_path), "--quiet"]
    assert mod.main(argv) == 0
    res = json.loads(out_json.read_text())
    assert res["settings"]["eval_seen"] == 4 and res["settings"]["eval_unseen"] == 0
    for p in res["runs"][0]["points"]:
        assert p["fid"] is None and p["unseen_acc"] is None and 0.0 <= p["seen_acc"] <= 1.0
