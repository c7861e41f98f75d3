"""Free-text prompts, end to end, on a tiny random SD 1.5 pipeline and a tiny random CLIP built here
(nothing is downloaded): prompt files -> generate -> two annotators label through the real server's
HTTP API -> export -> reward train (auxiliary loss from the prompts' negatives) -> reward eval ->
finetune rwr and grpo with the learned reward -> sample -> the LoRA in a plain diffusers pipeline ->
eval (reward, CLIP score, agreement with held-out labels, per group; a before/after report).
Every command of docs/YOUR_OWN_MODEL.md runs here. Then the bad inputs: empty prompts, prompts
longer than the text encoder takes, files that are neither JSON lines nor text."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers_helpers import clip_tokenizer, save_tiny_clip  # noqa: E402
from feedback_helpers import ApiClient, running_server  # noqa: E402
from t2ialign.cli.main import main  # noqa: E402
from t2ialign.feedback import FeedbackStore  # noqa: E402
from t2ialign.prompts import PromptFileError, read_prompt_file  # noqa: E402

# prompts made of the tiny tokenizers' words (diffusers_helpers.WORDS), so that they fit in its 16
# tokens; one of them is in the shapes world's grammar (it gets a spec and the world's perturbations)
PROMPTS = [
    {"prompt": "a photo of a red cat", "group": "cats", "negatives": ["a photo of a blue cat", "a red dog"]},
    {"prompt": "a dark photo of two black cats", "group": "cats", "negatives": ["a photo of a white cat"]},
    {"prompt": "a photo of a dog in the dark", "group": "dogs", "negatives": ["a photo of a cat"]},
    {"prompt": "a bright photo of a white dog", "group": "dogs", "negatives": ["a dark photo of a dog"]},
    {"prompt": "a yellow dog in the photo", "group": "dogs", "negatives": ["a yellow cat"]},
    {"prompt": "two blue circles", "group": "shapes"},
]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel (16 px images, 16-d projections) with the pipelines' word tokenizer."""
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    tok = clip_tokenizer(folder)
    return save_tiny_clip(folder, tok)


def cli(capsys, *args) -> str:
    """Run ``t2ialign ARGS`` in this process; it must succeed. Returns its stdout."""
    capsys.readouterr()  # what came before (a fixture's progress bars) is not this command's
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == 0, f"t2ialign {' '.join(map(str, args))} failed:\n{err}"
    assert "truncated" not in err, err  # every prompt fits the tiny text encoders
    return out


