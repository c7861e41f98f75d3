"""Simulated raters: the ShapesEval checker as an annotator, with errors and leniency.

``oracle`` (``noise``, ``bias``) labels an image as follows:

1. the checker's verdict;
2. *leniency*: when the image is wrong in one attribute only (it would be right for a prompt that
   differs from this one in that attribute alone: ``world.perturbations``), the failure is forgiven
   with probability ``bias[attr]``. (The checker's own per-attribute verdicts overlap: three circles
   for "two circles" fail count *and* shape, so they cannot name the single cause.) An image wrong in
   several attributes is forgiven only if each of the checker's failed attributes is forgiven,
   independently. The result is the *perceived* verdict;
3. *noise*: the perceived verdict is flipped with probability ``noise``.

Pairwise comparisons compare the two perceived verdicts (step 1-2 for each image): a good image beats
a bad one, two equal verdicts are a tie. Then, with probability ``noise``, the answer is corrupted: a
win becomes the opposite win, a tie becomes a coin flip between left and right.

``random`` answers uniformly at random (good/bad; left/right/tie): a floor for agreement statistics.

Every random draw is seeded by (seed, rater name, item), so a rerun gives the same answers and only
labels what is new. A rater is an annotator of kind ``simulated`` named ``sim-<rater>`` unless named
otherwise; its parameters are stored with it, and reusing a name with other parameters is an error.
Simulated labels are marked ``simulated`` and take no slot of the human assignment.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter, defaultdict

import numpy as np

from t2ialign.world.checker import check
from t2ialign.world.scene import relation_holds
from t2ialign.world.spec import Spec
from t2ialign.world.suites import perturbations

RATERS = ("oracle", "random")
ATTRIBUTES = ("count", "shape", "color", "background", "position")


def parse_bias(items: list[str] | None) -> dict[str, float]:
    """``["count=0.2", "color=0.1"]`` -> ``{"count": 0.2, "color": 0.1}`` (validated)."""
    out: dict[str, float] = {}
    for item in items or []:
        for part in item.split(","):
            if not part.strip():
                continue
            name, sep, val = part.partition("=")
            name = name.strip()
            if not sep or name not in ATTRIBUTES:
                raise ValueError(
                    f"--bias takes ATTRIBUTE=PROBABILITY with ATTRIBUTE one of {', '.join(ATTRIBUTES)}; "
                    f"got {part!r}"
                )
            try:
                p = float(val)
            except ValueError:
                raise ValueError(f"--bias {part!r}: {val!r} is not a number") from None
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"--bias {part!r}: a probability must be in [0, 1]")
            out[name] = p
    return out


class SimulatedRater:
    """A checker-based (or random) rater; see the module docstring."""

    def __init__(self, rater: str = "oracle", noise: float = 0.0, bias: dict | None = None, seed: int = 0):
        if rater not in RATERS:
            raise ValueError(f"unknown rater {rater!r}; known: {', '.join(RATERS)}")
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be a probability in [0, 1], got {noise}")
        self.rater, self.noise, self.bias, self.seed = rater, float(noise), dict(bias or {}), int(seed)
        self._cache: dict = {}
        for k, p in self.bias.items():
            if k not in ATTRIBUTES or not 0.0 <= p <= 1.0:
                raise ValueError(f"bias must map attributes ({', '.join(ATTRIBUTES)}) to probabilities")

    @property
    def params(self) -> dict:
        return {"rater": self.rater, "noise": self.noise, "bias": self.bias, "seed": self.seed}

    def rng(self, *key) -> np.random.Generator:
        digest = hashlib.sha256(repr((self.seed, *key)).encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def perceived(self, image, spec: dict, rng: np.random.Generator) -> bool:
        """The verdict after leniency, before noise."""
        draws = {a: rng.random() for a in ATTRIBUTES}  # drawn for all, so answers do not shift
        correct, single, failed = self.analyse(image, spec)
        if correct:
            return True
        if single:
            return any(draws[a] < self.bias.get(a, 0.0) for a in single)
        return all(draws[a] < self.bias.get(a, 0.0) for a in failed)

    def analyse(self, image, spec: dict) -> tuple[bool, set[str], list[str]]:
        """(checker verdict, the single wrong attribute(s), the checker's failed attributes), cached
        per image and spec: an image is judged once however many pairs it is in."""
        arr = np.ascontiguousarray(image)
        key = (hashlib.blake2b(arr.tobytes(), digest_size=16).digest(), arr.shape, repr(spec))
        if key not in self._cache:
            if len(self._cache) > 100_000:
                self._cache.clear()
            s = Spec.from_dict(spec)
            res = check(arr, s)
            single = set() if res.correct else single_failure(res.detection, s)
            self._cache[key] = (res.correct, single, [a for a, ok in res.ok.items() if not ok])
        return self._cache[key]

    def label(self, image, spec: dict, key) -> str:
        rng = self.rng("label", key)
        if self.rater == "random":
            return "good" if rng.random() < 0.5 else "bad"
        good = self.perceived(image, spec, rng)
        if rng.random() < self.noise:
            good = not good
        return "good" if good else "bad"

    def compare(self, left, right, spec: dict, key) -> str:
        rng = self.rng("pair", key)
        if self.rater == "random":
            return ("left", "right", "tie")[int(rng.integers(3))]
        gl = self.perceived(left, spec, rng)
        gr = self.perceived(right, spec, rng)
        choice = "tie" if gl == gr else ("left" if gl else "right")
        if rng.random() < self.noise:
            coin = rng.random() < 0.5
            choice = {"left": "right", "right": "left"}.get(choice) or ("left" if coin else "right")
        return choice


def judge(det, spec: Spec) -> bool:
    """Whether a checker detection matches ``spec``: the decision rules of
    ``world.checker.check`` applied to a detection made once (a test keeps the two in step)."""
    found = det.objects
    if len(found) != spec.n_objects:
        return False
    want: Counter = Counter()
    for o in spec.objects:
        want[o.shape] += o.count
    if Counter(f.shape for f in found) != want:
        return False
    for o in spec.objects:
        if o.color is not None and sum(f.shape == o.shape and f.color == o.color for f in found) != o.count:
            return False
    if spec.background is not None and det.background != spec.background:
        return False
    if spec.relation is not None:
        a, b = spec.objects
        fa = [f for f in found if f.shape == a.shape and (a.color is None or f.color == a.color)]
        fb = [f for f in found if f.shape == b.shape and (b.color is None or f.color == b.color)]
        if len(fa) != 1 or len(fb) != 1:
            return False
        return relation_holds((fa[0].cx, fa[0].cy), (fb[0].cx, fb[0].cy), spec.relation)
    return True


def single_failure(det, spec: Spec) -> set[str]:
    """The attributes A such that the detection matches a spec differing from ``spec`` in A alone
    (empty when the image is right, or wrong in more than one attribute)."""
    return {attr for attr, alt in perturbations(spec) if judge(det, alt)}


def simulate(
    store,
    rater: SimulatedRater,
    name: str | None = None,
    labels: bool = True,
    pairs: bool = True,
    pairs_per_prompt: int | None = None,
    limit: int | None = None,
    chunk: int = 256,
) -> dict:
    """Label every image (and compare pairs of images of each prompt) that this rater has not
    answered yet. ``pairs_per_prompt`` caps the pairs per prompt (None: all of them); ``limit`` caps
    the number of new images labelled. Writes ``chunk`` answers per transaction. Returns counts."""
    name = name or f"sim-{rater.rater}"
    aid = store.ensure_annotator(name, "simulated", rater.params)
    done = {r["generation_id"] for r in store.label_rows(annotator=name)}
    compared = {
        (min(r["left_id"], r["right_id"]), max(r["left_id"], r["right_id"]))
        for r in store.comparison_rows(annotator=name)
    }
    gens = list(store.generations())
    cache: dict[str, np.ndarray] = {}

    def image(g):
        sha = g["image_sha256"]
        if sha not in cache:
            cache[sha] = store.load_image_file(sha)
        return cache[sha]

    out = {"annotator": name, "labels": 0, "comparisons": 0, "no_spec": 0}
    todo = []
    if labels:
        new = [g for g in gens if g["id"] not in done]
        out["no_spec"] = sum(g["spec"] is None for g in new)
        todo += [("label", g) for g in new if g["spec"] is not None][:limit]
    if pairs:
        by_prompt = defaultdict(list)
        for g in gens:
            if g["spec"] is not None:
                by_prompt[g["prompt_id"]].append(g)
        for group in by_prompt.values():
            combos = list(itertools.combinations(group, 2))[:pairs_per_prompt]
            todo += [("pair", (a, b)) for a, b in combos if (a["id"], b["id"]) not in compared]
    for start in range(0, len(todo), chunk):
        with store.transaction():
            for kind, item in todo[start : start + chunk]:
                if kind == "label":
                    value = rater.label(image(item), item["spec"], item["id"])
                    store.add_label(item["id"], aid, value, request_id=f"sim:{item['id']}", source="simulate")
                    out["labels"] += 1
                    continue
                a, b = item
                rid = f"sim:{a['id']}:{b['id']}"
                if rater.rng("side", a["id"], b["id"]).random() < 0.5:  # which is shown left: a coin flip
                    a, b = b, a
                choice = rater.compare(image(a), image(b), a["spec"], (a["id"], b["id"]))
                store.add_comparison(a["id"], b["id"], aid, choice, request_id=rid, source="simulate")
                out["comparisons"] += 1
    return out
