"""How exact is ShapesEval? Three measurements of the checker on renders of random specs.

1. **true**: ground-truth renders of random specs, checked against their own spec (accuracy,
   target >= 99.5%);
2. **wrong**: renders of a one-attribute perturbation of a spec (count, colour, shape, background or
   position changed), checked against the original spec (rejection rate, target >= 99%);
3. **noisy**: ground-truth renders with Gaussian pixel noise of std 0.05 on [0, 1] images, clipped
   to [0, 1] (accuracy, target >= 98%).

Specs come from ``random_spec`` (uniform over the eight tasks, the pre-training distribution). Every
image uses its own render seed. Prints per-task figures and the failure reasons; ``--json PATH``
writes the figures as JSON. Exit code 1 when a figure misses its target.

::

    python benchmarks/checker_accuracy.py --n 5000 --sizes 32 64 --json checker_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter, defaultdict

import numpy as np

from t2ialign.world import TASKS, check, perturbations, random_spec, render, to_prompt

TARGETS = {"true": 0.995, "wrong": 0.99, "noisy": 0.98}
NOISE_STD = 0.05
N_EXAMPLES = 5  # failure examples kept per measurement


def _failed(res) -> tuple[str, ...]:
    return tuple(a for a, ok in res.ok.items() if not ok)


def measure(n: int, size: int, seed: int) -> dict:
    """The three measurements at one image size; returns a JSON-ready dict."""
    rng = np.random.default_rng(seed)
    per_task: dict[str, dict[str, list[int]]] = {
        m: defaultdict(lambda: [0, 0]) for m in TARGETS
    }  # measurement -> task -> [good, n]
    per_attr = defaultdict(lambda: [0, 0])  # wrong renders: changed attribute -> [rejected, n]
    reasons: dict[str, Counter] = {m: Counter() for m in TARGETS}
    examples: dict[str, list[str]] = {m: [] for m in TARGETS}
    timings = {}

    # 1. true renders
    t0 = time.perf_counter()
    for i in range(n):
        spec = random_spec(rng)
        res = check(render(spec, seed=i, size=size), spec)
        cell = per_task["true"][spec.task]
        cell[0] += res.correct
        cell[1] += 1
        if not res.correct:
            reasons["true"][", ".join(_failed(res))] += 1
            if len(examples["true"]) < N_EXAMPLES:
                why = "; ".join(res.reasons[a] for a in _failed(res))
                examples["true"].append(f"seed {i} {to_prompt(spec)!r}: {why}")
    timings["true"] = time.perf_counter() - t0

    # 2. wrong renders: the attribute to change is drawn uniformly among those the spec has, then
    # one perturbation of that attribute; rendered, and checked against the original spec.
    t0 = time.perf_counter()
    for i in range(n):
        spec = random_spec(rng)
        by_attr = defaultdict(list)
        for attr, p in perturbations(spec):
            by_attr[attr].append(p)
        attr = str(rng.choice(sorted(by_attr)))
        wrong = by_attr[attr][int(rng.integers(len(by_attr[attr])))]
        res = check(render(wrong, seed=n + i, size=size), spec)
        rejected = not res.correct
        cell = per_task["wrong"][spec.task]
        cell[0] += rejected
        cell[1] += 1
        per_attr[attr][0] += rejected
        per_attr[attr][1] += 1
        if not rejected:
            reasons["wrong"][f"{attr} changed, accepted"] += 1
            if len(examples["wrong"]) < N_EXAMPLES:
                examples["wrong"].append(
                    f"seed {n + i}: render of {to_prompt(wrong)!r} accepted as {to_prompt(spec)!r}"
                )
    timings["wrong"] = time.perf_counter() - t0

    # 3. noisy true renders
    t0 = time.perf_counter()
    for i in range(n):
        spec = random_spec(rng)
        img = render(spec, seed=2 * n + i, size=size).astype(np.float32) / 255.0
        img = np.clip(img + rng.normal(0.0, NOISE_STD, img.shape).astype(np.float32), 0.0, 1.0)
        res = check(img, spec)
        cell = per_task["noisy"][spec.task]
        cell[0] += res.correct
        cell[1] += 1
        if not res.correct:
            reasons["noisy"][", ".join(_failed(res))] += 1
            if len(examples["noisy"]) < N_EXAMPLES:
                why = "; ".join(res.reasons[a] for a in _failed(res))
                examples["noisy"].append(f"seed {2 * n + i} {to_prompt(spec)!r}: {why}")
    timings["noisy"] = time.perf_counter() - t0

    out = {"size": size, "n": n, "seed": seed, "measurements": {}}
    for m, target in TARGETS.items():
        good = sum(v[0] for v in per_task[m].values())
        total = sum(v[1] for v in per_task[m].values())
        out["measurements"][m] = {
            "metric": "rejection rate" if m == "wrong" else "accuracy",
            "value": good / total,
            "good": good,
            "n": total,
            "target": target,
            "met": good / total >= target,
            "tasks": {
                t: {"value": per_task[m][t][0] / per_task[m][t][1], "n": per_task[m][t][1]}
                for t in TASKS
                if per_task[m][t][1]
            },
            "failure_reasons": dict(reasons[m].most_common()),
            "failure_examples": examples[m],
            "seconds": round(timings[m], 2),
        }
    out["measurements"]["wrong"]["attributes"] = {
        a: {"value": v[0] / v[1], "n": v[1]} for a, v in sorted(per_attr.items())
    }
    return out


def report(res: dict) -> None:
    size, ms = res["size"], res["measurements"]
    print(f"\n=== ShapesEval checker at {size}x{size} px, n = {res['n']} per measurement ===")
    header = f"{'task':<14}" + "".join(f"{m + ' (' + ms[m]['metric'] + ')':>28}" for m in TARGETS)
    print(header)
    print("-" * len(header))
    for t in TASKS:
        cells = []
        for m in TARGETS:
            v = ms[m]["tasks"].get(t)
            cells.append(f"{v['value'] * 100:8.2f}% (n={v['n']:4d})" if v else "-")
        print(f"{t:<14}" + "".join(f"{c:>28}" for c in cells))
    print("-" * len(header))
    cells = [f"{ms[m]['value'] * 100:8.2f}% (n={ms[m]['n']:4d})" for m in TARGETS]
    print(f"{'all':<14}" + "".join(f"{c:>28}" for c in cells))
    print("\nwrong renders by changed attribute (rejection rate):")
    for a, v in ms["wrong"]["attributes"].items():
        print(f"  {a:<11} {v['value'] * 100:7.2f}%  (n={v['n']})")
    for m in TARGETS:
        x = ms[m]
        verdict = "met" if x["met"] else "MISSED"
        print(
            f"\n{m}: {x['metric']} {x['value'] * 100:.2f}% ({x['good']}/{x['n']}), "
            f"target {x['target'] * 100:.1f}%: {verdict}; {x['seconds']:.1f} s"
        )
        if x["failure_reasons"]:
            print("  failure reasons (failed attributes: count):")
            for r, k in x["failure_reasons"].items():
                print(f"    {r}: {k}")
            for e in x["failure_examples"]:
                print(f"    e.g. {e}")
        else:
            print("  no failures")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="images per measurement (default 5000)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32], help="image sides (default 32)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the spec and noise draws")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = ap.parse_args(argv)

    results = []
    for size in args.sizes:
        res = measure(args.n, size, args.seed)
        report(res)
        results.append(res)
    if args.json:
        doc = {
            "benchmark": "checker_accuracy",
            "command": " ".join(["python", *sys.argv]),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "noise_std": NOISE_STD,
            "results": results,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0 if all(m["met"] for r in results for m in r["measurements"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
