"""Agreement statistics and the project's statistics page.

- :func:`cohen_kappa`: two raters on the same items, ``(p_o - p_e) / (1 - p_e)`` with ``p_e`` from
  each rater's own category frequencies.
- :func:`fleiss_kappa`: any number of raters. Items may have different numbers of ratings (at least
  two): ``P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1))``, ``P = mean(P_i)``, ``p_j`` the share of all
  ratings in category j, ``P_e = sum_j p_j^2``; with equal ``n_i`` this is Fleiss (1971) exactly.

Both return NaN when undefined (no items, or chance agreement of 1: everyone always answered the
same category). Only good/bad labels enter the image kappas (skips are not verdicts); comparisons
enter as (first image wins, second wins, tie) with the images in id order.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from itertools import combinations

import numpy as np


def cohen_kappa(a: Sequence, b: Sequence) -> float:
    """Cohen's kappa of two raters' answers on the same items (any hashable categories)."""
    if len(a) != len(b):
        raise ValueError(f"two raters must answer the same items: {len(a)} and {len(b)} answers")
    n = len(a)
    if n == 0:
        return math.nan
    po = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    pe = sum(ca[c] * cb[c] for c in ca) / (n * n)
    if pe >= 1.0:
        return math.nan
    return (po - pe) / (1.0 - pe)


def fleiss_kappa(counts) -> float:
    """Fleiss' kappa from an (items, categories) matrix of rating counts; rows with fewer than two
    ratings are ignored."""
    m = np.asarray(counts, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"counts must be an (items, categories) matrix, got shape {m.shape}")
    n_i = m.sum(axis=1)
    m, n_i = m[n_i >= 2], n_i[n_i >= 2]
    if len(m) == 0:
        return math.nan
    p_item = ((m * m).sum(axis=1) - n_i) / (n_i * (n_i - 1))
    p_bar = p_item.mean()
    p_j = m.sum(axis=0) / n_i.sum()
    pe = float((p_j * p_j).sum())
    if pe >= 1.0:
        return math.nan
    return float((p_bar - pe) / (1.0 - pe))


def agreement(ratings: dict[tuple, dict[str, str]], categories: Sequence[str]) -> dict:
    """Agreement among raters. ``ratings[item][rater] = category``. Returns Fleiss' kappa over items
    rated at least twice, Cohen's kappa for each pair of raters sharing items, and the raw
    agreement rate."""
    index = {c: j for j, c in enumerate(categories)}
    multi = {i: r for i, r in ratings.items() if len(r) >= 2}
    counts = np.zeros((len(multi), len(categories)))
    for row, r in enumerate(multi.values()):
        for c in r.values():
            counts[row, index[c]] += 1
    raters = sorted({a for r in multi.values() for a in r})
    pairs = []
    for x, y in combinations(raters, 2):
        shared = [r for r in multi.values() if x in r and y in r]
        if shared:
            a, b = [r[x] for r in shared], [r[y] for r in shared]
            pairs.append(
                {
                    "a": x,
                    "b": y,
                    "n": len(shared),
                    "kappa": cohen_kappa(a, b),
                    "agree": sum(p == q for p, q in zip(a, b, strict=True)) / len(shared),
                }
            )
    agree = [1.0 if len(set(r.values())) == 1 else 0.0 for r in multi.values()]
    out = {
        "raters": raters,
        "n_items": len(multi),
        "fleiss_kappa": fleiss_kappa(counts) if len(multi) else math.nan,
        "unanimous": float(np.mean(agree)) if agree else math.nan,
        "pairs": pairs,
    }
    out["method"] = "cohen" if len(raters) == 2 else "fleiss"
    out["kappa"] = pairs[0]["kappa"] if len(raters) == 2 and pairs else out["fleiss_kappa"]
    return out


_CHECK_CACHE: dict[tuple[str, str], bool] = {}


def checker_verdict(store, sha: str, spec: dict) -> bool:
    """ShapesEval's verdict on an image (cached per process)."""
    import json

    from t2ialign.world.checker import check

    key = (sha, json.dumps(spec, sort_keys=True))
    if key not in _CHECK_CACHE:
        if len(_CHECK_CACHE) > 200_000:
            _CHECK_CACHE.clear()
        _CHECK_CACHE[key] = bool(check(store.load_image_file(sha), spec).correct)
    return _CHECK_CACHE[key]


