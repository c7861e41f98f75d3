"""The web captioner: determinism, grammar, measured error rates, the exact preset, bad input, and the
web stream as every pre-training source's default."""

from __future__ import annotations

import hashlib
import inspect
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from t2ialign.models.pretrain import PretrainConfig, check_resumed_captions, world_batch
from t2ialign.world.captions import (
    EXACT,
    WEB,
    CaptionNoise,
    caption,
    caption_accuracy,
    caption_preset,
    caption_spec,
)
from t2ialign.world.grammar import parse, to_prompt
from t2ialign.world.scene import random_spec
from t2ialign.world.spec import ObjectSpec, Spec
from t2ialign.world.suites import colour_swap

SRC = Path(__file__).resolve().parents[1] / "src" / "t2ialign"


def _captions(noise: CaptionNoise, n: int, seed: int = 0) -> list[tuple[Spec, Spec]]:
    rng, crng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    specs = [random_spec(rng) for _ in range(n)]
    return [(s, caption_spec(s, noise, crng)) for s in specs]


def test_seeded_determinism():
    a = [caption(s, WEB, np.random.default_rng(5)) for s, _ in _captions(EXACT, 200)]
    b = [caption(s, WEB, np.random.default_rng(5)) for s, _ in _captions(EXACT, 200)]
    assert a == b
    x1, p1, _ = world_batch(4, 2, 32, captions=WEB)
    x2, p2, _ = world_batch(4, 2, 32, captions=WEB)
    assert p1 == p2 and bool((x1 == x2).all())


def test_every_web_caption_of_20000_parses():
    pairs = _captions(WEB, 20000, seed=1)
    wrong = 0
    for true, cap in pairs:
        text = to_prompt(cap)
        assert parse(text) == cap, text
        wrong += cap != true
    assert 0.3 < wrong / len(pairs) < 0.7  # the web preset does change a good share of captions


def _balanced(task_specs: list[Spec], noise: CaptionNoise, reps: int) -> dict:
    crng = np.random.default_rng(123)
    return caption_accuracy([(s, caption_spec(s, noise, crng)) for s in task_specs * reps])


