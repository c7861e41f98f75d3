"""The prompt grammar: spec -> English prompt, and prompt -> spec.

::

    prompt   := group [ "and" group | RELATION group ] [ "on a" BACKGROUND "background" ]
    group    := NUMBER [COLOR] SHAPE            (plural shape when NUMBER > 1)
    NUMBER   := a | an | one | two | three | four
    RELATION := left of | right of | above | below   ("to the left of" is also read)

Examples: ``"two blue circles on a black background"``, ``"a red circle left of a blue square"``,
``"a red circle and a blue square"``. :func:`to_prompt` writes the canonical form; :func:`parse`
reads it back (``parse(to_prompt(s)) == s``) and raises :class:`PromptError` naming any unknown
word.
"""

from __future__ import annotations

from t2ialign.world.spec import ObjectSpec, Spec, SpecError
from t2ialign.world.vocab import (
    BACKGROUNDS,
    COLORS,
    COUNT_WORDS,
    NUMBER_NAMES,
    PLURAL_TO_SHAPE,
    SHAPES,
    vocabulary,
)


class PromptError(ValueError):
    """A prompt that the grammar cannot read."""


def _group_phrase(o: ObjectSpec) -> str:
    noun = SHAPES[o.shape] if o.count > 1 else o.shape
    words = [o.color, noun] if o.color else [noun]
    if o.count > 1:
        return " ".join([NUMBER_NAMES[o.count], *words])
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def to_prompt(spec: Spec) -> str:
    """The canonical English prompt of ``spec``."""
    text = _group_phrase(spec.objects[0])
    if len(spec.objects) == 2:
        link = spec.relation if spec.relation else "and"
        text += f" {link} {_group_phrase(spec.objects[1])}"
    if spec.background:
        text += f" on a {spec.background} background"
    return text


def check_words(prompt: str) -> list[str]:
    """The prompt's words; raises :class:`PromptError` naming the first unknown word."""
    words = prompt.lower().replace(",", " ").split()
    known = set(vocabulary()) | {"to", "the"}
    for w in words:
        if w not in known:
            raise PromptError(
                f"unknown word {w!r} in prompt {prompt!r}; known words: {', '.join(vocabulary())}"
            )
    if not words:
        raise PromptError("empty prompt")
    return words


def _parse_group(words: list[str], i: int, prompt: str) -> tuple[ObjectSpec, int]:
    if i >= len(words) or words[i] not in COUNT_WORDS:
        got = words[i] if i < len(words) else "the end"
        raise PromptError(f"expected a number word (a, one, two, ...) in {prompt!r}, got {got!r}")
    count = COUNT_WORDS[words[i]]
    i += 1
    color = None
    if i < len(words) and words[i] in COLORS:
        color = words[i]
        i += 1
    if i >= len(words):
        raise PromptError(f"expected a shape in {prompt!r}")
    w = words[i]
    if count == 1 and w in SHAPES:
        shape = w
    elif count > 1 and w in PLURAL_TO_SHAPE:
        shape = PLURAL_TO_SHAPE[w]
    elif w in SHAPES or w in PLURAL_TO_SHAPE:
        raise PromptError(f"number and shape disagree in {prompt!r}: {words[i - 1]!r} ... {w!r}")
    else:
        raise PromptError(f"expected a shape in {prompt!r}, got {w!r}")
    try:
        return ObjectSpec(shape=shape, count=count, color=color), i + 1
    except SpecError as e:
        raise PromptError(f"{e} (in {prompt!r})") from None


def parse(prompt: str) -> Spec:
    """Read a prompt of this world's grammar into a :class:`Spec`."""
    words = check_words(prompt)
    groups = []
    g, i = _parse_group(words, 0, prompt)
    groups.append(g)
    relation = None
    if i < len(words) and words[i] != "on":
        if words[i] == "and":
            i += 1
        else:
            if words[i : i + 2] == ["to", "the"]:
                i += 2
            nxt = words[i] if i < len(words) else None  # "... to the" may end the prompt
            if nxt in ("left", "right") and words[i + 1 : i + 2] == ["of"]:
                relation = f"{nxt} of"
                i += 2
            elif nxt in ("above", "below"):
                relation = words[i]
                i += 1
            else:
                raise PromptError(f"expected 'and', a relation or 'on a ... background' in {prompt!r}")
        g, i = _parse_group(words, i, prompt)
        groups.append(g)
    background = None
    if i < len(words):
        tail = words[i:]
        if len(tail) != 4 or tail[0] != "on" or tail[1] != "a" or tail[3] != "background":
            raise PromptError(f"expected 'on a COLOUR background' at the end of {prompt!r}")
        if tail[2] not in BACKGROUNDS:
            raise PromptError(
                f"unknown background {tail[2]!r} in {prompt!r}; known: {', '.join(BACKGROUNDS)}"
            )
        background = tail[2]
    try:
        return Spec(objects=tuple(groups), relation=relation, background=background)
    except SpecError as e:
        raise PromptError(f"{e} (in {prompt!r})") from None