def project_stats(store, with_checker: bool = True) -> dict:
    """Everything the stats page and ``t2ialign label stats`` show."""
    labels = store.label_rows()
    comps = store.comparison_rows()
    annotators = store.annotators()
    kind = {a["name"]: a["kind"] for a in annotators}
    group_of = {n: ("simulated" if k == "simulated" else "human") for n, k in kind.items()}

    # labels per task and split, good rate per task (per group)
    per_task: dict = defaultdict(lambda: {"good": 0, "bad": 0, "skip": 0})
    for r in labels:
        per_task[(group_of[r["annotator"]], r["task"], r["split"])][r["value"]] += 1
    tasks = sorted({r["task"] for r in labels})
    table = []
    for (group, task, split), c in sorted(per_task.items()):
        verdicts = c["good"] + c["bad"]
        table.append(
            {
                "group": group,
                "task": task,
                "split": split,
                **c,
                "good_rate": c["good"] / verdicts if verdicts else math.nan,
            }
        )
    good_rate = {}
    for group in ("human", "simulated"):
        for task in tasks:
            rows = [t for t in table if t["group"] == group and t["task"] == task]
            g, b = sum(t["good"] for t in rows), sum(t["bad"] for t in rows)
            if g + b:
                good_rate.setdefault(group, {})[task] = {"good": g, "n": g + b, "rate": g / (g + b)}

    # agreement, per group
    agree = {}
    for group in ("human", "simulated"):
        ratings: dict = defaultdict(dict)
        for r in labels:
            if group_of[r["annotator"]] == group and r["value"] != "skip":
                ratings[("g", r["generation_id"])][r["annotator"]] = r["value"]
        pair_ratings: dict = defaultdict(dict)
        for r in comps:
            if group_of[r["annotator"]] == group:
                lo, hi = min(r["left_id"], r["right_id"]), max(r["left_id"], r["right_id"])
                c = r["choice"]
                if c != "tie":
                    c = "first" if (r[f"{c}_id"] == lo) else "second"
                pair_ratings[(lo, hi)][r["annotator"]] = c
        agree[group] = {
            "labels": agreement(ratings, ["good", "bad"]),
            "pairs": agreement(pair_ratings, ["first", "second", "tie"]),
        }

    # annotators: progress, good rate, agreement with the checker
    people = []
    by_ann = defaultdict(list)
    for r in labels:
        by_ann[r["annotator"]].append(r)
    comps_by = Counter(r["annotator"] for r in comps)
    for a in annotators:
        rows = by_ann.get(a["name"], [])
        c = Counter(r["value"] for r in rows)
        verdicts = [r for r in rows if r["value"] != "skip"]
        entry = {
            "name": a["name"],
            "kind": a["kind"],
            "good": c["good"],
            "bad": c["bad"],
            "skip": c["skip"],
            "comparisons": comps_by[a["name"]],
            "last": max([r["created_at"] for r in rows], default=None),
            "good_rate": c["good"] / len(verdicts) if verdicts else math.nan,
            "progress": store.progress(a["id"]) if a["kind"] == "human" else None,
        }
        if with_checker:
            judged = [r for r in verdicts if r["spec"] is not None]
            hits = sum(
                (r["value"] == "good") == checker_verdict(store, r["image_sha256"], r["spec"]) for r in judged
            )
            entry["checker_agree"] = hits / len(judged) if judged else math.nan
        people.append(entry)
    return {
        "counts": store.counts(),
        "labels_per_image": store.labels_per_image,
        "progress": store.progress(None),
        "by_task_split": table,
        "good_rate": good_rate,
        "agreement": agree,
        "annotators": people,
    }