def cli_error(capsys, *args) -> str:
    """Run ``t2ialign ARGS``; it must stop with a user error (exit 2, one 'error:' line)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1] if err.strip() else ""  # after any progress bar of a model's loading
    assert rc == 2 and last.startswith("error: ") and "Traceback" not in err, err
    return last


def label_everything(port: int, token: str, who: int) -> int:
    """One annotator labels every image the app gives them (a fixed rule: most good, some bad;
    annotator 1 disagrees on some) and compares two pairs. Returns the labels sent."""
    c = ApiClient(port, token)
    sent = 0
    try:
        while True:
            status, s = c.get("/api/next")
            assert status == 200, s
            if not s["items"]:
                break
            assert s["prompt"] and s["task"] in ("", "combination")  # free text has no task
            for it in s["items"]:
                assert (it["width"], it["height"]) == (16, 16)
                value = "bad" if (it["id"] + who * (it["id"] % 5 == 0)) % 3 == 0 else "good"
                status, out = c.post("/api/labels", {"generation_id": it["id"], "value": value})
                assert status == 200 and not out["duplicate"], out
                sent += 1
        for _ in range(2):
            status, s = c.get("/api/next?mode=pairs")
            assert status == 200 and len(s["items"]) == 2, s
            body = {"left": s["items"][0]["id"], "right": s["items"][1]["id"], "choice": "left"}
            status, out = c.post("/api/comparisons", body)
            assert status == 200, out
    finally:
        c.close()
    return sent


def test_free_text_end_to_end(pipelines, clip_dir, tmp_path, capsys):
    sd = pipelines("sd")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    text_prompts = tmp_path / "prompts.txt"  # the same prompts as plain text, one a line
    text_prompts.write_text("\n".join(r["prompt"] for r in PROMPTS[:4]) + "\n\n")
    proj, runs = tmp_path / "proj", tmp_path / "runs"

    # generate: free text into a feedback project, the metadata kept with each prompt
    gen = ["generate", "--project", proj, "--prompts", prompts, "--model", sd, "--steps", 2]
    out = cli(capsys, *gen, "--per-prompt", 2, "--labels-per-image", 2)
    assert "added 12 images of 6 prompts" in out
    out = cli(capsys, *gen, "--per-prompt", 3)  # adds the third image of each prompt, nothing twice
    assert "added 6 images of 6 prompts" in out and "(12 were there already); 18 in" in out
    store = FeedbackStore.open(proj)
    meta = store.prompt_metadata()
    assert meta["a photo of a red cat"] == {"group": "cats", "negatives": PROMPTS[0]["negatives"]}
    gens = {g["prompt"]: g for g in store.generations()}
    assert gens["a photo of a red cat"]["spec"] is None and gens["a photo of a red cat"]["task"] == "other"
    assert gens["two blue circles"]["task"] == "combination" and gens["two blue circles"]["spec"] is not None
    assert store.image(gens["a photo of a red cat"]["id"]).shape == (16, 16, 3)

    # two annotators label through the app's HTTP API (the real server, 'label serve')
    tokens = [
        cli(capsys, "label", "add-annotator", name, "--project", proj).strip().splitlines()[-1]
        for name in ("alice", "bob")
    ]
    with running_server(proj, tmp_path / "server.log") as server:
        import httpx

        page = httpx.get(server.url + "/label", headers={"Authorization": f"Bearer {tokens[0]}"})
        assert page.status_code == 200 and "16 x 16 px" in page.text
        assert "a photo of" in page.text or "two blue circles" in page.text
        sent = [label_everything(server.port, t, who) for who, t in enumerate(tokens)]
    assert sent == [18, 18] and store.counts()["labels"] == 36 and store.counts()["comparisons"] == 4
    store.close()

    # export: every label, with the prompts' metadata
    cli(capsys, "label", "export", "--project", proj, "--out", tmp_path / "export", "--format", "parquet")
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "export" / "data" / "labels.parquet").to_pydict()
    assert len(table["label"]) == 36 and {json.loads(m)["group"] for m in table["metadata"]} == {
        "cats",
        "dogs",
        "shapes",
    }

    # the reward: CLIP backbone, the auxiliary loss from the prompts' negatives (and the world's
    # perturbations for the one prompt of its grammar)
    reward = runs / "reward"
    out = cli(
        capsys,
        "reward", "train", "--project", proj, "--out", reward, "--backbone", "clip", "--backbone-path",
        clip_dir, "--hidden", 16, "--epochs", 15, "--patience", 5,
    )  # fmt: skip
    card = json.loads((reward / "card.json").read_text())
    d = card["data"]
    assert d["pairs"] == 4 and d["aux_examples"] > 0 and d["good_without_negatives"] == 0
    assert d["aux_sources"]["negatives"] > 0 and d["aux_sources"]["spec"] > 0
    assert len(card["split"]["val_prompts"]) == 2  # held out from training: eval's agreement below
    out = cli(capsys, "reward", "eval", "--project", proj, "--reward", reward)
    assert "val" in out

    # fine-tune with the learned reward: the seed paper's RWR on the labelled images, Flow-GRPO online
    common = ["--model", sd, "--device", "cpu", "--lora-rank", 4, "--set", "lr=0.01"]
    cli(
        capsys,
        "finetune", "rwr", "--project", proj, "--reward", reward, "--weight", "reward", "--out", runs / "rwr",
        "--iterations", 2, "--set", "beta=0", "--set", "batch_size=4", *common,
    )  # fmt: skip
    cli(
        capsys,
        "finetune", "grpo", "--reward", reward, "--prompts", text_prompts, "--out", runs / "grpo",
        "--iterations", 1, "--set", "prompts_per_iter=2", "--set", "group_size=2", "--set", "train_steps=2",
        "--set", "minibatch_size=4", "--set", "guidance=2", *common,
    )  # fmt: skip
    for run in ("rwr", "grpo"):
        assert (runs / run / "pytorch_lora_weights.safetensors").exists()
        assert json.loads((runs / run / "card.json").read_text())["kind"] == "t2ialign-diffusers-lora"

    # sample before and after (the manifests keep each prompt's metadata)
    for name, model in (("before", sd), ("after", runs / "grpo")):
        cli(
            capsys,
            "sample", "--model", model, "--prompts", prompts, "--per-prompt", 2, "--steps", 2, "--out",
            tmp_path / name,
        )  # fmt: skip
    manifest = [json.loads(x) for x in (tmp_path / "after" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 12 and manifest[0]["group"] == "cats" and manifest[0]["spec"] is None
    from t2ialign.world.imagefolder import load_image

    assert load_image(tmp_path / "before" / "000000.png").shape == (16, 16, 3)
    assert load_image(tmp_path / "after" / "000000.png").shape == (16, 16, 3)

    # the LoRA loads into a plain diffusers pipeline and changes what it draws
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def draw():
        kw = dict(height=16, width=16, num_inference_steps=2, guidance_scale=2.0, output_type="pt")
        return pipe(["a photo of a red cat"], generator=torch.Generator().manual_seed(0), **kw).images

    plain = draw()
    pipe.load_lora_weights(str(runs / "grpo"))
    tuned = draw()
    assert plain.shape == tuned.shape == (1, 3, 16, 16) and (plain - tuned).abs().max() > 1e-6

    # eval: the learned reward, the CLIP score and agreement with held-out human labels, per group
    out = cli(
        capsys,
        "eval", "--images", tmp_path / "before", tmp_path / "after", "--reward", reward, "--clip", clip_dir,
        "--project", proj, "--json", tmp_path / "eval.json", "--report", tmp_path / "report.md",
    )  # fmt: skip
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["scorers"] == ["reward", "clip"]
    for folder in res["folders"]:
        assert set(folder["groups"]) == {"cats", "dogs", "shapes"} and folder["n"] == 12
        assert folder["groups"]["cats"]["n"] == 4 and -1 <= folder["overall"]["clip"]["mean"] <= 1
    agree = res["agreement"]
    held_out = {p for p in card["split"]["val_prompts"]}
    assert agree["held_out_prompts"] == len(held_out) and agree["overall"]["n"] == 2 * 3 * len(held_out)
    assert 0 <= agree["overall"]["reward"]["accuracy"] <= 1
    report = (tmp_path / "report.md").read_text()
    assert "| cats | reward |" in report and "| all | clip |" in report and "held-out human labels" in report
    assert "change before -> after" in report.replace(str(tmp_path) + "/", "")

    # ShapesEval does not read free text, and says what to use instead
    err = cli_error(capsys, "eval", "--images", tmp_path / "after")
    assert "manifest.jsonl:1: unknown word 'photo'" in err and "--reward" in err


# ---- prompt files ---------------------------------------------------------------------------------


def test_prompt_files_text_and_jsonl(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("\ufeffa photo of a cat wearing a red hat\n\n   two blue circles  \n")
    pf = read_prompt_file(text)
    assert pf.format == "text" and pf.lines == [1, 3]
    assert pf.rows[0] == {
        "prompt": "a photo of a cat wearing a red hat",
        "spec": None,
        "task": None,
        "split": None,
    }
    assert pf.rows[1]["task"] == "combination" and pf.rows[1]["split"] == "seen" and pf.free_text() == [0]
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "a cat", "group": "g", "style": {"any": 1}}) + "\n")
    (row,) = read_prompt_file(jl).rows
    assert row["group"] == "g" and row["style"] == {"any": 1} and row["spec"] is None
    with pytest.raises(PromptFileError, match="unknown word 'cat'"):
        read_prompt_file(jl, require_spec=True)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("p.jsonl", '{"prompt": "a cat"}\n{"prompt": ""}\n', "p.jsonl:2: empty prompt"),
        ("p.jsonl", '{"prompt": "a cat"}\n{"prompt": "   "}\n', "p.jsonl:2: empty prompt"),
        ("p.jsonl", '{"prompt": 3}\n', "p.jsonl:1: 'prompt' must be a string"),
        ("p.jsonl", '{"prompt": "a cat"}\n\n{"prompt": "a dog",\n', "p.jsonl:3: not valid JSON"),
        ("p.jsonl", '{"prompt": "a cat"}\n["a dog"]\n', "p.jsonl:2: expected a JSON object"),
        ("p.jsonl", '{"text": "a cat"}\n', "p.jsonl:1: missing field(s) prompt"),
        ("p.jsonl", "a cat\n", "p.jsonl:1: expected a JSON object with a 'prompt'"),
        ("p.txt", 'a cat\n{"prompt": "a dog"}\n', "p.txt:2: a JSON line in a plain-text prompt file"),
        ("p.txt", "   \n\n", "p.txt: no prompts"),
        ("p.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "p.png:3: binary data"),
        ("p.txt", "a cat\nun chat \xe9\n".encode("latin-1"), "p.txt:2: not UTF-8 text"),
        ("p.jsonl", '{"prompt": "a cat", "group": 3}\n', "p.jsonl:1: 'group' must be a non-empty string"),
        ("p.jsonl", '{"prompt": "a cat", "negatives": "a dog"}\n', "p.jsonl:1: 'negatives' must be a list"),
        (
            "p.jsonl",
            '{"prompt": "a cat", "negatives": ["a cat"]}\n',
            "p.jsonl:1: 'negatives' of 'a cat' holds",
        ),
        (
            "p.jsonl",
            '{"prompt": "a cat", "group": "a"}\n{"prompt": "a cat", "group": "b"}\n',
            "p.jsonl:2: the prompt 'a cat' of line 1 again, with other metadata",
        ),
        ("p.jsonl", '{"prompt": "a cat", "spec": {"objects": []}}\n', "p.jsonl:1: a spec has one or two"),
    ],
)
def test_bad_prompt_files_name_the_file_and_line(tmp_path, capsys, pipelines, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PromptFileError) as e:
        read_prompt_file(path)
    assert message in str(e.value)
    if name == "p.jsonl" and "empty" in message:  # and from the command line, before any model loads
        err = cli_error(
            capsys, "sample", "--prompts", path, "--model", pipelines("sd"), "--out", tmp_path / "o"
        )
        assert message in err and not (tmp_path / "o").exists()


def test_long_prompts_are_truncated_with_a_warning_or_refused(pipelines, tmp_path, capsys):
    """The tiny CLIP text encoder takes 16 tokens (SD 1.5's takes 77): a longer prompt is truncated
    to them with a warning that names the line (what diffusers does), or refused with an error."""
    sd = pipelines("sd")
    path = tmp_path / "p.txt"
    long = "a photo of a red cat and a blue dog in the dark on a white background"
    path.write_text(f"a photo of a cat\n{long}\n")
    args = ["sample", "--model", sd, "--prompts", path, "--per-prompt", 1, "--steps", 1]
    n = len(transformers.CLIPTokenizer.from_pretrained(f"{sd}/tokenizer")(long)["input_ids"])
    assert n > 16
    rc = main([str(a) for a in [*args, "--out", tmp_path / "o"]])
    out, err = capsys.readouterr()
    assert rc == 0 and "wrote 2 images" in out
    assert f"{path}:2: {n} tokens > 16 (tokenizer)" in err and "truncated" in err
    err = cli_error(capsys, *args, "--out", tmp_path / "o2", "--long-prompts", "error")
    assert f"{path}:2: the prompt has {n} tokens" in err and "at most 16" in err
    assert not (tmp_path / "o2").exists()
    gen = ["generate", "--project", tmp_path / "proj", "--prompts", path, "--model", sd]
    err = cli_error(capsys, *gen, "--long-prompts", "error")
    assert f"{path}:2: the prompt has {n} tokens" in err and not (tmp_path / "proj").exists()


def test_free_text_needs_a_model_and_rewards_that_read_it(tmp_path, capsys):
    path = tmp_path / "p.txt"
    path.write_text("two blue circles\na photo of a cat wearing a red hat\n")
    err = cli_error(capsys, "sample", "--prompts", path, "--per-prompt", 1, "--out", tmp_path / "o")
    assert (
        f"{path}:2: the embedded shapes generator needs prompts of the embedded shapes world's grammar" in err
    )
    assert "unknown word 'photo'" in err and "--model PIPELINE_FOLDER" in err
    err = cli_error(capsys, "finetune", "grpo", "--reward", "checker:0.5,similarity:0.5", "--prompts", path,
                    "--out", tmp_path / "run")  # fmt: skip
    assert f"{path}:2: the checker reward needs prompts of the embedded shapes world's grammar" in err
    assert "clip=CLIP_DIR" in err and not (tmp_path / "run").exists()
    from t2ialign.reward.rewards import checker_reward

    with pytest.raises(ValueError, match="the checker reward .* needs prompts of the embedded shapes world"):
        checker_reward(torch.zeros(1, 3, 32, 32), ["a photo of a cat"], None)


def test_prompt_metadata_in_the_project(tmp_path):
    store = FeedbackStore.create(tmp_path / "p")
    img = np.zeros((512, 384, 3), np.uint8)  # any size
    row = dict(image=img, prompt="a cat", model_id="m", seed=0, metadata={"group": "a"})
    store.add_generations([row])
    store.add_generations([{**row, "seed": 1, "metadata": {}}])  # no metadata: the stored is kept
    assert store.prompt_metadata() == {"a cat": {"group": "a"}}
    with pytest.raises(ValueError, match="other metadata"):
        store.add_generations([{**row, "seed": 2, "metadata": {"group": "b"}}])
    assert store.counts()["generations"] == 2  # the refused call wrote nothing
    store.add_prompt("a cat", metadata={"group": "b"}, replace_metadata=True)
    assert store.generation(1)["metadata"] == {"group": "b"}
    with pytest.raises(ValueError, match="'negatives' must be a list"):
        store.add_prompt("a dog", metadata={"negatives": "a cat"})
    with pytest.raises(ValueError, match="may not hold spec"):
        store.add_prompt("a dog", metadata={"spec": None})


def test_version_1_projects_migrate_and_keep_their_labels(tmp_path):
    from t2ialign.feedback import schema

    store = FeedbackStore.create(tmp_path / "p")
    store.add_generation(np.zeros((8, 8, 3), np.uint8), "a cat", model_id="m", seed=0)
    ann = store.annotator_by_token(store.add_annotator("a"))["id"]
    store.add_label(1, ann, "good")
    store.close()
    conn = sqlite3.connect(tmp_path / "p" / "feedback.sqlite")  # back to version 1, as old releases wrote
    conn.execute("ALTER TABLE prompts DROP COLUMN metadata")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = FeedbackStore.open(tmp_path / "p")
    assert store._conn().execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION == 2
    assert len(list((tmp_path / "p" / "backups").glob("feedback-v1-*.sqlite"))) == 1
    assert [r.label for r in store.labelled_images()] == [1] and store.prompt_metadata() == {"a cat": {}}


# ---- the auxiliary loss's negatives on free text -------------------------------------------------


def test_word_swaps_and_word_lists(tmp_path):
    from t2ialign.reward.negatives import COLOUR_WORDS, COUNT_WORDS, read_word_groups, word_swaps

    swaps = word_swaps("Two red cats and one dog", (COUNT_WORDS, COLOUR_WORDS), limit=4)
    assert swaps == [
        "One red cats and one dog",
        "Two orange cats and one dog",
        "Two red cats and two dog",
        "Three red cats and one dog",
    ]
    assert word_swaps("a photo of a cat", (COUNT_WORDS,)) == []
    words = tmp_path / "words.txt"
    words.write_text("# sizes\nsmall, large huge\n\ncat dog\n")
    assert read_word_groups(words) == (("small", "large", "huge"), ("cat", "dog"))
    words.write_text("small large\nlarge tiny\n")
    with pytest.raises(ValueError, match=r"words.txt:2: the word 'large' is in another group"):
        read_word_groups(words)
    words.write_text("small\n")
    with pytest.raises(ValueError, match=r"words.txt:1: a word group needs at least two"):
        read_word_groups(words)


class _FakeBackbone(torch.nn.Module):
    """Deterministic embeddings from the pixels' mean and the prompt's characters."""

    embed_dim = 4

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, x):
        return torch.nn.functional.normalize(x.mean((2, 3)).repeat(1, 2)[:, :4] + 0.1, dim=-1)

    def encode_text(self, prompts):
        v = torch.tensor([[len(p), sum(map(ord, p)) % 7, p.count(" "), 1.0] for p in prompts])
        return torch.nn.functional.normalize(v.float(), dim=-1)


def test_aux_candidates_from_negatives_spec_or_word_swaps(tmp_path):
    from t2ialign.reward.negatives import COLOUR_WORDS, COUNT_WORDS
    from t2ialign.reward.train import RewardTrainConfig, build_data, candidate_prompts

    store = FeedbackStore.create(tmp_path / "p", labels_per_image=1)
    rows = [
        ("a photo of two red cats", {}),  # word swaps
        ("a photo of a cat", {"negatives": ["a photo of a dog"]}),  # given negatives
        ("a cat in a hat", {}),  # nothing to swap: no aux example
        ("two blue circles", {}),  # the world's perturbations
    ]
    for i, (p, meta) in enumerate(rows):
        store.add_generation(np.full((8, 8, 3), 40 * i, np.uint8), p, model_id="m", seed=0, metadata=meta)
    ann = store.annotator_by_token(store.add_annotator("a"))["id"]
    for gid in range(1, 5):
        store.add_label(gid, ann, "good")
    cfg = RewardTrainConfig(swap_words=(COUNT_WORDS, COLOUR_WORDS), swap_limit=3, val_fraction=0.0)
    data = build_data(store, cfg, _FakeBackbone())
    cands = {data.aux_candidates(i)[0]: data.aux_candidates(i) for i in range(len(data.aux_img))}
    assert cands["a photo of two red cats"] == [
        "a photo of two red cats",
        "a photo of one red cats",
        "a photo of two orange cats",
        "a photo of three red cats",
    ]
    assert cands["a photo of a cat"] == ["a photo of a cat", "a photo of a dog"]
    assert data.aux_candidates(2) == candidate_prompts(store.generation(4)["spec"])
    c = data.counts
    assert c["aux_examples"] == 3 and c["good_without_negatives"] == 1
    assert c["aux_sources"] == {"negatives": 1, "spec": 1, "word_swaps": 1}
    without = build_data(store, RewardTrainConfig(val_fraction=0.0), _FakeBackbone()).counts
    assert without["aux_examples"] == 2 and without["good_without_negatives"] == 2


def test_clip_score_reward_and_mixes(clip_dir, tmp_path):
    from t2ialign.cli.finetune import build_reward

    x, prompts = torch.rand(2, 3, 16, 16), ["a photo of a cat", "a red dog"]
    r, info = build_reward(f"clip={clip_dir}")(x, prompts, [{"prompt": p} for p in prompts])
    assert r.shape == (2,) and info["reward"] == "clip" and (r.abs() <= 1).all()
    mixed, _ = build_reward(f"clip={clip_dir}:0.25,clip={clip_dir}:0.75")(x, prompts, None)
    torch.testing.assert_close(mixed, r)
    pick, info = build_reward(f"pickscore={clip_dir}")(x, prompts, None)
    from t2ialign.reward.clip import CLIPBackbone

    scale = CLIPBackbone(clip_dir).model.logit_scale.exp()
    torch.testing.assert_close(pick, scale * r)
    assert info["reward"] == "pickscore"
    with pytest.raises(ValueError, match="not a folder"):
        build_reward(f"clip={tmp_path / 'nowhere'}")


def test_free_text_on_sd3_with_flow_grpo_and_a_clip_reward(pipelines, clip_dir, tmp_path, capsys):
    """SD3's tiny pipeline: free-text prompts -> Flow-GRPO with the CLIP score as the reward -> sample
    -> the LoRA loads into a plain diffusers StableDiffusion3Pipeline."""
    sd3 = pipelines("sd3")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a red cat\na bright photo of a white dog\n")
    run = tmp_path / "grpo"
    cli(
        capsys,
        "finetune", "grpo", "--model", sd3, "--device", "cpu", "--reward", f"clip={clip_dir}",
        "--prompts", prompts, "--out", run, "--iterations", 1, "--lora-rank", 4, "--set", "lr=0.01",
        "--set", "prompts_per_iter=2", "--set", "group_size=2", "--set", "train_steps=2",
        "--set", "minibatch_size=4", "--set", "guidance=2",
    )  # fmt: skip
    assert json.loads((run / "card.json").read_text())["backend"] == "sd3"
    cli(
        capsys,
        "sample",
        "--model",
        run,
        "--prompts",
        prompts,
        "--per-prompt",
        1,
        "--steps",
        2,
        "--out",
        tmp_path / "s",
    )
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def draw():
        kw = dict(height=16, width=16, num_inference_steps=2, guidance_scale=2.0, output_type="pt")
        return pipe(["a photo of a red cat"], generator=torch.Generator().manual_seed(0), **kw).images

    plain = draw()
    pipe.load_lora_weights(str(run))
    assert (plain - draw()).abs().max() > 1e-6


def test_aesthetic_mlp_on_clip_features(clip_dir, tmp_path):
    """LAION's aesthetic predictor layout (linear layers ``layers.0/2/4.weight``, no nonlinearity) on
    the tiny CLIP's 16-d embeddings, from a .pth state dict; a mismatched file is a clear error."""
    from t2ialign.cli.finetune import build_reward
    from t2ialign.reward.clip import CLIPBackbone

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(16, 8),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(8, 4),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(4, 1),
    )
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, tmp_path / "mlp.pth")
    fn = build_reward(f"aesthetic={tmp_path / 'mlp.pth'}@{clip_dir}")
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    r, info = fn(x, ["a cat", "a dog"], None)
    want = mlp.eval()(CLIPBackbone(clip_dir).encode_image(x.detach())).squeeze(-1)
    torch.testing.assert_close(r.detach(), want)
    assert info["reward"] == "aesthetic"
    r.sum().backward()
    assert x.grad.abs().sum() > 0  # differentiable in the pixels (ReFL, DRaFT)
    torch.save({"layers.0.weight": torch.zeros(1, 32)}, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="takes 32-d embeddings, the CLIP model gives 16-d"):
        build_reward(f"aesthetic={tmp_path / 'wide.pth'}@{clip_dir}")
    with pytest.raises(ValueError, match="expected aesthetic=WEIGHTS_FILE@CLIP_FOLDER"):
        build_reward(f"aesthetic={tmp_path / 'mlp.pth'}")


