"""What labelling buys: the demo's accuracy after fine-tuning against labelled images per prompt, and
relabelling rounds against one round with the same total labels (random and uncertain choice).

    # the budget curve: one round at 1, 3, 6 and 12 labelled images per prompt
    OMP_NUM_THREADS=1 python benchmarks/labelling_budget.py budget --per-prompt 1 3 6 12 \\
        --workdir runs/budget --json runs/budget.json --plot docs/img/labelling_budget.png
    # rounds: 3 rounds of K per prompt (random, then uncertain) against 1 round of 3K per prompt
    OMP_NUM_THREADS=1 python benchmarks/labelling_budget.py rounds --per-prompt 2 --rounds 3 \\
        --workdir runs/rounds --json runs/rounds.json

Every run is ``t2ialign demo`` (``--quick`` with ``--quick``) in a folder of its own under
``--workdir``, from the same base model, seeds and settings but the labels; a killed benchmark
resumes (finished runs are read back, a killed one resumes with ``demo --resume``). Extra arguments
after ``--`` go to every demo (for example ``-- --model runs/gen_web2 --encoder runs/enc_web2``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def demo(out: Path, args: list[str]) -> dict:
    """Run (or resume, or read back) one demo in ``out``; its results.json."""
    if not (out / "results.json").exists():
        resume = ["--resume"] if (out / "demo_config.json").exists() else []
        cmd = [sys.executable, "-m", "t2ialign", "demo", "--out", str(out), *args, *resume]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())


def summary(res: dict) -> dict:
    seen, unseen = res["after"]["seen"], res["after"]["unseen"]
    return {
        "labelled_images": res["rounds"][-1]["labelled_images"],
        "rounds": [
            {k: r[k] for k in ("round", "labelled_images", "seen", "seen_ci95", "unseen", "fid_seen")}
            for r in res["rounds"]
        ],
        "seen": seen["overall"],
        "seen_ci95": seen["splits"]["seen"]["ci95"],
        "seen_n": seen["n"],
        "unseen": unseen["overall"],
        "unseen_ci95": unseen["splits"]["unseen"]["ci95"],
        "counting": seen["tasks"].get("counting", {}).get("accuracy"),
        "fid_seen": seen["fid"],
        "base_seen": res["before"]["seen"]["overall"],
        "base_unseen": res["before"]["unseen"]["overall"],
        "base_fid_seen": res["before"]["seen"]["fid"],
        "wall_seconds": res["wall_seconds"],
    }


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    k = [r["per_prompt"] for r in rows]
    for key, label in (("seen", "seen prompts"), ("unseen", "unseen prompts")):
        y = [r[key] for r in rows]
        lo = [r[key] - r[f"{key}_ci95"][0] for r in rows]
        hi = [r[f"{key}_ci95"][1] - r[key] for r in rows]
        ax.errorbar(k, y, yerr=[lo, hi], marker="o", capsize=3, label=f"fine-tuned, {label}")
        ax.axhline(
            rows[0][f"base_{key}"], ls="--", lw=1, color=ax.lines[-1].get_color(), label=f"base, {label}"
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(k, [str(v) for v in k])
    ax.set_xlabel("labelled images per prompt")
    ax.set_ylabel("checker accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["budget", "rounds"])
    ap.add_argument("--per-prompt", type=int, nargs="+", required=True)
    ap.add_argument("--rounds", type=int, default=3, help="rounds mode: rounds of --per-prompt each")
    ap.add_argument("--quick", action="store_true", help="every demo with --quick")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="budget mode: the curve as a PNG")
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"] + (["--quick"] if args.quick else [])
    work = Path(args.workdir)
    rows = []
    if args.mode == "budget":
        for k in args.per_prompt:
            res = demo(work / f"k{k}", ["--feedback-per-prompt", str(k), *extra])
            rows.append({"per_prompt": k, **summary(res)})
            print(json.dumps(rows[-1]), flush=True)
        if args.plot:
            plot(rows, args.plot)
    else:
        (k,) = args.per_prompt
        runs = {
            f"1 round x {args.rounds * k}": ["--feedback-per-prompt", str(args.rounds * k)],
            f"{args.rounds} rounds x {k}, random": [
                "--feedback-per-prompt",
                str(k),
                "--rounds",
                str(args.rounds),
            ],
            f"{args.rounds} rounds x {k}, uncertain": [
                "--feedback-per-prompt",
                str(k),
                "--rounds",
                str(args.rounds),
                "--select",
                "uncertain",
            ],
        }
        for i, (name, flags) in enumerate(runs.items()):
            res = demo(work / f"run{i}", [*flags, *extra])
            rows.append({"run": name, **summary(res)})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        out = {"mode": args.mode, "command": " ".join(sys.argv), "runs": rows}
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
