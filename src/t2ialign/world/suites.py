"""Prompt suites (seen / unseen) and one-attribute perturbations.

**Held out.** The unseen suite holds every prompt that pairs a colour with a shape in
``UNSEEN_COLOR_SHAPE`` (every prompt about orange triangles or purple squares) or a count with a
colour in ``UNSEEN_COUNT_COLOR`` (three green ..., four blue ...). No such prompt is in the seen
suite, so feedback, reward training and fine-tuning on the seen suite never see them, as the seed
paper held out objects. The base generator is pre-trained on the whole world, as Stable Diffusion
was pre-trained on everything.

**Suites.** For each task, every prompt of the grammar is enumerated, split by the rule above and
shuffled with a fixed seed; the seen suite keeps at most ``SEEN_PER_TASK`` prompts a task and the
unseen suite at most ``UNSEEN_PER_TASK``. Tasks whose prompts name no colour (single object,
counting, two objects, background) have no unseen prompts.
"""

from __future__ import annotations

import itertools
import random

from t2ialign.world.grammar import to_prompt
from t2ialign.world.spec import ObjectSpec, Spec, SpecError
from t2ialign.world.vocab import BACKGROUNDS, COLORS, MAX_COUNT, RELATIONS, SHAPES, TASKS

UNSEEN_COLOR_SHAPE: frozenset[tuple[str, str]] = frozenset({("orange", "triangle"), ("purple", "square")})
UNSEEN_COUNT_COLOR: frozenset[tuple[int, str]] = frozenset({(3, "green"), (4, "blue")})
SEEN_PER_TASK = 16
UNSEEN_PER_TASK = 12
SUITE_SEED = 2023


def is_unseen(spec: Spec) -> bool:
    """Whether ``spec`` falls in the held-out part of the world."""
    return any(
        (o.color, o.shape) in UNSEEN_COLOR_SHAPE or (o.count, o.color) in UNSEEN_COUNT_COLOR
        for o in spec.objects
    )


def split_of(spec: Spec) -> str:
    return "unseen" if is_unseen(spec) else "seen"


def _try(objects, relation=None, background=None) -> Spec | None:
    try:
        return Spec(tuple(objects), relation=relation, background=background)
    except SpecError:
        return None


def enumerate_specs(task: str) -> list[Spec]:
    """Every spec of ``task`` that the grammar can express, in a fixed order."""
    shapes, colors, bgs = list(SHAPES), list(COLORS), list(BACKGROUNDS)
    out: list[Spec | None] = []
    if task == "single_object":
        out = [_try([ObjectSpec(s)]) for s in shapes]
    elif task == "counting":
        out = [_try([ObjectSpec(s, n)]) for n in range(2, MAX_COUNT + 1) for s in shapes]
    elif task == "colors":
        out = [_try([ObjectSpec(s, 1, c)]) for c in colors for s in shapes]
    elif task == "background":
        out = [_try([ObjectSpec(s)], background=b) for b in bgs for s in shapes]
    elif task == "combination":
        out = [
            _try([ObjectSpec(s, n, c)], background=b)
            for n in range(1, MAX_COUNT + 1)
            for c in [None, *colors]
            for s in shapes
            for b in [None, *bgs]
        ]
    elif task == "two_object":
        out = [_try([ObjectSpec(a), ObjectSpec(b)]) for a, b in itertools.combinations(shapes, 2)]
    elif task == "color_attr":
        out = [
            _try([ObjectSpec(s1, 1, c1), ObjectSpec(s2, 1, c2)])
            for c1, c2 in itertools.permutations(colors, 2)
            for s1 in shapes
            for s2 in shapes
        ]
    elif task == "position":
        out = [
            _try([ObjectSpec(s1, 1, c1), ObjectSpec(s2, 1, c2)], relation=r)
            for r in RELATIONS
            for c1, c2 in itertools.permutations(colors, 2)
            for s1 in shapes
            for s2 in shapes
        ]
    else:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return [s for s in out if s is not None and s.task == task]


def suite(split: str) -> list[dict]:
    """The prompt suite of ``split`` ('seen' or 'unseen'): dicts with prompt, spec, task, split."""
    if split not in ("seen", "unseen"):
        raise ValueError(f"split must be 'seen' or 'unseen', got {split!r}")
    cap = SEEN_PER_TASK if split == "seen" else UNSEEN_PER_TASK
    rows = []
    for task in TASKS:
        specs = [s for s in enumerate_specs(task) if split_of(s) == split]
        random.Random(f"{SUITE_SEED}-{task}").shuffle(specs)
        for s in specs[:cap]:
            rows.append({"prompt": to_prompt(s), "spec": s.to_dict(), "task": task, "split": split})
    return rows


def perturbations(spec: Spec) -> list[tuple[str, Spec]]:
    """Every valid spec that differs from ``spec`` in exactly one attribute, as (attribute, spec).

    Attributes: count, color, shape (per object group), background (when the spec names one) and
    position (when it has a relation). The reward model's auxiliary loss classifies among these.
    """
    out: list[tuple[str, Spec]] = []
    groups = list(spec.objects)

    def with_group(i: int, g: ObjectSpec) -> Spec | None:
        gs = groups.copy()
        gs[i] = g
        return _try(gs, spec.relation, spec.background)

    for i, g in enumerate(groups):
        if spec.relation is None:
            for n in range(1, MAX_COUNT + 1):
                if n != g.count:
                    out.append(("count", with_group(i, ObjectSpec(g.shape, n, g.color))))
        if g.color is not None:
            for c in COLORS:
                if c != g.color:
                    out.append(("color", with_group(i, ObjectSpec(g.shape, g.count, c))))
        for s in SHAPES:
            if s != g.shape:
                out.append(("shape", with_group(i, ObjectSpec(s, g.count, g.color))))
    if spec.background is not None:
        for b in BACKGROUNDS:
            if b != spec.background:
                out.append(("background", _try(groups, spec.relation, b)))
    if spec.relation is not None:
        for r in RELATIONS:
            if r != spec.relation:
                out.append(("position", _try(groups, r, spec.background)))
    return [(a, s) for a, s in out if s is not None and s != spec]


def colour_swap(spec: Spec) -> Spec | None:
    """``spec`` with the colours of its two object groups exchanged ("a red circle and a blue
    square" -> "a blue circle and a red square"): a two-attribute change that tests which colour
    belongs to which object. None when the spec has one group, a group without colour, or when the
    swap says the same thing (two groups of one shape and no relation)."""
    if len(spec.objects) != 2 or any(o.color is None for o in spec.objects):
        return None
    a, b = spec.objects
    if a.color == b.color:
        return None
    out = Spec(
        (ObjectSpec(a.shape, a.count, b.color), ObjectSpec(b.shape, b.count, a.color)),
        relation=spec.relation,
        background=spec.background,
    )
    same = spec.relation is None and set(out.objects) == set(spec.objects)  # groups are unordered
    return None if same else out
