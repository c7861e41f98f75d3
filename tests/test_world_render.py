"""The deterministic renderer: seeds, sizes, palette, placement (no overlap, no touching)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from t2ialign.world import (
    BACKGROUNDS,
    COLORS,
    TASKS,
    ObjectSpec,
    Scene,
    Spec,
    parse,
    random_spec,
    render,
    render_scene,
    sample_scene,
)
from t2ialign.world.scene import RELATION_MARGIN, relation_holds

_PALETTE = {tuple(c) for c in COLORS.values()} | {tuple(c) for c in BACKGROUNDS.values()}


def _colours(img: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in c) for c in np.unique(img.reshape(-1, 3), axis=0)}


def _object_masks(scene: Scene, size: int) -> list[np.ndarray]:
    """The pixels of each object, rendered alone on the scene's background."""
    masks = []
    for o in scene.objects:
        img = render_scene(Scene(scene.background, (o,)), size)
        masks.append((img != np.array(BACKGROUNDS[scene.background], dtype=np.uint8)).any(axis=-1))
    return masks


def test_same_seed_same_pixels():
    rng = np.random.default_rng(0)
    for _ in range(40):
        spec = random_spec(rng)
        a, b = render(spec, seed=7), render(spec, seed=7)
        assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
        assert np.array_equal(a, b)
        assert sample_scene(spec, 7) == sample_scene(spec, 7)


def test_different_seed_different_pixels():
    rng = np.random.default_rng(1)
    for _ in range(40):
        spec = random_spec(rng)
        assert not np.array_equal(render(spec, seed=0), render(spec, seed=1)), spec


@pytest.mark.parametrize("size", [32, 64])
def test_sizes_and_palette(size):
    rng = np.random.default_rng(2)
    for i in range(60):
        spec = random_spec(rng)
        img = render(spec, seed=i, size=size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        colours = _colours(img)
        assert colours <= _PALETTE  # hard edges: no blended colours
        scene = sample_scene(spec, i)
        assert tuple(BACKGROUNDS[scene.background]) in colours
        assert {tuple(COLORS[o.color]) for o in scene.objects} <= colours
        # the background covers more pixels than any object colour
        values, counts = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
        assert tuple(int(v) for v in values[counts.argmax()]) == BACKGROUNDS[scene.background]
        if spec.background:
            assert scene.background == spec.background


def test_sizes_show_the_same_scene():
    spec = parse("a red circle left of a blue square on a gray background")
    small, large = render(spec, 3, 32), render(spec, 3, 64)
    assert _colours(small) == _colours(large)
    # the 64 px image, averaged down 2x2, agrees with the 32 px one on most pixels
    down = large.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    assert (np.abs(down - small).max(axis=-1) < 1).mean() > 0.9


def test_too_small_size_is_an_error():
    with pytest.raises(ValueError, match="at least 16"):
        render(parse("a circle"), 0, size=8)


@pytest.mark.parametrize("size", [32, 64])
def test_objects_never_overlap_or_touch(size):
    """Each object's rendered mask, grown by one pixel (8-neighbourhood), misses every other one:
    at least one background pixel separates any two objects, diagonally included."""
    rng = np.random.default_rng(3)
    grow = np.ones((3, 3), dtype=bool)
    n_pairs = 0
    for i in range(150):
        # mostly crowded scenes: four objects
        task = "counting" if i % 2 else None
        spec = random_spec(rng, task)
        scene = sample_scene(spec, i)
        masks = _object_masks(scene, size)
        for m in masks:
            assert m.any()
        for a in range(len(masks)):
            grown = ndimage.binary_dilation(masks[a], structure=grow)
            for b in range(a + 1, len(masks)):
                assert not (grown & masks[b]).any(), (spec, i, a, b)
                n_pairs += 1
    assert n_pairs > 200


def test_full_scenes_have_one_component_per_object():
    """Crowded scenes of one colour still split into one 8-connected region per object."""
    for seed in range(30):
        spec = Spec((ObjectSpec("circle", 2, "red"), ObjectSpec("square", 2, "red")))
        img = render(spec, seed)
        mask = (img == np.array(COLORS["red"], dtype=np.uint8)).all(axis=-1)
        _, n = ndimage.label(mask, structure=np.ones((3, 3)))
        assert n == 4


@pytest.mark.parametrize("relation", ["left of", "right of", "above", "below"])
def test_relations_hold_with_margin(relation):
    spec = parse(f"a red circle {relation} a blue square")
    for seed in range(25):
        a, b = sample_scene(spec, seed).objects
        assert (a.color, a.shape, b.color, b.shape) == ("red", "circle", "blue", "square")
        assert relation_holds(a, b, relation, RELATION_MARGIN)


@pytest.mark.parametrize("task", TASKS)
def test_scenes_satisfy_their_spec(task):
    rng = np.random.default_rng(4)
    for i in range(20):
        spec = random_spec(rng, task)
        scene = sample_scene(spec, i)
        assert len(scene.objects) == spec.n_objects
        placed = list(scene.objects)
        for group in spec.objects:
            for _ in range(group.count):
                o = placed.pop(0)
                assert o.shape == group.shape
                assert group.color is None or o.color == group.color
        for o in scene.objects:  # inside the image
            x0, y0, x1, y1 = o.box()
            assert 0 < x0 < x1 < 1 and 0 < y0 < y1 < 1


def test_sample_scene_accepts_a_generator():
    spec = parse("three circles")
    a = sample_scene(spec, np.random.default_rng(5))
    b = sample_scene(spec, np.random.default_rng(5))
    assert a == b


def test_touching_scene_fuses_two_objects_of_one_colour():
    """The encoder's near-miss negatives: one object moved onto a partner of its colour, so the two
    make one 8-connected region and the checker rejects the image for its prompt; only that object
    moves, it stays inside the image, and scenes with no two objects of one colour give None."""
    from t2ialign.world import check
    from t2ialign.world.scene import touching_scene

    spec = parse("three red squares")
    for seed in range(30):
        scene = sample_scene(spec, seed)
        near = touching_scene(scene, np.random.default_rng(seed))
        assert near is not None and near.background == scene.background
        moved = [a for a, b in zip(scene.objects, near.objects, strict=True) if a != b]
        assert len(moved) == 1
        assert all(o.half <= o.cx <= 1 - o.half and o.half <= o.cy <= 1 - o.half for o in near.objects)
        img = render_scene(near)
        mask = (img == np.array(COLORS["red"], dtype=np.uint8)).all(axis=-1)
        _, n = ndimage.label(mask, structure=np.ones((3, 3)))
        assert n < 3, seed
        assert not check(img, spec).correct
    two_colours = sample_scene(parse("a red circle and a blue square"), 0)
    assert touching_scene(two_colours, np.random.default_rng(0)) is None
    assert touching_scene(sample_scene(parse("a red circle"), 0), np.random.default_rng(0)) is None