@pytest.mark.parametrize("noise", [WEB, EXACT], ids=["web", "exact"])
def test_measured_error_rates_match_the_config_within_one_point(noise):
    """Each rate measured on 20,000 captions of scenes that state the attribute."""
    n = 20000
    rng = np.random.default_rng(7)
    single = {k: [Spec((ObjectSpec("circle", k, "red"),))] for k in range(1, 5)}
    got = {f"count_{k}": _balanced(single[k], noise, n)[f"count_{k}"]["accuracy"] for k in single}
    got["color"] = _balanced([random_spec(rng, "colors") for _ in range(50)], noise, n // 50)["color"]
    two = [random_spec(rng, "color_attr") for _ in range(50)]
    acc = _balanced(two, noise, n // 50)
    got["color_binding"], got["shape"] = acc["color_binding"], acc["shape"]
    pos = [random_spec(rng, "position") for _ in range(50)]
    got["position"] = _balanced(pos, noise, n // 50)["position"]
    bg = [random_spec(rng, "background") for _ in range(50)]
    got["background"] = _balanced(bg, noise, n // 50)["background"]
    want = noise.configured_accuracy()
    assert set(want) <= set(got)
    for attr, w in want.items():
        g = got[attr]["accuracy"] if isinstance(got[attr], dict) else got[attr]
        assert abs(g - w) <= 0.01, (attr, g, w)


def test_web_counts_are_wrong_more_often_for_larger_counts_and_shapes_rarely():
    assert list(WEB.count_wrong) == sorted(WEB.count_wrong)
    assert WEB.shape_wrong < WEB.color_wrong < WEB.background_wrong < WEB.relation_wrong + WEB.relation_mirror


def _true_given_caption(specs: list[Spec], noise: CaptionNoise, key, reps: int = 4000) -> dict:
    """For captions of a balanced set of scenes: how often each true value lies behind each stated
    value of ``key(spec)`` (caption value -> true value -> count)."""
    crng = np.random.default_rng(11)
    table: dict = {}
    for s in specs * reps:
        c = caption_spec(s, noise, crng)
        row = table.setdefault(key(c), {})
        row[key(s)] = row.get(key(s), 0) + 1
    return table


def test_web_errors_are_biased_so_that_guidance_does_not_undo_them():
    """The biased errors of WEB: the true scene is *not* the most frequent behind these captions, so a
    model that follows the caption's likelihood draws the wrong scene (the module docstring)."""
    counts = _true_given_caption(
        [Spec((ObjectSpec("circle", n, "red"),)) for n in range(1, 5)], WEB, lambda s: s.objects[0].count
    )
    for stated in (3, 4):
        assert max(counts[stated], key=counts[stated].get) != stated, counts[stated]
    for stated in (1, 2):  # one and two objects are still captioned truly most often
        assert max(counts[stated], key=counts[stated].get) == stated, counts[stated]
    pair = Spec((ObjectSpec("circle", 1, "red"), ObjectSpec("square", 1, "blue")))
    binding = _true_given_caption([pair, colour_swap(pair)], WEB, lambda s: s.objects[0].color)
    assert binding["red"]["blue"] > binding["red"]["red"]
    rel = _true_given_caption(
        [Spec(pair.objects, relation=r) for r in ("left of", "right of", "above", "below")],
        WEB,
        lambda s: s.relation,
    )
    assert max(rel["left of"], key=rel["left of"].get) == "right of"
    assert max(rel["above"], key=rel["above"].get) == "below"
    # the symmetric errors keep the truth the most frequent
    bgs = _true_given_caption(
        [Spec((ObjectSpec("circle"),), background=b) for b in ("black", "white", "gray", "brown")],
        WEB,
        lambda s: s.background,
    )
    assert all(max(row, key=row.get) == b for b, row in bgs.items())


def test_exact_reproduces_the_captions_of_the_stream_before_the_captioner():
    """Hashes of world_batch's images and prompts, computed with the code before the captioner."""
    golden = {(0, 5, 16, 32, 0.1): "6860e5845916f3b4", (3, 0, 32, 32, 0.0): "b8891246575f7cce"}
    for args, h in golden.items():
        for captions in (None, EXACT):
            x, prompts, _ = world_batch(*args, captions=captions)
            digest = hashlib.sha256(x.numpy().tobytes() + "|".join(prompts).encode()).hexdigest()[:16]
            assert digest == h, (args, captions)
        # the web stream of a seed shows the same scenes; only captions differ
        xw, pw, sw = world_batch(*args, captions=WEB)
        x, p, s = world_batch(*args)
        assert bool((xw == x).all()) and sw == s and pw != p
    for true, cap in _captions(EXACT, 500):
        assert cap == true


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="unknown caption preset 'laion'.*exact, web"):
        caption_preset("laion")
    with pytest.raises(ValueError, match="color_wrong"):
        CaptionNoise(color_wrong=1.5)
    with pytest.raises(ValueError, match="relation_wrong"):
        replace(WEB, relation_wrong=-0.1)
    with pytest.raises(ValueError, match="count_wrong"):
        CaptionNoise(count_wrong=(0.1, 0.2))
    with pytest.raises(ValueError, match="count_up"):
        replace(WEB, count_up=1.2)
    with pytest.raises(ValueError, match="relation_mirror \\+ relation_wrong must be at most 1"):
        replace(WEB, relation_mirror=0.6, relation_wrong=0.5)
    with pytest.raises(ValueError, match="count_wrong"):
        CaptionNoise(count_wrong=(0.1, 0.2, 0.3, 2.0))
    with pytest.raises(ValueError, match="unknown caption preset"):
        PretrainConfig(captions="noisy")
    assert CaptionNoise.from_dict(WEB.to_dict()) == WEB
    with pytest.raises(ValueError, match="unknown caption noise fields"):
        CaptionNoise.from_dict({"colour_wrong": 0.1})


def test_resuming_with_other_captions_is_refused(tmp_path):
    with pytest.raises(ValueError, match="trained on 'exact' captions and this run asks for 'web'"):
        check_resumed_captions({"captions": "exact"}, "web", tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="trained on 'exact' captions"):  # runs before the captioner
        check_resumed_captions({"steps": 10}, "web", tmp_path / "checkpoint.pt")
    check_resumed_captions({"captions": "web"}, "web", tmp_path / "checkpoint.pt")
    check_resumed_captions({"captions": "web"}, "web", tmp_path / "checkpoint.pt", WEB.to_dict())
    old = {**WEB.to_dict(), "color_swap": 0.45}  # the web preset's rates changed since
    with pytest.raises(ValueError, match="other rates than the preset has today.*color_swap"):
        check_resumed_captions({"captions": "web"}, "web", tmp_path / "checkpoint.pt", old)


def test_generator_resume_refuses_other_captions(tmp_path):
    from t2ialign.models.pretrain import pretrain

    cfg = PretrainConfig(preset="tiny", steps=1, batch_size=2, checkpoint_every=1, captions="exact")
    pretrain(cfg, tmp_path, progress=False)
    with pytest.raises(ValueError, match="--captions exact"):
        pretrain(replace(cfg, steps=2, captions="web"), tmp_path, progress=False)


def test_generator_resume_refuses_a_run_of_the_presets_old_rates(tmp_path):
    """A checkpoint from before the rates were saved in it: the rates of its folder's card decide."""
    import json

    from t2ialign.models.pretrain import pretrain

    cfg = PretrainConfig(preset="tiny", steps=1, batch_size=2, checkpoint_every=1, captions="web")
    pretrain(cfg, tmp_path, progress=False)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    del ck["caption_noise"]
    torch.save(ck, tmp_path / "checkpoint.pt")
    card = json.loads((tmp_path / "card.json").read_text())
    card["captions"]["noise"] = {**WEB.to_dict(), "color_swap": 0.45, "relation_mirror": 0.0}
    (tmp_path / "card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="other rates than the preset has today"):
        pretrain(replace(cfg, steps=2), tmp_path, progress=False)


def test_encoder_resume_refuses_other_captions(tmp_path):
    from t2ialign.models.encoder import EncoderTrainConfig, pretrain_encoder

    cfg = EncoderTrainConfig(preset="tiny", steps=1, batch_size=4, checkpoint_every=1, captions="web")
    pretrain_encoder(cfg, tmp_path, progress=False)
    with pytest.raises(ValueError, match="trained on 'web' captions and this run asks for 'exact'"):
        pretrain_encoder(replace(cfg, steps=2, captions="exact"), tmp_path, progress=False)


def test_pretraining_defaults_are_web():
    from t2ialign.models.encoder import EncoderTrainConfig

    assert PretrainConfig().captions == "web"
    assert EncoderTrainConfig().captions == "web"


def test_no_fine_tuning_method_defaults_to_exact_pretraining_captions():
    """The pre-training term of every fine-tuning method (RWR's beta term, RAFT's, NFT's, ...) is fed
    by ``world_pretrain_source``: its default is the web stream, and no caller in the library, the
    CLI or the demo asks for exact captions."""
    from t2ialign.pipeline import world_pretrain_source

    assert inspect.signature(world_pretrain_source).parameters["captions"].default is WEB
    source = world_pretrain_source(seed=3, cond_dropout=0.0)
    _, prompts = source(0, 64)
    _, truth, _ = world_batch(3, 0, 64)
    assert prompts != truth
    calls = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"world_pretrain_source\(([^)]*)\)", text):
            calls.append((path.name, m.group(1)))
            assert "EXACT" not in m.group(1) and "exact" not in m.group(1), (path, m.group(1))
    assert {name for name, _ in calls} >= {"demo.py", "finetune.py"}
    # the trainers themselves never build a source: they take the one they are given
    for path in (SRC / "algorithms").glob("*.py"):
        assert "world_batch" not in path.read_text(), path


def test_pretrain_snapshots_and_card_name_the_captions(tmp_path):
    import json

    from t2ialign.models import load_generator
    from t2ialign.models.pretrain import pretrain

    cfg = PretrainConfig(preset="tiny", steps=4, batch_size=2, checkpoint_every=2)
    with pytest.raises(ValueError, match="multiples of checkpoint_every"):
        pretrain(cfg, tmp_path / "bad", progress=False, snapshots=(3,))
    pretrain(cfg, tmp_path, progress=False, snapshots=(2, 4))
    cards = {n: json.loads((tmp_path / f"step{n}" / "card.json").read_text()) for n in (2, 4)}
    assert [cards[n]["steps"] for n in (2, 4)] == [2, 4]
    assert cards[4]["captions"] == {"preset": "web", "noise": WEB.to_dict()}
    final, snap = load_generator(tmp_path), load_generator(tmp_path / "step4")
    for a, b in zip(final.state_dict().values(), snap.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_world_captions_command(tmp_path, capsys):
    import json

    from t2ialign.cli.main import main

    out = tmp_path / "web.jsonl"
    assert main(["world", "captions", "--noise", "web", "--n", "300", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "caption precision" in printed and "color_binding" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 300 and any(r["caption"] != r["prompt"] for r in rows)
    for r in rows:
        assert parse(r["caption"]) == Spec.from_dict(r["caption_spec"])
        assert parse(r["prompt"]) == Spec.from_dict(r["spec"])
    assert main(["world", "captions", "--noise", "exact", "--n", "50", "--out", str(out)]) == 0
    assert all(
        json.loads(line)["caption"] == json.loads(line)["prompt"] for line in out.read_text().splitlines()
    )
