"""Learning curve of the reward model: agreement with the checker on held-out and unseen prompts as
a function of the number of training prompts.

Reads the projects that ``benchmarks/reward_eval.py`` cached in ``--work`` (run that first). For
each fraction of the training prompts (a seeded random subset per seed; the validation prompts stay
the same), trains the head on the cached embeddings and reports the ROC AUC against the checker on
the held-out seen prompts and on the unseen suite (AUC needs no threshold, so it isolates how well
the reward ranks images of prompts it has not seen).

::

    python benchmarks/reward_curve.py --work /tmp/reward_bench --json reward_curve.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from t2ialign.feedback import FeedbackStore
from t2ialign.reward.eval import roc_auc
from t2ialign.reward.model import EncoderBackbone, build_reward_model
from t2ialign.reward.train import RewardTrainConfig, build_data, fit_head, init_from_similarity, label_scores
from t2ialign.world import check

VARIANTS = {
    "reward": dict(aux=True),
    "reward-no-aux": dict(aux=False),
    "reward-skip-no-aux": dict(aux=False, cosine_skip=True),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/reward_bench", help="the work folder of reward_eval.py")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    if not (work / "train" / "feedback.sqlite").exists():
        raise SystemExit(f"no cached projects in {work}: run benchmarks/reward_eval.py --work {work} first")
    train, test = FeedbackStore.open(work / "train"), FeedbackStore.open(work / "test")
    backbone = EncoderBackbone()
    data = {a: build_data(train, RewardTrainConfig(aux=a, pairs=False), backbone) for a in (True, False)}
    # the test images: every labelled image once, with the checker's verdict
    tdata = build_data(
        test, RewardTrainConfig(aux=False, pairs=False, val_fraction=0.0, holdout_unseen=False), backbone
    )
    recs = list(test.labelled_images(load_images=False))
    truth = np.array([check(test.image(r.generation_id), r.spec).correct for r in recs])
    split = np.array(["heldout" if r.split == "seen" else r.split for r in recs])
    train_prompts = data[True].train_prompts
    results: dict = {"n_train_prompts_total": len(train_prompts), "curves": {}}
    for name, settings in VARIANTS.items():
        for frac in args.fractions:
            aucs = []
            for seed in range(args.seeds):
                cfg = RewardTrainConfig(seed=seed, pairs=False, **settings)
                rng = np.random.default_rng(seed)
                n = max(2, round(frac * len(train_prompts)))
                keep = rng.choice(train_prompts, size=n, replace=False)
                d = data[cfg.aux].restrict(keep)
                model = build_reward_model(
                    backbone, hidden=cfg.hidden, dropout=cfg.dropout, seed=seed, cosine_skip=cfg.cosine_skip
                )
                init_from_similarity(model, d)
                fit_head(model, d, cfg)
                scores = label_scores(model, tdata)
                aucs.append([roc_auc(scores[split == s], truth[split == s]) for s in ("heldout", "unseen")])
            a = np.array(aucs)
            row = {
                "train_prompts": n,
                "train_labels": d.counts["train_labels"],
                "heldout_auc": {"mean": float(a[:, 0].mean()), "std": float(a[:, 0].std())},
                "unseen_auc": {"mean": float(a[:, 1].mean()), "std": float(a[:, 1].std())},
            }
            results["curves"].setdefault(name, []).append(row)
            print(
                f"{name:<20} {n:3d} prompts ({row['train_labels']:3d} labels): AUC vs checker "
                f"held-out {a[:, 0].mean():.3f} +- {a[:, 0].std():.3f}, "
                f"unseen {a[:, 1].mean():.3f} +- {a[:, 1].std():.3f}",
                flush=True,
            )
    cos = (tdata.img_emb[tdata.label_img] * tdata.txt_emb[tdata.label_txt]).sum(-1).numpy()
    results["similarity"] = {s: roc_auc(cos[split == s], truth[split == s]) for s in ("heldout", "unseen")}
    print(
        f"{'similarity':<20} zero-shot: held-out {results['similarity']['heldout']:.3f}, unseen "
        f"{results['similarity']['unseen']:.3f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(2)
    raise SystemExit(main())
