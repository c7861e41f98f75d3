"""``t2ialign generate`` and ``t2ialign label ...`` through the CLI's ``main`` (in-process: quick)."""

from __future__ import annotations

import json

import pytest

from feedback_helpers import make_project
from t2ialign.cli.main import build_parser, main
from t2ialign.world.imagefolder import write_prompts
from t2ialign.world.suites import suite


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random tiny generator saved to a folder; one torch thread (the test machine is small and
    shared: several threads there run many times slower than one)."""
    import torch

    models = pytest.importorskip("t2ialign.models")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("model") / "tiny"
    models.save_generator(models.build_generator("tiny"), path)
    yield path
    torch.set_num_threads(threads)


def test_generate_adds_and_never_duplicates(tmp_path, tiny_model, capsys):
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(suite("seen")[:3], prompts)
    proj = tmp_path / "proj"
    args = ["generate", "--project", str(proj), "--prompts", str(prompts), "--model", str(tiny_model)]
    args += ["--steps", "2", "--per-prompt", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "created feedback project" in out and "added 6 images" in out
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "added 0 images" in again and "(6 were there already)" in again
    from t2ialign.feedback import FeedbackStore

    store = FeedbackStore.open(proj)
    assert store.counts()["generations"] == 6
    assert main([*args[:-1], "3"]) == 0  # one more seed a prompt: three new images
    assert "added 3 images" in capsys.readouterr().out
    assert main([*args, "--guidance", "1.5"]) == 0  # other settings: other generations
    assert store.counts()["generations"] == 15
    g = store.generation(1)
    assert g["model_id"].startswith("shapes") and g["settings"] == {"steps": 2, "guidance": 3.0}
    assert store.image(1).shape == (32, 32, 3)
    store.close()


def test_label_commands(tmp_path, capsys):
    proj = tmp_path / "proj"
    make_project(proj, n_prompts=4, per_prompt=3, k=2).close()
    assert main(["label", "add-annotator", "--project", str(proj), "alice"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert len(token) > 20
    assert main(["label", "add-annotator", "--project", str(proj), "alice"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["label", "add-annotator", "--project", str(proj), "alice", "--rotate-token"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] != token

    sim = ["label", "simulate", "--project", str(proj), "--rater", "oracle", "--noise", "0.1"]
    assert main([*sim, "--bias", "count=0.2"]) == 0
    assert "sim-oracle: added 12 labels and 12 comparisons" in capsys.readouterr().out
    assert main([*sim, "--name", "sim-b", "--what", "labels", "--seed", "4"]) == 0
    assert "sim-b: added 12 labels and 0 comparisons" in capsys.readouterr().out

    assert main(["label", "stats", "--project", str(proj)]) == 0
    out = capsys.readouterr().out
    assert "Cohen" in out and "sim-oracle" in out and "alice" in out
    assert main(["label", "stats", "--project", str(proj), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["counts"]["labels"] == 24 and s["agreement"]["simulated"]["labels"]["n_items"] == 12

    out_dir = tmp_path / "export"
    assert (
        main(["label", "export", "--project", str(proj), "--out", str(out_dir), "--format", "parquet"]) == 0
    )
    assert "exported 24 labels and 12 pairs" in capsys.readouterr().out
    assert (out_dir / "data" / "pickapic.parquet").exists() and (out_dir / "README.md").exists()

    ls = tmp_path / "ls.json"
    ls.write_text("[]")
    assert main(["label", "import", "--project", str(tmp_path / "new"), "--labelstudio", str(ls)]) == 0
    assert "imported 0 labels" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["label", "serve", "--project", "{tmp}/none"], "no feedback project"),
        (["label", "stats", "--project", "{tmp}/none"], "no feedback project"),
        (["label", "simulate", "--project", "{proj}", "--bias", "size=0.2"], "--bias takes ATTRIBUTE"),
        (["label", "simulate", "--project", "{proj}", "--noise", "2"], "noise must be"),
        (["label", "serve", "--project", "{proj}", "--labels-per-image", "0"], "at least 1"),
        (["label", "import", "--project", "{proj}", "--labelstudio", "{tmp}/missing.json"], "no such file"),
        (["label", "add-annotator", "--project", "{proj}", "bad name"], "annotator name"),
        (["generate", "--project", "{proj}", "--prompts", "{tmp}/missing.jsonl"], "no such file"),
        (
            ["generate", "--project", "{proj}", "--prompts", "{tmp}/p.jsonl", "--model", "{tmp}/nomodel"],
            "--model",
        ),
        (
            ["generate", "--project", "{proj}", "--prompts", "{tmp}/p.jsonl", "--per-prompt", "0"],
            "at least 1",
        ),
    ],
)
def test_user_mistakes_exit_2_with_a_message(tmp_path, capsys, argv, message):
    proj = tmp_path / "proj"
    make_project(proj, n_prompts=1, per_prompt=1, k=1).close()
    write_prompts(suite("seen")[:1], tmp_path / "p.jsonl")
    argv = [a.format(tmp=tmp_path, proj=proj) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_help_ends_with_an_example():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    assert "example:" in sub["generate"].format_help()
    label_sub = sub["label"]._subparsers._group_actions[0].choices
    assert set(label_sub) == {"serve", "add-annotator", "simulate", "export", "import", "stats"}
    for name, p in label_sub.items():
        assert p.format_help().rstrip().splitlines()[-1].strip().startswith("t2ialign label " + name)
    serve = label_sub["serve"].parse_args(["--project", "p"])
    assert serve.host == "127.0.0.1"  # this machine only, unless told otherwise
