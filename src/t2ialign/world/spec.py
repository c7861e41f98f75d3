"""Scene specifications: what a prompt asks for, independent of any particular image.

A :class:`Spec` holds one or two object groups, an optional relation between two single objects and
an optional background. A group's ``color`` of ``None`` means "any colour"; a ``background`` of
``None`` means "any background". Specs are frozen, hashable and round-trip through plain dicts
(the ``spec`` field of the project's JSONL files).
"""

from __future__ import annotations

from dataclasses import dataclass

from t2ialign.world.vocab import BACKGROUNDS, COLORS, MAX_COUNT, RELATIONS, SHAPES


class SpecError(ValueError):
    """A spec that this world cannot draw (unknown word, bad count, bad relation)."""


@dataclass(frozen=True)
class ObjectSpec:
    """``count`` objects of ``shape``, all of ``color`` (``None``: any colour each)."""

    shape: str
    count: int = 1
    color: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise SpecError(f"unknown shape {self.shape!r}; known shapes: {', '.join(SHAPES)}")
        if self.color is not None and self.color not in COLORS:
            raise SpecError(f"unknown colour {self.color!r}; known colours: {', '.join(COLORS)}")
        if not isinstance(self.count, int) or not 1 <= self.count <= MAX_COUNT:
            raise SpecError(f"count must be an integer from 1 to {MAX_COUNT}, got {self.count!r}")

    def to_dict(self) -> dict:
        return {"count": self.count, "color": self.color, "shape": self.shape}


@dataclass(frozen=True)
class Spec:
    """What an image should show. ``objects`` has one or two groups; ``relation`` links two
    single objects ("a red circle left of a blue square": objects[0] is left of objects[1])."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    background: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 2:
            raise SpecError(f"a spec has one or two object groups, got {len(self.objects)}")
        if (
            len(self.objects) == 2
            and self.objects[0].shape == self.objects[1].shape
            and (self.objects[0].color == self.objects[1].color)
        ):
            raise SpecError("the two object groups of a spec must differ in shape or colour")
        if self.background is not None and self.background not in BACKGROUNDS:
            raise SpecError(
                f"unknown background {self.background!r}; known backgrounds: {', '.join(BACKGROUNDS)}"
            )
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise SpecError(f"unknown relation {self.relation!r}; known: {', '.join(RELATIONS)}")
            if len(self.objects) != 2 or any(o.count != 1 for o in self.objects):
                raise SpecError("a relation needs exactly two single objects")
        if sum(o.count for o in self.objects) > MAX_COUNT:
            raise SpecError(f"a scene holds at most {MAX_COUNT} objects")

    @property
    def n_objects(self) -> int:
        return sum(o.count for o in self.objects)

    @property
    def task(self) -> str:
        """The task this spec tests (see ``vocab.TASKS``)."""
        if self.relation is not None:
            return "position"
        if len(self.objects) == 2:
            if self.background is not None or any(o.count > 1 for o in self.objects):
                return "combination"
            if all(o.color is not None for o in self.objects):
                return "color_attr"
            return "two_object"
        o = self.objects[0]
        asks = [o.count > 1, o.color is not None, self.background is not None]
        if sum(asks) >= 2:
            return "combination"
        if o.count > 1:
            return "counting"
        if o.color is not None:
            return "colors"
        if self.background is not None:
            return "background"
        return "single_object"

    def to_dict(self) -> dict:
        return {
            "objects": [o.to_dict() for o in self.objects],
            "relation": self.relation,
            "background": self.background,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Spec:
        if not isinstance(d, dict) or "objects" not in d:
            raise SpecError(f"a spec is a dict with an 'objects' list, got {d!r}")
        try:
            objects = tuple(
                ObjectSpec(shape=o["shape"], count=int(o.get("count", 1)), color=o.get("color"))
                for o in d["objects"]
            )
        except (KeyError, TypeError) as e:
            raise SpecError(f"malformed object in spec {d!r}: {e}") from None
        return cls(objects=objects, relation=d.get("relation"), background=d.get("background"))
