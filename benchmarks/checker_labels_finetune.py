"""Fine-tuning the shipped generator on checker labels (a rater at 10% noise), without a reward
model: how far can a labelled-data method (the seed paper's RWR, or DiffusionNFT's loss on the same
labels) move alignment in this world, with labels as good as a rater makes them?

    OMP_NUM_THREADS=1 python benchmarks/checker_labels_finetune.py --method nft-labelled \
        --task counting --per-prompt 32 --eval-per-prompt 16 --set steps=300 --json F

Generates ``per-prompt`` images per seen-suite prompt (of ``--task`` only, if given; images cached in
``--cache``), labels each with ShapesEval (flipped with probability ``noise``), fine-tunes on them
(weight = label; RWR's pre-training term and EMA as ``--set`` says), and evaluates before and after on
the same prompts (``eval-per-prompt`` images per prompt, fixed seeds 900,000 + i, 20 steps,
guidance 3: the training images use seeds 0, 1, ...).

Controls (``--labels``): ``all`` weights every model image 1 (self-distillation alone, no
selection); ``truth`` trains on true renders of the prompts (what supervised fine-tuning can reach
in the same steps). ``--train-guidance`` sets the guidance the training images are drawn with
(docs/RESULTS.md, "Self-distillation, guidance and the ceiling of 300 steps").
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from t2ialign.algorithms.rwr import WeightedSamples
from t2ialign.backends import ShapesBackend
from t2ialign.cli.finetune import method_config, train_method
from t2ialign.models import load_generator
from t2ialign.pipeline import to_tensor, world_pretrain_source
from t2ialign.sampling import generate_images
from t2ialign.world import Spec, check, suite
from t2ialign.world.imagefolder import summarize
from t2ialign.world.scene import render


def evaluate(gen, rows, per_prompt=2):
    er = [r for r in rows for _ in range(per_prompt)]
    im = generate_images(gen, [r["prompt"] for r in er], [900_000 + i for i in range(len(er))])
    return summarize(
        [
            {"task": r["task"], "split": "seen", "correct": check(x, Spec.from_dict(r["spec"])).correct}
            for x, r in zip(im, er, strict=True)
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=["rwr", "nft-labelled"], default="rwr")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override")
    ap.add_argument("--model", default=None, help="generator folder (default: the shipped model)")
    ap.add_argument("--task", default=None, help="seen-suite prompts of this task only (default: all)")
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--eval-per-prompt", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument(
        "--labels",
        choices=["checker", "all", "truth"],
        default="checker",
        help="controls: checker = the model's images weighted by (noisy) checker labels; all = the "
        "model's images, every weight 1 (self-distillation alone); truth = true renders of the "
        "prompts, weight 1 (supervised fine-tuning: what the model can learn at all)",
    )
    ap.add_argument(
        "--train-guidance", type=float, default=3.0, help="guidance of the generated training images"
    )
    ap.add_argument("--cache", default="/tmp/checker-labels-cache", help="folder of cached training images")
    ap.add_argument("--out", default="/tmp/checker-labels-run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.time()
    seen = [r for r in suite("seen") if args.task is None or r["task"] == args.task]
    if not seen:
        raise SystemExit(f"no seen-suite prompt has task {args.task!r}")
    base = load_generator(args.model)
    rows = [r for r in seen for _ in range(args.per_prompt)]
    if args.labels == "truth":  # true renders, weight 1: no model images to generate or label
        imgs = np.stack([render(Spec.from_dict(r["spec"]), 10_000 + i) for i, r in enumerate(rows)])
        correct = labels = np.ones(len(rows))
    else:
        g = "" if args.train_guidance == 3.0 else f"_g{args.train_guidance:g}"
        cache = Path(args.cache) / f"{base.model_id}_{args.task or 'all'}_{args.per_prompt}{g}.npz"
        if cache.exists():
            imgs = np.load(cache)["images"]
        else:
            imgs = generate_images(
                base, [r["prompt"] for r in rows], list(range(len(rows))), guidance=args.train_guidance
            )
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, images=imgs)
        correct = np.array(
            [float(check(im, Spec.from_dict(r["spec"])).correct) for im, r in zip(imgs, rows, strict=True)]
        )
        flip = np.random.default_rng(0).random(len(correct)) < args.noise
        labels = np.ones_like(correct) if args.labels == "all" else np.where(flip, 1 - correct, correct)
    data = WeightedSamples(
        to_tensor(imgs), [r["prompt"] for r in rows], torch.tensor(labels, dtype=torch.float32)
    )
    cfg = method_config(args.method, args.set)
    if args.method == "rwr":
        from dataclasses import replace

        cfg = replace(cfg, pseudo_fraction=0.0)  # labelled images only
    before = evaluate(base, seen, args.eval_per_prompt)
    shutil.rmtree(args.out, ignore_errors=True)
    t1 = time.time()
    train_method(
        args.method,
        ShapesBackend(load_generator(args.model)),
        cfg,
        args.out,
        labelled=data,
        pretrain_source=world_pretrain_source(),
        progress=False,
    )
    train_s = time.time() - t1
    after = evaluate(load_generator(args.out), seen, args.eval_per_prompt)
    res = {
        "args": vars(args),
        "config": {k: v for k, v in vars(cfg).items()},
        "good_rate": float(correct.mean()),
        "train_s": round(train_s, 1),
        "wall_s": round(time.time() - t0, 1),
    }
    for name, r in (("before", before), ("after", after)):
        res[name] = {
            "overall": r["overall"],
            "n": r["n"],
            "ci95": r["splits"]["seen"]["ci95"],
            "tasks": {t: v["accuracy"] for t, v in r["tasks"].items()},
        }
        print(name, round(r["overall"], 3), {t: round(v["accuracy"], 2) for t, v in r["tasks"].items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
