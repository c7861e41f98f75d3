"""Smoke tests of ``t2ialign world ...`` and ``t2ialign eval`` through the real entry point
(``python -m t2ialign``, the same ``main`` as the installed ``t2ialign`` script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2ialign.world import TASKS, parse, render
from t2ialign.world.imagefolder import save_image


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "T2IALIGN_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "t2ialign", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def assert_user_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2 and a single ``error:`` line on stderr holding every needle."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """A small prompts file (some seen, some unseen prompts) rendered twice each into a folder."""
    d = tmp_path_factory.mktemp("cli")
    for split in ("seen", "unseen"):
        p = run("world", "prompts", "--suite", split, "--out", str(d / f"{split}.jsonl"))
        assert p.returncode == 0, p.stderr
    rows = read_jsonl(d / "seen.jsonl")[::8] + read_jsonl(d / "unseen.jsonl")[::8]
    (d / "small.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = run(
        "world", "render", "--prompts", str(d / "small.jsonl"), "--per-prompt", "2", "--out", str(d / "r")
    )
    assert p.returncode == 0, p.stderr
    assert f"wrote {2 * len(rows)} images" in p.stdout
    return d


# --- help ---------------------------------------------------------------------------------------


def test_top_level_help_and_version():
    p = run("--help")
    assert p.returncode == 0
    assert "world" in p.stdout and "eval" in p.stdout and "examples:" in p.stdout
    p = run("--version")
    assert p.returncode == 0 and p.stdout.startswith("t2ialign ")
    p = run()
    assert p.returncode == 2 and "required" in p.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["world"],
        ["world", "prompts"],
        ["world", "render"],
        ["world", "showcase"],
        ["world", "check"],
        ["eval"],
    ],
)
def test_every_world_command_has_help(command):
    p = run(*command, "--help")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"usage: t2ialign {' '.join(command)}")
    if command != ["world"]:
        assert "example:\n  t2ialign " + " ".join(command) in p.stdout
    else:
        for sub in ("prompts", "render", "showcase", "check"):
            assert sub in p.stdout


# --- the happy path -----------------------------------------------------------------------------


def test_prompts(rendered):
    for split in ("seen", "unseen"):
        rows = read_jsonl(rendered / f"{split}.jsonl")
        assert rows
        for r in rows:
            assert set(r) == {"prompt", "spec", "task", "split"}
            assert r["split"] == split and r["task"] in TASKS
            assert parse(r["prompt"]).to_dict() == r["spec"]
    seen = {r["prompt"] for r in read_jsonl(rendered / "seen.jsonl")}
    assert not seen & {r["prompt"] for r in read_jsonl(rendered / "unseen.jsonl")}


def test_render_writes_an_image_folder(rendered):
    manifest = read_jsonl(rendered / "r" / "manifest.jsonl")
    assert [m["seed"] for m in manifest] == list(range(len(manifest)))
    for m in manifest:
        assert set(m) >= {"file", "prompt", "spec", "task", "split", "seed"}
        with Image.open(rendered / "r" / m["file"]) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
    # the images are the library's renders
    m = manifest[3]
    arr = np.asarray(Image.open(rendered / "r" / m["file"]))
    assert np.array_equal(arr, render(parse(m["prompt"]), m["seed"]))


def test_render_size_64_and_seed(tmp_path, rendered):
    prompts, out = str(rendered / "small.jsonl"), str(tmp_path / "r64")
    p = run(
        "world",
        "render",
        "--prompts",
        prompts,
        "--per-prompt",
        "1",
        "--size",
        "64",
        "--seed",
        "100",
        "--out",
        out,
    )
    assert p.returncode == 0, p.stderr
    manifest = read_jsonl(tmp_path / "r64" / "manifest.jsonl")
    assert manifest[0]["seed"] == 100
    with Image.open(tmp_path / "r64" / manifest[0]["file"]) as im:
        assert im.size == (64, 64)
    p = run("eval", "--images", str(tmp_path / "r64"))
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "r64" / "eval.json").read_text())["overall"] == 1.0


def test_eval_writes_eval_json(rendered):
    p = run("eval", "--images", str(rendered / "r"))
    assert p.returncode == 0, p.stderr
    assert "overall 1.000" in p.stdout and "split:unseen" in p.stdout
    s = json.loads((rendered / "r" / "eval.json").read_text())
    assert {"overall", "tasks", "splits", "n", "task_mean", "images"} <= set(s)
    assert s["overall"] == 1.0
    assert set(s["tasks"]) <= set(TASKS) and len(s["tasks"]) >= 6
    for v in s["tasks"].values():
        assert {"accuracy", "n", "ci95"} <= set(v)
        assert v["accuracy"] == 1.0 and v["n"] >= 2
    assert set(s["splits"]) == {"seen", "unseen"}
    assert sum(v["n"] for v in s["splits"].values()) == s["n"] == len(s["images"])


def test_eval_scores_wrong_images(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    save_image(render(parse("two blue circles"), 0), folder / "a.png")
    save_image(render(parse("three blue circles"), 0), folder / "b.png")
    (folder / "manifest.jsonl").write_text(
        json.dumps({"file": "a.png", "prompt": "two blue circles"})
        + "\n"
        + json.dumps({"file": "b.png", "prompt": "two blue circles"})
        + "\n"
    )
    p = run("eval", "--images", str(folder))
    assert p.returncode == 0, p.stderr
    s = json.loads((folder / "eval.json").read_text())
    assert s["overall"] == 0.5
    assert s["tasks"]["combination"] == {"accuracy": 0.5, "n": 2, "ci95": s["tasks"]["combination"]["ci95"]}
    assert s["images"][0]["correct"] and s["images"][0]["failed"] == []
    assert not s["images"][1]["correct"] and "count" in s["images"][1]["failed"]


def test_showcase(tmp_path):
    p = run("world", "showcase", "--out", str(tmp_path / "show.png"))
    assert p.returncode == 0, p.stderr
    assert "24 renders" in p.stdout
    with Image.open(tmp_path / "show.png") as im:
        assert im.mode == "RGB" and im.size[0] > 6 * 128


def test_check(tmp_path):
    save_image(render(parse("two blue circles on a black background"), 0), tmp_path / "x.png")
    p = run("world", "check", str(tmp_path / "x.png"), "two blue circles on a black background")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("MATCH (combination)")
    p = run("world", "check", str(tmp_path / "x.png"), "two red circles on a black background")
    assert p.returncode == 1
    assert p.stdout.startswith("NO MATCH") and "BAD color" in p.stdout and "ok  count" in p.stdout


def test_check_converts_rgba_and_grey(tmp_path):
    img = render(parse("a yellow square on a white background"), 1)
    rgba = np.dstack([img, np.full(img.shape[:2], 255, dtype=np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    p = run("world", "check", str(tmp_path / "rgba.png"), "a yellow square on a white background")
    assert p.returncode == 0, p.stdout + p.stderr
    Image.fromarray(img).convert("L").save(tmp_path / "grey.png")
    p = run("world", "check", str(tmp_path / "grey.png"), "a yellow square on a white background")
    assert p.returncode in (0, 1) and "Traceback" not in p.stderr  # read as RGB and judged


# --- bad input ----------------------------------------------------------------------------------


def test_unknown_word_in_prompts_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "a red circle"}) + "\n" + json.dumps({"prompt": "two pink circles"}) + "\n"
    )
    p = run("world", "render", "--prompts", str(bad), "--out", str(tmp_path / "r"))
    line = assert_user_error(p, f"{bad}:2:", "unknown word 'pink'", "known words:")
    assert "circle" in line


def test_unknown_word_in_check_prompt(tmp_path):
    save_image(render(parse("a circle"), 0), tmp_path / "x.png")
    p = run("world", "check", str(tmp_path / "x.png"), "a hexagon")
    assert_user_error(p, "unknown word 'hexagon'")


def test_malformed_manifest_line(tmp_path, rendered):
    folder = tmp_path / "f"
    folder.mkdir()
    good = read_jsonl(rendered / "r" / "manifest.jsonl")[:2]
    for m in good:
        (folder / m["file"]).write_bytes((rendered / "r" / m["file"]).read_bytes())
    lines = [json.dumps(m) for m in good]
    manifest = folder / "manifest.jsonl"

    manifest.write_text("\n".join([lines[0], "", lines[1], '{"file": "x.png", "prompt": ']) + "\n")
    assert_user_error(run("eval", "--images", str(folder)), f"{manifest}:4:", "not valid JSON")

    manifest.write_text("\n".join([lines[0], json.dumps({"prompt": "a circle"})]) + "\n")
    assert_user_error(run("eval", "--images", str(folder)), f"{manifest}:2:", "missing field(s) file")

    manifest.write_text("\n".join([lines[0], "[1, 2]"]) + "\n")
    assert_user_error(run("eval", "--images", str(folder)), f"{manifest}:2:", "expected a JSON object")

    manifest.write_text(json.dumps({"file": good[0]["file"], "prompt": "a blue cow"}) + "\n")
    assert_user_error(run("eval", "--images", str(folder)), f"{manifest}:1:", "unknown word 'cow'")


def test_missing_and_unreadable_inputs(tmp_path):
    assert_user_error(run("eval", "--images", str(tmp_path / "nowhere")), "no such file")
    assert_user_error(
        run("world", "render", "--prompts", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "r")),
        "none.jsonl: no such file",
    )
    assert_user_error(run("world", "check", str(tmp_path / "none.png"), "a circle"), "cannot read image")

    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG not really")
    (folder / "manifest.jsonl").write_text(json.dumps({"file": "a.png", "prompt": "a circle"}) + "\n")
    assert_user_error(run("eval", "--images", str(folder)), "a.png: cannot read image")

    (folder / "manifest.jsonl").write_text(json.dumps({"file": "gone.png", "prompt": "a circle"}) + "\n")
    assert_user_error(run("eval", "--images", str(folder)), "gone.png: cannot read image")


def test_bad_arguments(tmp_path, rendered):
    p = run("world", "render", "--prompts", str(rendered / "small.jsonl"), "--per-prompt", "0", "--out", "x")
    assert_user_error(p, "--per-prompt must be at least 1")
    out = tmp_path / "r8"
    p = run("world", "render", "--prompts", str(rendered / "small.jsonl"), "--size", "8", "--out", str(out))
    assert_user_error(p, "--size must be at least 16 pixels")
    assert not out.exists()
    p = run("world", "prompts", "--suite", "train", "--out", "x.jsonl")
    assert p.returncode == 2 and "invalid choice" in p.stderr
