"""Tables of the misaligned fixture's RWR runs (``tests/misaligned_fixture.py --rwr --json F``).

Reads every ``*.json`` of a folder written by that command and prints two markdown tables: the
checker's accuracy before and after, per attribute, for each recipe (beta, labelled samples, steps,
lr, the condition dropout of the labelled and of the pre-training term) over seeds (mean, and the
95% Wilson interval of the pooled images), and each run on its own::

    python benchmarks/fixture_table.py runs/fx
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from t2ialign.world.imagefolder import wilson_interval

ATTRS = ("overall", "background", "shape", "color", "count")


def recipe(r: dict) -> tuple:
    """What a run's settings are, seed aside."""
    c = r["config"]
    return (
        c["steps"],
        c["lr"],
        c.get("cond_dropout", 0.0),
        r.get("pre_dropout", 0.0),
        r["labelled"],
        c["beta"],
    )


def label(r: dict) -> str:
    steps, lr, cd, pd, n, beta = recipe(r)
    return f"beta {beta:g}, {n} labelled, {steps} steps at lr {lr:g}, dropout {cd:g} / {pd:g}"


def cell(values: list[float], n: int) -> str:
    """Mean of per-run rates over ``n`` images each, the Wilson interval of the pooled count (the
    images' noise, not the seeds') and, over several runs, their range (the seeds')."""
    k = round(sum(values) * n)
    lo, hi = wilson_interval(k, n * len(values))
    spread = f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
    return f"{sum(values) / len(values):.3f} [{lo:.2f}, {hi:.2f}]{spread}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    args = ap.parse_args(argv)
    runs = [json.loads(p.read_text()) for p in sorted(Path(args.folder).glob("*.json"))]
    if not runs:
        raise SystemExit(f"no *.json in {args.folder}")
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(recipe(r), []).append(r)
    base = runs[0]["before"]
    if any(r["before"] != base and r["eval_n"] == runs[0]["eval_n"] for r in runs):
        raise SystemExit("runs evaluate different bases")
    n_eval = runs[0]["eval_n"]
    print("| run | seeds | " + " | ".join(ATTRS) + " | labelled good |")
    print("|---|---|" + "---|" * len(ATTRS) + "---|")
    print(f"| base (n = {n_eval}) | - | " + " | ".join(cell([base[a]], n_eval) for a in ATTRS) + " | |")
    for _key, rs in sorted(groups.items()):
        seeds = ",".join(str(r["config"]["seed"]) for r in rs)
        cells = " | ".join(cell([r["after"][a] for r in rs], rs[0]["eval_n"]) for a in ATTRS)
        good = sum(r["good_rate"] for r in rs) / len(rs)
        print(f"| {label(rs[0])} | {seeds} | {cells} | {good:.3f} |")
    print()
    print("| run | seed | " + " | ".join(ATTRS) + " | seconds |")
    print("|---|---|" + "---|" * len(ATTRS) + "---|")
    for r in sorted(runs, key=lambda r: (recipe(r), r["config"]["seed"])):
        vals = " | ".join(f"{r['after'][a]:.3f}" for a in ATTRS)
        print(f"| {label(r)} | {r['config']['seed']} | {vals} | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
