"""The prompt grammar (round trips, errors), the prompt suites and one-attribute perturbations."""

from __future__ import annotations

import numpy as np
import pytest

from t2ialign.world import (
    BACKGROUNDS,
    COLORS,
    RELATIONS,
    SHAPES,
    TASKS,
    ObjectSpec,
    PromptError,
    Spec,
    SpecError,
    parse,
    random_spec,
    suite,
    to_prompt,
    vocabulary,
)
from t2ialign.world.suites import (
    SEEN_PER_TASK,
    UNSEEN_COLOR_SHAPE,
    UNSEEN_COUNT_COLOR,
    UNSEEN_PER_TASK,
    enumerate_specs,
    is_unseen,
    perturbations,
    split_of,
)
from t2ialign.world.vocab import NUMBER_NAMES


def test_round_trip_random_specs():
    rng = np.random.default_rng(0)
    tasks_seen = set()
    for _ in range(400):
        spec = random_spec(rng)
        tasks_seen.add(spec.task)
        prompt = to_prompt(spec)
        assert parse(prompt) == spec, prompt
        # the canonical prompt uses only the vocabulary
        assert set(prompt.split()) <= set(vocabulary())
        # spec dicts round-trip too
        assert Spec.from_dict(spec.to_dict()) == spec
    assert tasks_seen == set(TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_round_trip_every_task(task):
    rng = np.random.default_rng(1)
    for _ in range(30):
        spec = random_spec(rng, task)
        assert spec.task == task
        assert parse(to_prompt(spec)) == spec


@pytest.mark.parametrize("split", ["seen", "unseen"])
def test_suite_prompts_parse_to_their_specs(split):
    rows = suite(split)
    assert rows
    for r in rows:
        spec = parse(r["prompt"])
        assert spec.to_dict() == r["spec"], r["prompt"]
        assert spec.task == r["task"]
        assert to_prompt(spec) == r["prompt"]


def test_examples_from_the_docs():
    s = parse("two blue circles on a black background")
    assert s == Spec((ObjectSpec("circle", 2, "blue"),), background="black")
    s = parse("a red circle left of a blue square")
    assert s == Spec((ObjectSpec("circle", 1, "red"), ObjectSpec("square", 1, "blue")), relation="left of")
    assert parse("a red circle and a blue square").relation is None
    assert to_prompt(Spec((ObjectSpec("triangle", 1, "orange"),))) == "an orange triangle"


def test_lenient_forms():
    canonical = parse("a red circle left of a blue square")
    assert parse("a red circle to the left of a blue square") == canonical
    assert parse("A Red Circle  Left Of A Blue Square") == canonical
    assert parse("one red circle left of an blue square") == canonical
    assert parse("a red circle, and a blue square") == parse("a red circle and a blue square")
    for rel in RELATIONS:
        assert parse(f"a circle {rel} a square").relation == rel


@pytest.mark.parametrize(
    "prompt, word",
    [
        ("two pink circles", "pink"),
        ("a red hexagon", "hexagon"),
        ("a circle on a teal background", "teal"),
        ("three dogs", "dogs"),
    ],
)
def test_unknown_word_is_named_and_known_words_listed(prompt, word):
    with pytest.raises(PromptError) as e:
        parse(prompt)
    msg = str(e.value)
    assert f"unknown word {word!r}" in msg
    assert "known words:" in msg
    for known in ("circle", "squares", "red", "black", "four", "above"):
        assert known in msg


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        "   ",
        "circle",  # no number word
        "two circle",  # number and shape disagree
        "a circles",
        "a red",  # no shape
        "a circle and",
        "a circle left a square",
        "a circle on a black",
        "a circle on black background",
        "a circle on a red background",  # object colour as background
        "a circle on a black background and a square",
        "a circle and a circle",  # the two groups must differ
        "three circles and two squares",  # more than four objects
        "two circles left of a square",  # relations need single objects
        "a circle to the",  # used to raise IndexError
        "a circle to the left",
        "a circle to the left of",
    ],
)
def test_malformed_prompts_raise_prompt_error(prompt):
    with pytest.raises(PromptError):
        parse(prompt)


def test_prefixes_of_valid_prompts_never_crash():
    """Any word prefix of a valid prompt either parses or raises PromptError (never another error)."""
    rng = np.random.default_rng(2)
    for _ in range(150):
        prompt = to_prompt(random_spec(rng)).replace("left of", "to the left of")
        words = prompt.split()
        for k in range(len(words) + 1):
            for text in (" ".join(words[:k]), " ".join([*words[:k], "to", "the"])):
                try:
                    parse(text)
                except PromptError:
                    pass


def test_prompt_error_is_a_value_error():
    assert issubclass(PromptError, ValueError)  # the CLI turns ValueErrors into 'error:' lines


def test_spec_validation():
    with pytest.raises(SpecError):
        ObjectSpec("hexagon")
    with pytest.raises(SpecError):
        ObjectSpec("circle", 5)
    with pytest.raises(SpecError):
        ObjectSpec("circle", 1, "black")  # a background colour
    with pytest.raises(SpecError):
        Spec(())
    with pytest.raises(SpecError):
        Spec((ObjectSpec("circle"),), background="red")
    with pytest.raises(SpecError):
        Spec((ObjectSpec("circle"),), relation="left of")
    with pytest.raises(SpecError):
        Spec.from_dict({"objects": [{"count": 1}]})
    with pytest.raises(SpecError):
        Spec.from_dict(["not", "a", "dict"])


def test_vocabulary_covers_the_tables():
    v = set(vocabulary())
    assert set(SHAPES) <= v and set(SHAPES.values()) <= v
    assert set(COLORS) <= v and set(BACKGROUNDS) <= v
    assert not set(COLORS) & set(BACKGROUNDS)


