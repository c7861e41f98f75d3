"""Concrete scenes and their deterministic renderer.

A :class:`Scene` is what one image shows: a background and a list of placed objects, in
resolution-free coordinates (``cx``, ``cy``, ``half`` in [0, 1] of the image side). ``sample_scene``
draws a scene that satisfies a :class:`~t2ialign.world.spec.Spec` from a seed; ``render`` rasterises it
with hard edges at any resolution (32 by default, 64 supported). Objects never overlap or touch:
their bounding boxes keep a gap of at least ``MIN_GAP`` of the image side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from t2ialign.world.spec import ObjectSpec, Spec
from t2ialign.world.vocab import BACKGROUNDS, COLORS, MAX_COUNT, RELATIONS, SHAPES

HALF_RANGE = (4.5 / 32, 6.0 / 32)  # object half-size, as a fraction of the image side
MIN_GAP = 2.0 / 32  # gap between object bounding boxes
RELATION_MARGIN = 3.0 / 32  # rendered relations hold with this margin
_MAX_TRIES = 2000


@dataclass(frozen=True)
class PlacedObject:
    shape: str
    color: str
    cx: float
    cy: float
    half: float

    def box(self) -> tuple[float, float, float, float]:
        return (self.cx - self.half, self.cy - self.half, self.cx + self.half, self.cy + self.half)


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[PlacedObject, ...]


def _boxes_clear(a: PlacedObject, b: PlacedObject) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return ax1 + MIN_GAP <= bx0 or bx1 + MIN_GAP <= ax0 or ay1 + MIN_GAP <= by0 or by1 + MIN_GAP <= ay0


def relation_holds(
    a: PlacedObject | tuple[float, float],
    b: PlacedObject | tuple[float, float],
    relation: str,
    margin: float = 0.0,
) -> bool:
    """Whether ``a`` stands in ``relation`` to ``b`` (image y grows downwards).

    "left of": ``a`` is left of ``b`` and the horizontal offset exceeds the vertical one by more
    than ``margin``; likewise for the others. The renderer (with a margin, so that its scenes are
    unambiguous) and the checker (without) share this definition.
    """
    ax, ay = (a.cx, a.cy) if isinstance(a, PlacedObject) else a
    bx, by = (b.cx, b.cy) if isinstance(b, PlacedObject) else b
    dx, dy = bx - ax, by - ay
    if relation == "left of":
        return dx > abs(dy) + margin
    if relation == "right of":
        return -dx > abs(dy) + margin
    if relation == "above":
        return dy > abs(dx) + margin
    if relation == "below":
        return -dy > abs(dx) + margin
    raise ValueError(f"unknown relation {relation!r}; known: {', '.join(RELATIONS)}")


def sample_scene(spec: Spec, seed: int | np.random.Generator) -> Scene:
    """A scene that satisfies ``spec``, drawn deterministically from ``seed``."""
    rng = np.random.default_rng(seed)
    background = spec.background or str(rng.choice(list(BACKGROUNDS)))
    wanted: list[tuple[str, str]] = []
    for o in spec.objects:
        for _ in range(o.count):
            wanted.append((o.shape, o.color or str(rng.choice(list(COLORS)))))
    for _ in range(_MAX_TRIES):
        placed: list[PlacedObject] = []
        for shape, color in wanted:
            half = float(rng.uniform(*HALF_RANGE))
            ok = False
            for _ in range(50):
                cx, cy = (float(v) for v in rng.uniform(half + 0.5 / 32, 1 - half - 0.5 / 32, size=2))
                cand = PlacedObject(shape, color, cx, cy, half)
                if all(_boxes_clear(cand, p) for p in placed):
                    placed.append(cand)
                    ok = True
                    break
            if not ok:
                break
        if len(placed) != len(wanted):
            continue
        if spec.relation and not relation_holds(placed[0], placed[1], spec.relation, RELATION_MARGIN):
            continue
        return Scene(background=background, objects=tuple(placed))
    raise RuntimeError(f"could not place the objects of {spec} after {_MAX_TRIES} tries")


def render_scene(scene: Scene, size: int = 32) -> np.ndarray:
    """Rasterise ``scene`` to an RGB ``uint8`` array of shape (size, size, 3), hard edges."""
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    c = (np.arange(size) + 0.5) / size
    y, x = np.meshgrid(c, c, indexing="ij")  # (H, W)
    for o in scene.objects:
        dx, dy = x - o.cx, y - o.cy
        if o.shape == "circle":
            inside = dx**2 + dy**2 <= o.half**2
        elif o.shape == "square":
            inside = (np.abs(dx) <= o.half) & (np.abs(dy) <= o.half)
        elif o.shape == "triangle":  # apex up, base down, height = width = 2 * half
            inside = (dy >= -o.half) & (dy <= o.half) & (np.abs(dx) <= (dy + o.half) / 2)
        else:
            raise ValueError(f"unknown shape {o.shape!r}; known: {', '.join(SHAPES)}")
        img[inside] = COLORS[o.color]
    return img


def touching_scene(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """A near miss of ``scene``: one object moved so that it touches or overlaps another object of
    its colour, which a small generator often draws and which then reads as one region of that
    colour (a wrong count and a wrong shape). The moved object sits beside its partner on a random
    side, the two boxes overlapping by one pixel (of 32) to half the smaller object and their centres
    offset sideways by at most a quarter of the smaller object's size, inside the image. None when no
    two objects share a colour or no such move fits."""
    objs = list(scene.objects)
    pairs = [
        (i, j)
        for i in range(len(objs))
        for j in range(len(objs))
        if i != j and objs[i].color == objs[j].color
    ]
    if not pairs:
        return None
    for _ in range(20):
        i, j = pairs[int(rng.integers(len(pairs)))]
        a, b = objs[i], objs[j]
        side = int(rng.integers(4))  # 0: right of a, 1: left, 2: below, 3: above
        small = min(a.half, b.half)
        reach = a.half + b.half - float(rng.uniform(1.0 / 32, small))
        along = float(rng.uniform(-small / 2, small / 2))
        dx, dy = [(reach, along), (-reach, along), (along, reach), (along, -reach)][side]
        cx, cy = a.cx + dx, a.cy + dy
        if b.half <= cx <= 1 - b.half and b.half <= cy <= 1 - b.half:
            moved = PlacedObject(b.shape, b.color, cx, cy, b.half)
            objs[j] = moved
            return Scene(background=scene.background, objects=tuple(objs))
    return None


def render(spec: Spec, seed: int, size: int = 32) -> np.ndarray:
    """Render a seeded scene for ``spec``: ``render_scene(sample_scene(spec, seed), size)``."""
    return render_scene(sample_scene(spec, seed), size)


def random_spec(rng: np.random.Generator, task: str | None = None) -> Spec:
    """A random spec of ``task`` (uniform over tasks when ``None``): the pre-training distribution."""
    from t2ialign.world.vocab import TASKS

    shapes, colors, bgs = list(SHAPES), list(COLORS), list(BACKGROUNDS)
    task = task or str(rng.choice(TASKS))

    def pick(xs):
        return str(rng.choice(xs))

    if task == "single_object":
        return Spec((ObjectSpec(pick(shapes)),))
    if task == "counting":
        return Spec((ObjectSpec(pick(shapes), int(rng.integers(2, MAX_COUNT + 1))),))
    if task == "colors":
        return Spec((ObjectSpec(pick(shapes), 1, pick(colors)),))
    if task == "background":
        return Spec((ObjectSpec(pick(shapes)),), background=pick(bgs))
    if task == "combination":
        count = int(rng.integers(1, MAX_COUNT + 1))
        color = pick(colors) if rng.random() < 0.8 or count == 1 else None
        bg = pick(bgs) if rng.random() < 0.8 or color is None or count == 1 else None
        spec = Spec((ObjectSpec(pick(shapes), count, color),), background=bg)
        return spec if spec.task == "combination" else random_spec(rng, task)
    if task in ("two_object", "color_attr", "position"):
        s1, s2 = rng.choice(shapes, size=2, replace=task == "color_attr")
        c1, c2 = rng.choice(colors, size=2, replace=False) if task != "two_object" else (None, None)
        rel = pick(list(RELATIONS)) if task == "position" else None
        a = ObjectSpec(str(s1), 1, None if c1 is None else str(c1))
        b = ObjectSpec(str(s2), 1, None if c2 is None else str(c2))
        return Spec((a, b), relation=rel)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
