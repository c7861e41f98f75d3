"""ShapesEval: its three figures on small samples, image formats, reasons and image loading."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from t2ialign.world import BACKGROUNDS, check, detect, parse, perturbations, random_spec, render, to_prompt
from t2ialign.world.imagefolder import ManifestError, load_image, save_image

N = 400


def _wrong(spec, rng):
    """A one-attribute perturbation of ``spec``: the attribute uniformly among those it has."""
    by_attr: dict[str, list] = {}
    for attr, p in perturbations(spec):
        by_attr.setdefault(attr, []).append(p)
    attr = sorted(by_attr)[int(rng.integers(len(by_attr)))]
    return attr, by_attr[attr][int(rng.integers(len(by_attr[attr])))]


def test_true_renders_are_accepted():
    rng = np.random.default_rng(10)
    failures = []
    for i in range(N):
        spec = random_spec(rng)
        res = check(render(spec, seed=i), spec)
        assert res.task == spec.task
        if not res.correct:
            failures.append((to_prompt(spec), res.reasons))
    assert 1 - len(failures) / N >= 0.99, failures


def test_one_attribute_wrong_renders_are_rejected():
    rng = np.random.default_rng(11)
    accepted = []
    attrs = Counter()
    for i in range(N):
        spec = random_spec(rng)
        attr, wrong = _wrong(spec, rng)
        attrs[attr] += 1
        res = check(render(wrong, seed=i), to_prompt(spec))  # checked against the original prompt
        if res.correct:
            accepted.append((attr, to_prompt(wrong), to_prompt(spec)))
        else:  # the changed attribute is the one (or among those) flagged
            assert res.ok.get(attr) is False, (attr, to_prompt(wrong), to_prompt(spec), res.ok)
    assert set(attrs) == {"count", "color", "shape", "background", "position"}
    assert len(accepted) / N <= 0.02, accepted


def test_noisy_renders_are_accepted():
    rng = np.random.default_rng(12)
    failures = []
    for i in range(N):
        spec = random_spec(rng)
        img = render(spec, seed=i).astype(np.float32) / 255.0
        img = np.clip(img + rng.normal(0.0, 0.05, img.shape), 0.0, 1.0)
        res = check(img, spec)
        if not res.correct:
            failures.append((to_prompt(spec), res.reasons))
    assert 1 - len(failures) / N >= 0.97, failures


def test_reasons_name_the_wrong_attribute():
    spec = parse("two blue circles on a black background")
    img = render(spec, 0)
    res = check(img, spec)
    assert res.correct and res.task == "combination"
    assert set(res.ok) == {"count", "shape", "color", "background"}

    cases = {
        "count": "three blue circles on a black background",
        "color": "two red circles on a black background",
        "shape": "two blue squares on a black background",
        "background": "two blue circles on a white background",
    }
    for attr, prompt in cases.items():
        res = check(img, prompt)
        assert not res.correct
        assert res.ok[attr] is False, (attr, res.ok)
        assert res.reasons[attr]

    spec = parse("a red circle left of a blue square")
    img = render(spec, 0)
    assert check(img, spec).correct
    res = check(img, "a red circle right of a blue square")
    assert not res.correct and res.ok == {"count": True, "shape": True, "color": True, "position": False}
    assert "right of" in res.reasons["position"]


def test_detect_finds_the_scene():
    spec = parse("a yellow triangle and a purple square on a brown background")
    det = detect(render(spec, 4))
    assert det.background == "brown"
    assert sorted((o.color, o.shape) for o in det.objects) == [("purple", "square"), ("yellow", "triangle")]


@pytest.mark.parametrize("size", [32, 64])
def test_image_formats(size):
    spec = parse("a red circle below a green triangle on a white background")
    img = render(spec, 1, size)
    as_float = img.astype(np.float32) / 255.0
    chw = torch.from_numpy(as_float).permute(2, 0, 1)
    variants = {
        "uint8 HWC": img,
        "float32 HWC": as_float,
        "float64 HWC": as_float.astype(np.float64),
        "torch float CHW": chw,
        "torch float CHW, requires grad": chw.clone().requires_grad_(True),
        "torch uint8 CHW": torch.from_numpy(img).permute(2, 0, 1),
        "torch bfloat16 CHW": chw.to(torch.bfloat16),
        "nested list of floats": as_float.tolist(),
    }
    for name, image in variants.items():
        res = check(image, spec)
        assert res.correct, (name, res.reasons)
    # all variants see the same scene
    dets = [detect(v) for v in variants.values()]
    assert all(d == dets[0] for d in dets)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((32, 32), dtype=np.uint8),
        np.zeros((32, 32, 4), dtype=np.uint8),
        np.zeros((3, 32, 32), dtype=np.uint8),  # CHW numpy: only torch tensors are CHW
        np.zeros((1, 32, 32, 3), dtype=np.uint8),
        torch.zeros(32, 32, 3),  # HWC torch
        torch.zeros(1, 3, 32, 32),
    ],
)
def test_wrong_shaped_image_is_a_clear_error(image):
    with pytest.raises(ValueError, match=r"shape"):
        check(image, "a circle")


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((32, 32, 3), dtype=np.int64),
        np.zeros((32, 32, 3), dtype=bool),
        np.zeros((32, 32, 3), dtype=np.uint16),
        np.zeros((32, 32, 3), dtype=np.uint8).tolist(),  # nested lists of ints are int64
        torch.zeros(3, 32, 32, dtype=torch.int64),
    ],
)
def test_integer_images_other_than_uint8_are_a_clear_error(image):
    with pytest.raises(ValueError, match=r"uint8 \(0-255\) or float in \[0, 1\], got dtype"):
        check(image, "a circle")


def test_empty_image_counts_no_objects():
    res = check(np.full((32, 32, 3), BACKGROUNDS["gray"], dtype=np.uint8), "a circle on a gray background")
    assert not res.correct
    assert res.ok == {"count": False, "shape": False, "background": True}
    assert res.reasons["count"] == "0 objects found, 1 wanted"


def test_spec_dict_and_prompt_agree():
    spec = parse("three orange squares")
    img = render(spec, 2)
    assert check(img, spec).correct
    assert check(img, spec.to_dict()).correct
    assert check(img, "three orange squares").correct


# --- image loading ------------------------------------------------------------------------------


def test_load_image_converts_grey_rgba_and_palette(tmp_path):
    img = render(parse("a blue square on a white background"), 0)
    save_image(img, tmp_path / "rgb.png")
    assert np.array_equal(load_image(tmp_path / "rgb.png", size=32), img)

    Image.fromarray(img).convert("L").save(tmp_path / "grey.png")
    grey = load_image(tmp_path / "grey.png")
    assert grey.shape == (32, 32, 3) and grey.dtype == np.uint8
    assert np.array_equal(grey[..., 0], grey[..., 1])

    rgba = np.dstack([img, np.full((32, 32), 255, dtype=np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(load_image(tmp_path / "rgba.png"), img)

    transparent = rgba.copy()
    transparent[..., 3] = 0
    Image.fromarray(transparent, mode="RGBA").save(tmp_path / "clear.png")
    assert not load_image(tmp_path / "clear.png").any()  # composited on black

    Image.fromarray(img).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(tmp_path / "pal.png")
    pal = load_image(tmp_path / "pal.png")
    assert pal.shape == (32, 32, 3)
    assert check(pal, "a blue square on a white background").correct


def test_load_image_size_mismatch_and_unreadable(tmp_path):
    save_image(render(parse("a circle"), 0, 64), tmp_path / "big.png")
    with pytest.raises(ManifestError, match=r"big\.png: image is 64x64, expected 32x32"):
        load_image(tmp_path / "big.png", size=32)
    assert load_image(tmp_path / "big.png", size=64).shape == (64, 64, 3)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ManifestError, match=r"junk\.png: cannot read image"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(ManifestError, match=r"missing\.png: cannot read image"):
        load_image(tmp_path / "missing.png")
