"""The base models: pre-training (a few steps, and resume after SIGKILL), checkpoints (round trip and
clear errors, in Python and through the CLI) and the shipped generator and encoder."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model_helpers import one_thread, tiny_encoder, tiny_generator
from t2ialign.cli.main import main
from t2ialign.models import CheckpointError, build_generator, load_generator, save_generator
from t2ialign.models.encoder import (
    DualEncoder,
    EncoderTrainConfig,
    encoder_preset,
    load_encoder,
    pretrain_encoder,
    save_encoder,
)
from t2ialign.models.pretrain import PretrainConfig, pretrain
from t2ialign.models.text import Tokenizer
from t2ialign.sampling import generate_images
from t2ialign.world import PromptError, render, suite
from t2ialign.world.imagefolder import evaluate_folder, read_manifest, write_prompts

CHECKPOINTS = Path(__file__).resolve().parent.parent / "src" / "t2ialign" / "checkpoints"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "T2IALIGN_DEBUG"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # as in-process (see model_helpers.one_thread)
    return env


def _cli(*args: str, **kw) -> list[str]:
    return [sys.executable, "-m", "t2ialign", *args]


def _user_error(rc: int, stderr: str, *needles: str) -> str:
    """Exit code 2 and a single ``error:`` line holding every needle."""
    assert rc == 2, (rc, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ---- training a few steps --------------------------------------------------------------------------


def test_tiny_generator_trains(tmp_path):
    cfg = PretrainConfig(preset="tiny", steps=3, batch_size=4, checkpoint_every=3, warmup=1)
    ema = pretrain(cfg, tmp_path, progress=False)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 3 and len(ck["losses"]) == 3
    assert all(math.isfinite(v) and v > 0 for v in ck["losses"])
    init = build_generator("tiny", seed=0).state_dict()
    changed = [k for k, v in ck["model"].items() if not torch.equal(v, init[k])]
    assert len(changed) > 0.9 * len(init), f"only {len(changed)} of {len(init)} tensors changed"
    assert any(not torch.equal(v, init[k]) for k, v in ema.state_dict().items())
    loaded = load_generator(tmp_path)
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["steps"] == 3 and card["pretrain_config"]["preset"] == "tiny"
    assert loaded.model_id == card["model_id"] and card["model_id"].startswith("shapes-tiny-")
    for k, v in ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # resuming with other settings is refused with a clear message
    with pytest.raises(ValueError, match="other settings.*batch_size"):
        pretrain(PretrainConfig(preset="tiny", steps=4, batch_size=8, checkpoint_every=3, warmup=1), tmp_path)


def test_tiny_encoder_trains(tmp_path):
    cfg = EncoderTrainConfig(preset="tiny", steps=3, batch_size=4, checkpoint_every=3)
    model = pretrain_encoder(cfg, tmp_path, progress=False)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 3 and all(math.isfinite(v) for v in ck["losses"])
    init = tiny_encoder(seed=0).state_dict()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, init[k])]
    assert len(changed) > 0.9 * len(init), f"only {len(changed)} of {len(init)} tensors changed"
    loaded = load_encoder(tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ValueError, match="other settings.*preset"):
        pretrain_encoder(EncoderTrainConfig(preset="small", steps=4, batch_size=4), tmp_path, progress=False)


def test_contrastive_loss_with_negative_images_matches_the_closed_form():
    """Symmetric InfoNCE by hand: two images, two prompts, one extra negative prompt (seen by the
    image-to-text direction only) and one extra negative image (seen by text-to-image only)."""
    from t2ialign.models.encoder import contrastive_loss

    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])  # two positives, one extra negative
    neg = torch.tensor([[0.8, -0.6]])
    s = 2.0
    scale = torch.tensor(math.log(s))

    def ce(logits, i):  # -log softmax(logits)[i]
        return -logits[i] + math.log(sum(math.exp(v) for v in logits))

    # image-to-text: image 0 against txt (1, 0.6, 0.8); image 1 against (0, 0.8, 0.6)
    i2t = (ce([s * 1.0, s * 0.6, s * 0.8], 0) + ce([0.0, s * 0.8, s * 0.6], 1)) / 2
    # text-to-image: prompt 0 against images (1, 0, 0.8); prompt 1 against (0.6, 0.8, 0.0)
    t2i = (ce([s * 1.0, 0.0, s * 0.8], 0) + ce([s * 0.6, s * 0.8, 0.0], 1)) / 2
    got = contrastive_loss(img, txt, scale, 2, neg)
    assert got.item() == pytest.approx(0.5 * (i2t + t2i), rel=1e-6)
    t2i_plain = (ce([s * 1.0, 0.0], 0) + ce([s * 0.6, s * 0.8], 1)) / 2
    assert contrastive_loss(img, txt, scale, 2).item() == pytest.approx(0.5 * (i2t + t2i_plain), rel=1e-6)


def test_near_miss_renders_and_training_with_them(tmp_path):
    """Near-miss renders come only for prompts with two objects of one colour, with probability p;
    a tiny encoder trains with them (finite loss) and the option is validated."""
    from t2ialign.models.encoder import near_miss_renders
    from t2ialign.world import parse

    specs = [parse("two red squares"), parse("a red circle"), parse("a red circle and a blue square")]
    x = near_miss_renders(specs, np.random.default_rng(0), 1.0, 32)
    assert x.shape == (1, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert near_miss_renders(specs, np.random.default_rng(0), 0.0, 32) is None
    cfg = EncoderTrainConfig(preset="tiny", steps=2, batch_size=16, checkpoint_every=2, near_miss=1.0)
    pretrain_encoder(cfg, tmp_path, progress=False)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 2 and all(math.isfinite(v) for v in ck["losses"])
    with pytest.raises(ValueError, match="near_miss must be in"):
        EncoderTrainConfig(near_miss=-0.1)


def test_hard_negatives_with_colour_swaps():
    from t2ialign.models.encoder import _hard_negatives
    from t2ialign.world import parse

    specs = [parse("a red circle and a blue square"), parse("two circles")]
    plain = _hard_negatives(specs, np.random.default_rng(0))
    both = _hard_negatives(specs, np.random.default_rng(0), swaps=True)
    assert len(plain) == 2 and both == plain + ["a blue circle and a red square"]
    with pytest.raises(ValueError, match="swap_negatives must be"):
        EncoderTrainConfig(swap_negatives="yes")


def test_tokenizer_names_unknown_words():
    tok = Tokenizer()
    ids, mask = tok(["two red circles", ""])
    assert ids.shape == (2, 3) and mask.sum() == 4  # the null prompt is one token
    with pytest.raises(PromptError, match="dragon"):
        tok(["a red dragon"])


# ---- save, load and errors -------------------------------------------------------------------------


@torch.no_grad()
def test_generator_round_trip(tmp_path):
    model = tiny_generator(seed=1)
    save_generator(model, tmp_path / "g", card={"name": "shapes-test"})
    loaded = load_generator(tmp_path / "g")
    assert loaded.model_id == model.model_id and loaded.model_id.startswith("shapes-test-")
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = ["a red circle", "three squares on a blue background"]
    for w in (1.0, 3.0):
        assert torch.equal(
            loaded.velocity(x, 0.5, loaded.encode(cond), guidance=w),
            model.velocity(x, 0.5, model.encode(cond), guidance=w),
        )
    assert not list((tmp_path / "g").glob("*.tmp"))  # atomic writes leave no temporaries


@torch.no_grad()
def test_encoder_round_trip(tmp_path):
    model = tiny_encoder(seed=2)
    save_encoder(model, tmp_path / "e")
    loaded = load_encoder(tmp_path / "e")
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "two squares", "a triangle on a black background"]
    assert torch.equal(loaded.image_features(images), model.image_features(images))
    assert torch.equal(loaded.encode_text(prompts), model.encode_text(prompts))
    assert torch.allclose(loaded.encode_image(images).norm(dim=-1), torch.ones(3))


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Broken generator folders and the words their error must hold (and, under "good", the tiny
    generator they were made from)."""
    root = tmp_path_factory.mktemp("bad")
    good = root / "good"
    save_generator(tiny_generator(), good)
    save_encoder(tiny_encoder(), root / "encoder")
    out: dict[str, tuple[Path, str]] = {
        "good": (good, ""),
        "missing folder": (root / "nowhere", "no such checkpoint folder"),
    }

    def variant(name: str) -> Path:
        shutil.copytree(good, root / name)
        return root / name

    (variant("no weights") / "model.safetensors").unlink()
    out["missing weights"] = (root / "no weights", "missing model.safetensors")
    (variant("no card") / "card.json").unlink()
    out["missing card"] = (root / "no card", "missing card.json")
    (variant("garbage") / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file" * 10)
    out["garbage weights"] = (root / "garbage", "corrupt or unreadable weights")
    w = variant("truncated") / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    out["truncated weights"] = (root / "truncated", "corrupt or unreadable weights")
    (variant("bad json") / "card.json").write_text('{"kind": "t2ialign-generator", ')
    out["card not JSON"] = (root / "bad json", "not valid JSON")
    out["wrong kind"] = (root / "encoder", "holds a 't2ialign-encoder', expected a 't2ialign-generator'")
    card_path = variant("mismatch") / "card.json"
    card = json.loads(card_path.read_text())
    card["config"]["unet"]["channels"] = [16, 32]  # the weights are the tiny preset's (8, 16)
    card_path.write_text(json.dumps(card))
    out["mismatched weights"] = (root / "mismatch", "weights do not fit the model")
    card_path = variant("no config") / "card.json"
    card_path.write_text(json.dumps({"kind": "t2ialign-generator"}))
    out["card without config"] = (root / "no config", "bad config")
    return out


CASES = [
    "missing folder",
    "missing weights",
    "missing card",
    "garbage weights",
    "truncated weights",
    "card not JSON",
    "wrong kind",
    "mismatched weights",
    "card without config",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoint_is_a_clear_error(bad_checkpoints, case, tmp_path, capsys):
    folder, words = bad_checkpoints[case]
    with pytest.raises(CheckpointError) as err:
        load_generator(folder)
    assert words in str(err.value) and str(folder) in str(err.value)
    assert "\n" not in str(err.value)
    # the same through the command line (in-process, the same ``main`` as ``python -m t2ialign``)
    prompts = tmp_path / "p.jsonl"
    write_prompts([{"prompt": "a red circle"}], prompts)
    capsys.readouterr()
    rc = main(["sample", "--prompts", str(prompts), "--model", str(folder), "--out", str(tmp_path / "o")])
    _user_error(rc, capsys.readouterr().err, words)


def test_encoder_load_errors(bad_checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="holds a 't2ialign-generator', expected a 't2ialign-encoder'"):
        load_encoder(bad_checkpoints["good"][0])
    enc = bad_checkpoints["wrong kind"][0]
    shutil.copytree(enc, tmp_path / "e")
    (tmp_path / "e" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="corrupt or unreadable weights"):
        load_encoder(tmp_path / "e")
    save_encoder(DualEncoder(encoder_preset("tiny")), tmp_path / "e2")
    card = json.loads((tmp_path / "e2" / "card.json").read_text())
    card["config"]["feature_dim"] = 64
    (tmp_path / "e2" / "card.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="weights do not fit the model"):
        load_encoder(tmp_path / "e2")


def test_cli_sample_bad_model_exits_2(bad_checkpoints, tmp_path):
    """The real entry point, in a subprocess: ``python -m t2ialign sample --model BADDIR``."""
    prompts = tmp_path / "p.jsonl"
    write_prompts([{"prompt": "a red circle"}], prompts)
    folder, words = bad_checkpoints["truncated weights"]
    p = subprocess.run(
        _cli("sample", "--prompts", str(prompts), "--model", str(folder), "--out", str(tmp_path / "o")),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    _user_error(p.returncode, p.stderr, words, str(folder))


def test_cli_sample_writes_an_image_folder(bad_checkpoints, tmp_path, capsys):
    model_dir = bad_checkpoints["good"][0]
    rows = suite("seen")[::40] + suite("unseen")[:1]
    write_prompts(rows, tmp_path / "p.jsonl")
    args = ["--prompts", str(tmp_path / "p.jsonl"), "--per-prompt", "2", "--steps", "2", "--seed", "5"]
    rc = main(["sample", *args, "--model", str(model_dir), "--out", str(tmp_path / "s")])
    assert rc == 0, capsys.readouterr().err
    manifest = read_manifest(tmp_path / "s")
    assert len(manifest) == 2 * len(rows)
    assert [m["seed"] for m in manifest] == list(range(5, 5 + len(manifest)))
    assert {m["split"] for m in manifest} == {"seen", "unseen"}
    assert manifest[0]["model"] == load_generator(model_dir).model_id
    assert evaluate_folder(tmp_path / "s", write=False)["n"] == len(manifest)


# ---- resume after SIGKILL --------------------------------------------------------------------------


RESUME_STEPS, RESUME_BATCH = 8, 4


def _resume_args(command: str) -> list[str]:
    args = [command, "--preset", "tiny", "--steps", str(RESUME_STEPS), "--batch-size", str(RESUME_BATCH)]
    args += ["--checkpoint-every", "2"]
    return args + (["--eval-images", "0"] if command == "pretrain-encoder" else [])


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory) -> dict[str, tuple[Path, int]]:
    """``python -m t2ialign pretrain`` and ``pretrain-encoder`` (both at once, to share the start-up
    time), each SIGKILLed as soon as its first checkpoint exists: command -> (folder, step)."""
    root = tmp_path_factory.mktemp("killed")
    procs = {}
    for command in ("pretrain", "pretrain-encoder"):
        out = root / command
        cmd = _cli(*_resume_args(command), "--out", str(out))
        procs[command] = (
            out,
            subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env()),
        )
    deadline = time.monotonic() + 180
    try:
        while any(p.returncode is None for _, p in procs.values()):
            for command, (out, p) in procs.items():
                if p.returncode is not None:
                    continue
                if (out / "checkpoint.pt").exists():
                    p.send_signal(signal.SIGKILL)
                    p.wait()
                elif p.poll() is not None:
                    raise AssertionError(f"{command} ended before its first checkpoint: {p.stderr.read()}")
            if time.monotonic() > deadline:
                raise AssertionError("no checkpoint within the timeout")
            time.sleep(0.005)
    finally:
        for _, p in procs.values():
            p.kill()
            p.wait()
            p.stderr.close()
    return {
        c: (out, torch.load(out / "checkpoint.pt", weights_only=False)["step"])
        for c, (out, _) in procs.items()
    }


@pytest.mark.parametrize("command", ["pretrain", "pretrain-encoder"])
def test_resume_after_sigkill_is_bit_identical(command, killed_runs, tmp_path, capsys):
    """A run killed with SIGKILL after a checkpoint and rerun ends with exactly the weights (and
    loss history) of an uninterrupted run: the data stream is a pure function of (seed, step).

    The rerun and the uninterrupted run go through the CLI's ``main`` in-process (one torch thread,
    like the killed subprocess) to save two interpreter start-ups each."""
    out, killed_at = killed_runs[command]
    assert 0 < killed_at < RESUME_STEPS, f"killed at step {killed_at}: the run was not interrupted"
    capsys.readouterr()
    assert main([*_resume_args(command), "--out", str(out)]) == 0
    assert f"resuming from step {killed_at}" in capsys.readouterr().err
    ref = tmp_path / "uninterrupted"
    assert main([*_resume_args(command), "--out", str(ref)]) == 0

    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ck_a = torch.load(ref / "checkpoint.pt", weights_only=False)
    ck_b = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck_a["step"] == ck_b["step"] == RESUME_STEPS
    assert ck_a["losses"] == ck_b["losses"]
    for k, v in ck_a["model"].items():
        assert torch.equal(v, ck_b["model"][k]), k
    assert json.loads((out / "card.json").read_text())["steps"] == RESUME_STEPS


# ---- the shipped checkpoints -----------------------------------------------------------------------


def test_shipped_checkpoints_fit_the_budget():
    total = sum(f.stat().st_size for f in CHECKPOINTS.rglob("*.safetensors"))
    assert 0 < total < 30e6
    for kind, folder in [("t2ialign-generator", "generator"), ("t2ialign-encoder", "encoder")]:
        card = json.loads((CHECKPOINTS / folder / "card.json").read_text())
        assert card["kind"] == kind
        for key in (
            "config",
            "training_command",
            "steps",
            "wall_time_s",
            "machine",
            "parameters",
            "measured",
        ):
            assert key in card, (folder, key)


@torch.no_grad()
def test_shipped_generator_draws_images():
    model = load_generator()
    assert model.model_id.startswith("shapes-small-")
    prompts = ["a red circle", "two blue squares on a white background"]
    images = generate_images(model, prompts, [0, 1], steps=4)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert images.reshape(2, -1, 3).std(axis=1).mean() > 10  # not a flat colour
    assert not np.array_equal(images[0], images[1])


@torch.no_grad()
def test_shipped_encoder_embeds_and_prefers_the_true_prompt():
    from t2ialign.world import parse

    enc = load_encoder()
    prompts = ["a red circle", "two blue squares", "a green triangle on a white background"]
    wrong = ["a blue circle", "four blue squares", "a green triangle on a black background"]
    images = np.stack([render(parse(p), seed=i) for i, p in enumerate(prompts)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    emb = enc.encode_image(x)
    assert emb.shape == (3, enc.config.embed_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert enc.image_features(x).shape == (3, enc.config.feature_dim)
    assert (enc.similarity(x, prompts) > enc.similarity(x, wrong)).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize(("device", "words"), [("cuda", "CUDA is not available"), ("gpu", "unknown device")])
def test_cli_bad_device_is_a_user_error(tmp_path, capsys, device, words):
    write_prompts([{"prompt": "a red circle"}], tmp_path / "p.jsonl")
    capsys.readouterr()
    prompts = str(tmp_path / "p.jsonl")
    rc = main(["sample", "--prompts", prompts, "--device", device, "--out", str(tmp_path / "o")])
    _user_error(rc, capsys.readouterr().err, words)
    rc = main(["finetune", "grpo", "--reward", "checker", "--device", device, "--out", str(tmp_path / "f")])
    _user_error(rc, capsys.readouterr().err, words)


def test_degrade_warps_blurs_and_noises_a_fraction_of_the_renders():
    """The encoder's optional training degradation: only the picked images change, they stay in
    [0, 1] with their mean colour nearly kept (a warp and a blur move pixels, they do not recolour),
    the same generator state gives the same result, and fraction 0 is the identity."""
    from t2ialign.models.encoder import degrade

    x = torch.zeros(6, 3, 32, 32)
    x[:, 0, 8:24, 8:24] = 1.0  # a red square on black
    assert degrade(x, np.random.default_rng(0), 0.0) is x
    y = degrade(x, np.random.default_rng(0), 1.0)
    assert torch.equal(y, degrade(x, np.random.default_rng(0), 1.0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert all(not torch.equal(x[i], y[i]) for i in range(6))
    assert torch.allclose(y.mean((2, 3)), x.mean((2, 3)), atol=0.03)
    half = degrade(x, np.random.default_rng(1), 0.5)
    changed = [not torch.equal(x[i], half[i]) for i in range(6)]
    assert any(changed) and not all(changed)
    with pytest.raises(ValueError, match="degrade must be in"):
        EncoderTrainConfig(degrade=1.5)
