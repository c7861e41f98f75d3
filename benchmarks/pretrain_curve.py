"""A pre-training curve and the web base's gap to the exact-caption ceiling, from eval_generator JSONs.

Each ``--eval`` is ``LABEL=PATH`` of a ``benchmarks/eval_generator.py --json`` file (one per
snapshot of a ``t2ialign pretrain --snapshots ...`` run, or per model). ``--ceiling LABEL`` names the
exact-caption model; ``--base LABEL`` the web-trained one. Prints, per split, the overall accuracy
and FID of every model, then per task the base, the ceiling and the gap (ceiling - base), and writes
it all to ``--json``.

::

    python benchmarks/eval_generator.py --model runs/gen_web/step1000 --per-prompt 8 \\
        --overhead-reps 0 --pretrain-steps 0 --json runs/eval_web_1000.json   # one per snapshot
    python benchmarks/pretrain_curve.py --eval web@1000=runs/eval_web_1000.json \\
        --eval exact@1000=runs/eval_exact_1000.json --base web@1000 --ceiling exact@1000
"""

from __future__ import annotations

import argparse
import json
import sys


def _pct(b: dict) -> str:
    lo, hi = b["ci95"]
    return f"{100 * b['accuracy']:5.1f} [{100 * lo:4.1f}, {100 * hi:4.1f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval", action="append", required=True, help="LABEL=PATH of an eval_generator JSON")
    ap.add_argument("--base", default=None, help="label of the web-trained base")
    ap.add_argument("--ceiling", default=None, help="label of the exact-caption ceiling")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    evals = {}
    for item in args.eval:
        label, sep, path = item.partition("=")
        if not sep:
            ap.error(f"--eval takes LABEL=PATH, got {item!r}")
        with open(path) as f:
            evals[label] = json.load(f)
    for name in (args.base, args.ceiling):
        if name is not None and name not in evals:
            ap.error(f"{name!r} is not one of the --eval labels {list(evals)}")
    out: dict = {"models": {}}
    print(f"{'model':<14} {'seen overall':<22} {'unseen overall':<22} {'FID':>6}  images/prompt")
    for label, e in evals.items():
        ev = e["shapes_eval"]
        seen, unseen = ev["seen"], ev["unseen"]
        row = {
            "seen": seen["overall"],
            "unseen": unseen["overall"],
            "seen_n": seen["n"],
            "fid": e["fid"]["generator_vs_true"],
            "fid_floor": e["fid"]["floor_true_vs_true"],
            "per_prompt": e["settings"]["per_prompt"],
            "model_id": e["generator"]["model_id"],
        }
        out["models"][label] = row
        sb = {"accuracy": seen["overall"], "ci95": _overall_ci(seen)}
        ub = {"accuracy": unseen["overall"], "ci95": _overall_ci(unseen)}
        print(f"{label:<14} {_pct(sb):<22} {_pct(ub):<22} {row['fid']:6.1f}  {row['per_prompt']}")
    if args.base and args.ceiling:
        gap: dict = {}
        for split in ("seen", "unseen"):
            b, c = evals[args.base]["shapes_eval"][split], evals[args.ceiling]["shapes_eval"][split]
            print(f"\n{split}: {args.base} against {args.ceiling}")
            print(f"  {'task':<14} {'base':<20} {'ceiling':<20} gap (points)")
            gap[split] = {"overall": 100 * (c["overall"] - b["overall"])}
            for task in c["tasks"]:
                tb, tc = b["tasks"][task], c["tasks"][task]
                g = 100 * (tc["accuracy"] - tb["accuracy"])
                gap[split][task] = g
                print(f"  {task:<14} {_pct(tb):<20} {_pct(tc):<20} {g:+.1f}")
            print(
                f"  {'overall':<14} {100 * b['overall']:5.1f}{'':<15} {100 * c['overall']:5.1f}{'':<15} "
                f"{gap[split]['overall']:+.1f}"
            )
        out["gap"] = {"base": args.base, "ceiling": args.ceiling, "points": gap}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def _overall_ci(ev: dict) -> list[float]:
    from t2ialign.world.imagefolder import wilson_interval

    n = ev["n"]
    return list(wilson_interval(round(ev["overall"] * n), n))


if __name__ == "__main__":
    sys.exit(main())