# --- suites -------------------------------------------------------------------------------------


def _held_out_phrases() -> list[str]:
    """The held-out pairs as they read in prompts, found without the suites' own rule."""
    phrases = []
    for color, shape in UNSEEN_COLOR_SHAPE:
        phrases += [f"{color} {shape}", f"{color} {SHAPES[shape]}"]
    for count, color in UNSEEN_COUNT_COLOR:
        phrases.append(f"{NUMBER_NAMES[count]} {color} ")
    return phrases


def test_suites_are_disjoint_and_split_by_the_held_out_pairs():
    seen, unseen = suite("seen"), suite("unseen")
    seen_prompts = [r["prompt"] for r in seen]
    unseen_prompts = [r["prompt"] for r in unseen]
    assert len(set(seen_prompts)) == len(seen_prompts)
    assert len(set(unseen_prompts)) == len(unseen_prompts)
    assert not set(seen_prompts) & set(unseen_prompts)
    phrases = _held_out_phrases()
    for r in seen:
        assert r["split"] == "seen"
        assert not is_unseen(Spec.from_dict(r["spec"]))
        for ph in phrases:
            assert ph not in r["prompt"] + " ", (ph, r["prompt"])
    for r in unseen:
        assert r["split"] == "unseen"
        assert is_unseen(Spec.from_dict(r["spec"]))
        assert any(ph in r["prompt"] + " " for ph in phrases), r["prompt"]


def test_suite_sizes_and_determinism():
    seen, unseen = suite("seen"), suite("unseen")
    assert suite("seen") == seen
    for task in TASKS:
        n_seen = sum(r["task"] == task for r in seen)
        n_unseen = sum(r["task"] == task for r in unseen)
        assert 1 <= n_seen <= SEEN_PER_TASK
        assert n_unseen <= UNSEEN_PER_TASK
    # tasks that name no colour have nothing held out
    for task in ("single_object", "counting", "two_object", "background"):
        assert not any(r["task"] == task for r in unseen)
    for task in ("colors", "color_attr", "position", "combination"):
        assert any(r["task"] == task for r in unseen)
    with pytest.raises(ValueError):
        suite("train")


def test_held_out_pairs_are_examples_of_the_rule():
    assert split_of(parse("an orange triangle")) == "unseen"
    assert split_of(parse("two purple squares on a gray background")) == "unseen"
    assert split_of(parse("three green circles")) == "unseen"
    assert split_of(parse("four blue triangles")) == "unseen"
    assert split_of(parse("three blue circles")) == "seen"
    assert split_of(parse("an orange circle and a purple triangle")) == "seen"
    assert split_of(parse("three circles")) == "seen"


@pytest.mark.parametrize("task", TASKS)
def test_enumerated_specs_are_unique_and_of_their_task(task):
    specs = enumerate_specs(task)
    assert specs and len(set(specs)) == len(specs)
    assert all(s.task == task for s in specs)


# --- perturbations ------------------------------------------------------------------------------


def _differences(a: Spec, b: Spec) -> list[str]:
    """The attributes in which b differs from a, one entry per changed field."""
    out = []
    if a.background != b.background:
        out.append("background")
    if a.relation != b.relation:
        out.append("position")
    assert len(a.objects) == len(b.objects)
    for x, y in zip(a.objects, b.objects, strict=True):
        out += [f for f in ("count", "color", "shape") if getattr(x, f) != getattr(y, f)]
    return out


def test_perturbations_change_exactly_one_attribute():
    rng = np.random.default_rng(3)
    attrs_seen = set()
    for _ in range(300):
        spec = random_spec(rng)
        ps = perturbations(spec)
        assert ps, to_prompt(spec)
        assert len(set(p for _, p in ps)) == len(ps)  # no duplicates
        for attr, p in ps:
            assert _differences(spec, p) == [attr], (to_prompt(spec), attr, to_prompt(p))
            # valid: a spec again, expressible as a prompt that reads back the same
            assert Spec.from_dict(p.to_dict()) == p
            assert parse(to_prompt(p)) == p
            attrs_seen.add(attr)
    assert attrs_seen == {"count", "color", "shape", "background", "position"}


def test_perturbations_cover_what_a_spec_names():
    spec = parse("a red circle left of a blue square on a black background")
    attrs = {a for a, _ in perturbations(spec)}
    assert attrs == {"color", "shape", "background", "position"}  # no count: relations need singles
    attrs = {a for a, _ in perturbations(parse("two circles"))}
    assert attrs == {"count", "shape"}  # no colour or background named


def test_colour_swap_exchanges_the_two_colours_and_never_means_the_same():
    from t2ialign.world.suites import colour_swap

    def swapped(prompt):
        s = colour_swap(parse(prompt))
        return None if s is None else to_prompt(s)

    assert swapped("an orange circle and a purple square") == "a purple circle and an orange square"
    assert swapped("a red circle left of a blue circle") == "a blue circle left of a red circle"
    assert swapped("two red circles and a blue square") == "two blue circles and a red square"
    assert swapped("a red circle and a blue circle") is None  # the same two groups, unordered
    assert swapped("a circle and a square") is None and swapped("two red circles") is None
    rng = np.random.default_rng(5)
    n = 0
    for _ in range(300):
        spec = random_spec(rng)
        s = colour_swap(spec)
        if s is not None:
            n += 1
            assert _differences(spec, s) == ["color", "color"]
            assert parse(to_prompt(s)) == s and set(s.objects) != set(spec.objects)
    assert n > 30
