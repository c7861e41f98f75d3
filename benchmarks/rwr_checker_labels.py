"""Reward-weighted fine-tuning of the shipped generator on checker labels (a rater at 10% noise),
without the reward model: how much can the seed paper's method move alignment in this world?

    OMP_NUM_THREADS=1 python benchmarks/rwr_checker_labels.py --steps 400 --lr 2e-4 --beta 1 \
        --per-prompt 4 --ema 0 --out /tmp/rwr-checker

Generates ``per-prompt`` images per seen-suite prompt, labels each with ShapesEval (flipped with
probability ``noise``), fine-tunes on the labelled samples (weight = label) plus the pre-training
term, and evaluates before and after on the seen suite (2 images per prompt, fixed seeds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import numpy as np
import torch

from t2ialign.algorithms.rwr import RWRConfig, WeightedSamples, train_rwr
from t2ialign.backends import ShapesBackend
from t2ialign.models import load_generator
from t2ialign.pipeline import to_tensor, world_pretrain_source
from t2ialign.sampling import generate_images
from t2ialign.world import Spec, check, suite
from t2ialign.world.imagefolder import summarize


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
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--ema", type=float, default=0.99)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--out", default="/tmp/rwr-checker")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.time()
    seen = suite("seen")
    base = load_generator()
    rows = [r for r in seen for _ in range(args.per_prompt)]
    imgs = generate_images(base, [r["prompt"] for r in rows], list(range(len(rows))))
    correct = np.array(
        [float(check(im, Spec.from_dict(r["spec"])).correct) for im, r in zip(imgs, rows, strict=True)]
    )
    flip = np.random.default_rng(0).random(len(correct)) < args.noise
    labels = np.where(flip, 1 - correct, correct)
    data = WeightedSamples(
        to_tensor(imgs), [r["prompt"] for r in rows], torch.tensor(labels, dtype=torch.float32)
    )
    before = evaluate(base, seen)
    shutil.rmtree(args.out, ignore_errors=True)
    cfg = RWRConfig(
        steps=args.steps,
        batch_size=32,
        pretrain_batch_size=32,
        beta=args.beta,
        pseudo_fraction=0.0,
        lr=args.lr,
        ema=args.ema,
        checkpoint_every=1000,
    )
    train_rwr(
        ShapesBackend(load_generator()),
        cfg,
        data,
        args.out,
        pretrain_source=world_pretrain_source(),
        progress=False,
    )
    after = evaluate(load_generator(args.out), seen)
    res = {"args": vars(args), "good_rate": float(correct.mean()), "wall_s": round(time.time() - t0, 1)}
    for name, r in (("before", before), ("after", after)):
        res[name] = {"overall": r["overall"], "tasks": {t: v["accuracy"] for t, v in r["tasks"].items()}}
        print(name, round(r["overall"], 3), {t: round(v["accuracy"], 2) for t, v in r["tasks"].items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