def test_app_shows_any_prompt_and_any_image_size(tmp_path):
    from fastapi.testclient import TestClient

    from t2ialign.feedback.app import create_app

    store = FeedbackStore.create(tmp_path / "p", labels_per_image=1)
    long = "a photo of a cat wearing a red hat, " * 4 + "in the style of an old <b>oil</b> painting"
    rng = np.random.default_rng(0)
    for seed, shape in enumerate([(512, 512, 3), (384, 512, 3), (32, 32, 3)]):
        store.add_generation(rng.integers(0, 255, shape, dtype=np.uint8), long, model_id="m", seed=seed)
    c = TestClient(create_app(store.path))
    c.headers["Authorization"] = f"Bearer {store.add_annotator('alice')}"
    s = c.get("/api/next").json()
    assert s["prompt"] == long and s["task"] == ""
    assert sorted((it["width"], it["height"]) for it in s["items"]) == [(32, 32), (512, 384), (512, 512)]
    page = c.get("/label").text
    assert 'class="prompt long"' in page and "&lt;b&gt;oil&lt;/b&gt;" in page  # escaped, smaller font
    assert page.count('class="px"') == 1 and "512 x 384 px" in page  # only the small image is pixelated
    for it in s["items"]:
        assert c.get(it["src"]).status_code == 200
        assert c.post("/api/labels", json={"generation_id": it["id"], "value": "good"}).status_code == 200
    assert [r.prompt for r in store.labelled_images()] == [long] * 3
