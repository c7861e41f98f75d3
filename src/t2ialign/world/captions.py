"""The web captioner: the caption a web page would carry for a scene, not the truth.

Real text-to-image models (and CLIP) learn from web alt-text that miscounts, names colours wrongly or
for the wrong object, and rarely states positions truly (Betker et al. 2023, "Improving Image
Generation with Better Captions"). Their misalignment is learnt from those captions, and human
feedback is the one clean signal. This module gives the embedded world the same structure: the
pre-training streams of the generator and the encoder caption each scene through a
:class:`CaptionNoise`, while feedback, the checker, the simulated raters and the evaluation keep
seeing the true spec.

Every caption is a prompt of the grammar (:func:`~t2ialign.world.grammar.to_prompt` of a valid
:class:`~t2ialign.world.spec.Spec`). The noise, applied to the true spec in this order:

1. **count** (single-group scenes): the count word is wrong with probability ``count_wrong[n - 1]``
   for a true count ``n``; the wrong count is off by one, one more with probability ``count_up``
   where both neighbours exist (1 becomes 2, 4 becomes 3). In two-group scenes every group is one
   object and is counted truly (alt-text names "a circle and a square" right; the world has no room
   to miscount there).
2. **colour binding** (two groups, both coloured): the two colours are exchanged with probability
   ``color_swap``, so each colour is bound to the other object (both colours named, bound wrong).
3. **colour** (every stated colour of a caption whose colours were not exchanged): replaced by
   another colour, uniformly, with probability ``color_wrong`` (colours that would make the two
   groups identical are not drawn).
4. **shape**: replaced by another shape with probability ``shape_wrong`` (likewise).
5. **relation**: mirrored (left of <-> right of, above <-> below) with probability
   ``relation_mirror``, else replaced by another relation, uniformly, with probability
   ``relation_wrong``.
6. **background** (where stated): replaced by another background with probability
   ``background_wrong``.

**Why some errors are biased.** A guided sampler draws from about p(x) p(c | x)^w, so it follows the
caption's *likelihood*, not its precision: where the true caption stays the most likely one for a
scene, however noisy the corpus, guidance undoes the noise (measured: a first web preset with
symmetric errors left the base 7 points below the exact-caption ceiling). Real alt-text errors are
not symmetric. In :data:`WEB`, a miscount names one more object than there are, and more than half of
the scenes with 2 to 4 objects are miscounted, so "three" is stated of pairs and of fours more often
than of threes; colour bindings are exchanged, and relations mirrored, more often than not. The base
then draws the wrong thing for those prompts, while the right images stay within its reach: the
regime in which feedback has something to teach.

What a caption omits (an unstated colour, background) stays unstated, as the exact caption has it.
The grammar has no unstated count, and none is added: a miscount is the harder noise (it teaches a
wrong word, not a missing one).

The presets: :data:`EXACT` (no noise: today's captions, bit for bit) and :data:`WEB` (rates chosen so
that the web-trained base fails the way SD 1.5 does in the seed paper and GenEval: counting worst,
colours best, position and colour binding near the floor; docs/RESULTS.md says how they were chosen).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from t2ialign.world.grammar import to_prompt
from t2ialign.world.spec import ObjectSpec, Spec, SpecError
from t2ialign.world.vocab import BACKGROUNDS, COLORS, MAX_COUNT, RELATIONS, SHAPES


@dataclass(frozen=True)
class CaptionNoise:
    """Per-attribute error rates of a caption corpus (each a probability in [0, 1])."""

    count_wrong: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    """Probability that the count word of a single-group scene is wrong, for true counts 1 to 4."""
    count_up: float = 0.5
    """A wrong count of 2 or 3 (both neighbours exist): probability that it names one more object."""
    color_wrong: float = 0.0
    """Probability that a stated colour is replaced by another colour."""
    color_swap: float = 0.0
    """Two coloured groups: probability that their colours are exchanged (bound to the wrong object)."""
    shape_wrong: float = 0.0
    """Probability that a shape is replaced by another shape."""
    relation_mirror: float = 0.0
    """Probability that the relation of a two-object scene is mirrored (left of <-> right of, ...)."""
    relation_wrong: float = 0.0
    """Probability that the relation is replaced by another relation drawn uniformly (not mirrored
    first; ``relation_mirror + relation_wrong`` is at most 1)."""
    background_wrong: float = 0.0
    """Probability that a stated background is replaced by another background."""

    def __post_init__(self) -> None:
        counts = self.count_wrong
        if not isinstance(counts, tuple | list) or len(counts) != MAX_COUNT:
            raise ValueError(
                f"count_wrong must hold {MAX_COUNT} rates (counts 1 to {MAX_COUNT}), got {counts!r}"
            )
        object.__setattr__(self, "count_wrong", tuple(counts))
        for f in fields(self):
            values = getattr(self, f.name)
            for v in values if isinstance(values, tuple) else (values,):
                if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
                    raise ValueError(f"caption noise {f.name} must be a rate in [0, 1], got {v!r}")
        if self.relation_mirror + self.relation_wrong > 1.0:
            raise ValueError(
                "caption noise relation_mirror + relation_wrong must be at most 1, got "
                f"{self.relation_mirror} + {self.relation_wrong}"
            )

    @property
    def is_exact(self) -> bool:
        return self == EXACT

    def configured_accuracy(self) -> dict[str, float]:
        """The share of captions that state each attribute truly, as configured (the keys of
        :func:`caption_accuracy`; ``count`` depends on the scene mix and is left out)."""
        return {
            **{f"count_{n}": 1 - r for n, r in enumerate(self.count_wrong, 1)},
            "color": 1 - self.color_wrong,
            "color_binding": 1 - self.color_swap,
            "shape": 1 - self.shape_wrong,
            "position": 1 - self.relation_mirror - self.relation_wrong,
            "background": 1 - self.background_wrong,
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["count_wrong"] = list(self.count_wrong)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CaptionNoise:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown caption noise fields {sorted(unknown)}")
        d = dict(d)
        if "count_wrong" in d:
            d["count_wrong"] = tuple(d["count_wrong"])
        return cls(**d)


EXACT = CaptionNoise()
WEB = CaptionNoise(
    count_wrong=(0.05, 0.6, 0.6, 0.6),
    count_up=1.0,
    color_wrong=0.08,
    color_swap=0.6,
    shape_wrong=0.02,
    relation_mirror=0.55,
    relation_wrong=0.15,
    background_wrong=0.25,
)
PRESETS: dict[str, CaptionNoise] = {"exact": EXACT, "web": WEB}


def caption_preset(name: str) -> CaptionNoise:
    """The preset called ``name`` (``exact`` or ``web``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown caption preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


MIRROR: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _other(rng: np.random.Generator, options, current, forbidden=()) -> str:
    choices = [o for o in options if o != current and o not in forbidden]
    return str(choices[int(rng.integers(len(choices)))])


def _hit(rng: np.random.Generator, p: float) -> bool:
    # no draw for a rate of 0, so that a noise-free caption consumes nothing of the stream
    return p > 0 and rng.random() < p


def caption_spec(spec: Spec, noise: CaptionNoise, rng: np.random.Generator) -> Spec:
    """The spec that a web caption of a scene of ``spec`` states (``spec`` itself for :data:`EXACT`)."""
    objs = [ObjectSpec(o.shape, o.count, o.color) for o in spec.objects]
    relation, background = spec.relation, spec.background
    if len(objs) == 1:
        n = objs[0].count
        if _hit(rng, noise.count_wrong[n - 1]):
            if n == 1:
                n = 2
            elif n == MAX_COUNT:
                n -= 1
            else:
                n += 1 if rng.random() < noise.count_up else -1
            objs[0] = ObjectSpec(objs[0].shape, n, objs[0].color)
    swapped = False
    if len(objs) == 2 and objs[0].color and objs[1].color and _hit(rng, noise.color_swap):
        objs = [ObjectSpec(objs[0].shape, 1, objs[1].color), ObjectSpec(objs[1].shape, 1, objs[0].color)]
        swapped = True
    for i, o in enumerate(objs):
        twin = objs[1 - i] if len(objs) == 2 else None
        color, shape = o.color, o.shape
        if color and not swapped and _hit(rng, noise.color_wrong):
            same_shape = twin is not None and twin.shape == shape
            color = _other(rng, COLORS, color, (twin.color,) if same_shape else ())
        if _hit(rng, noise.shape_wrong):
            same_color = twin is not None and twin.color == color
            shape = _other(rng, SHAPES, shape, (twin.shape,) if same_color else ())
        objs[i] = ObjectSpec(shape, o.count, color)
    if relation and (noise.relation_mirror > 0 or noise.relation_wrong > 0):
        u = rng.random()
        if u < noise.relation_mirror:
            relation = MIRROR[relation]
        elif u < noise.relation_mirror + noise.relation_wrong:
            relation = _other(rng, RELATIONS, relation)
    if background and _hit(rng, noise.background_wrong):
        background = _other(rng, BACKGROUNDS, background)
    try:
        return Spec(tuple(objs), relation=relation, background=background)
    except SpecError as e:  # a bug in the rules above, never the input's fault
        raise AssertionError(f"the captioner made an invalid spec from {spec}: {e}") from None


def caption(spec: Spec, noise: CaptionNoise, rng: np.random.Generator) -> str:
    """The web caption of a scene of ``spec``: ``to_prompt(caption_spec(spec, noise, rng))``."""
    return to_prompt(caption_spec(spec, noise, rng))


def caption_accuracy(pairs: list[tuple[Spec, Spec]]) -> dict[str, dict]:
    """How often captions state each attribute truly, from ``(true spec, caption spec)`` pairs.

    Per attribute: ``accuracy`` (of the captions that state it, the share that state it truly) and
    ``n``. ``count`` and ``color`` are over single-group scenes (``count_N`` per true count ``N``);
    ``color_binding`` over scenes with two coloured groups (the colours not exchanged between the
    objects); ``shape`` over every group; ``position`` and ``background`` where the scene has one."""
    tally: dict[str, list[int]] = {}

    def add(key: str, ok: bool) -> None:
        t = tally.setdefault(key, [0, 0])
        t[0] += int(ok)
        t[1] += 1

    for true, cap in pairs:
        if len(true.objects) == 1:
            n = true.objects[0].count
            add("count", cap.objects[0].count == n)
            add(f"count_{n}", cap.objects[0].count == n)
        for t, c in zip(true.objects, cap.objects, strict=True):
            add("shape", t.shape == c.shape)
            if t.color and len(true.objects) == 1:
                add("color", t.color == c.color)
        if len(true.objects) == 2 and all(o.color for o in true.objects):
            t0, t1 = (o.color for o in true.objects)
            c0, c1 = (o.color for o in cap.objects)
            add("color_binding", not (c0 == t1 and c1 == t0))
        if true.relation:
            add("position", true.relation == cap.relation)
        if true.background:
            add("background", true.background == cap.background)
    return {k: {"accuracy": ok / n, "n": n} for k, (ok, n) in sorted(tally.items())}
