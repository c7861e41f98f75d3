"""How well does the learned reward agree with the labels and with the ShapesEval checker?

The seed paper's setting in the shapes world:

1. prompts: the seen suite, split by prompt into a training project (75%) and held-out prompts
   (25%); the unseen suite (prompts about held-out colour/shape and count/colour combinations);
2. images: the shipped generator, ``--per-prompt`` images per prompt (seeds 0..N-1), 20 Euler steps,
   guidance 3;
3. labels: the simulated oracle rater (``feedback.simulate``) with ``--noise`` (10%): one label per
   image, on every project (the labels of the test project are only used for evaluation), and
   every pairwise comparison of two images of one prompt on the training project;
4. reward models (``t2ialign.reward``), trained on the training project (validation: 20% of its
   prompts, early stopping, threshold chosen on validation), ``--seeds`` initialisations each:
   - ``reward``: MLP on [img, txt, img * txt], MSE + 0.5 * prompt classification (T = 2), as
     published;
   - ``reward-no-aux``: MSE only (the ablation);
   - ``reward+pairs``: ``reward`` plus the Bradley-Terry loss on the comparisons;
   - ``product-no-aux``, ``product-skip-no-aux``: the MLP on ``img * txt`` alone (``features``
     ``product``), without and with the skip connection, no auxiliary loss;
   - ``reward-skip``, ``reward-skip-no-aux``: the head with a skip connection from the cosine
     similarity (``cosine_skip``: starts as the least-squares fit of the labels on the similarity);
   - ``similarity``: the frozen encoder's zero-shot cosine similarity (the baseline; threshold and a
     Platt calibration fitted on the same validation labels);
   - ``similarity-all-labels``: the same scores, threshold and calibration fitted on all the
     training project's labels (it trains nothing, so it needs no validation split);
   - ``checker``: the checker itself against the labels, the ceiling that label noise allows.
5. metrics per split (``t2ialign.reward.eval``): accuracy, ROC AUC and calibration error (ECE),
   against the labels and against the checker, on ``val`` (validation prompts of the training
   project), ``heldout`` (held-out prompts of the seen suite) and ``unseen`` (the unseen suite).

Images and labels are cached in ``--work`` (feedback projects), so a rerun only trains and scores.
``--encoder FOLDER`` replaces the shipped encoder (the frozen backbone of every reward variant and of
``similarity``) by another encoder folder of the same kind; the reward heads then go to
``models-<fingerprint of its weights>`` so that they never overwrite those of another encoder
(embeddings are recomputed on every run, never cached on disk).

::

    python benchmarks/reward_eval.py --work /tmp/reward_bench --per-prompt 6 --json reward_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from t2ialign.feedback import FeedbackStore
from t2ialign.feedback.simulate import SimulatedRater, simulate
from t2ialign.models import load_generator
from t2ialign.reward.eval import choose_threshold, evaluate_scores, fit_platt, score_project
from t2ialign.reward.model import EncoderBackbone
from t2ialign.reward.rewards import ModelReward, SimilarityReward, checker_reward
from t2ialign.reward.train import RewardTrainConfig, split_prompts, train_reward_model
from t2ialign.sampling import generate_images
from t2ialign.world import suite

TARGET_UNSEEN_CHECKER_ACCURACY = 0.90
HELDOUT_FRACTION = 0.25
STEPS, GUIDANCE = 20, 3.0


def extra_prompts(n: int) -> list[dict]:
    """``n`` more training prompts of the seen split that are not in the seen suite (so never among
    the held-out or unseen test prompts): round robin over the tasks, each task's remaining specs in
    a fixed shuffled order."""
    import random

    from t2ialign.world.grammar import to_prompt
    from t2ialign.world.suites import TASKS, enumerate_specs, split_of

    in_suite = {r["prompt"] for r in suite("seen")}
    pools = {}
    for task in TASKS:
        specs = [s for s in enumerate_specs(task) if split_of(s) == "seen" and to_prompt(s) not in in_suite]
        random.Random(f"extra-{task}").shuffle(specs)
        pools[task] = [
            {"prompt": to_prompt(s), "spec": s.to_dict(), "task": task, "split": "seen"} for s in specs
        ]
    out: list[dict] = []
    while len(out) < n and any(pools.values()):
        for task in TASKS:
            if pools[task] and len(out) < n:
                out.append(pools[task].pop(0))
    return out


def build_projects(
    work: Path,
    per_prompt: int,
    noise: float,
    batch: int,
    device: str = "cpu",
    extra: int = 0,
    extra_per_prompt: int = 3,
    test_per_prompt: int | None = None,
    model_path: str | None = None,
) -> tuple[FeedbackStore, FeedbackStore]:
    """The training project (seen-suite training prompts, plus ``extra`` more seen-split prompts
    with ``extra_per_prompt`` images each) and the test project (held-out seen prompts and the
    unseen suite, ``test_per_prompt`` images each, default ``per_prompt``), generated and labelled
    (cached)."""
    seen = suite("seen")
    train_p, held_p = split_prompts([r["prompt"] for r in seen], HELDOUT_FRACTION, seed=2023)
    train_set = set(train_p)
    rows = {
        "train": [r for r in seen if r["prompt"] in train_set],
        "test": [r for r in seen if r["prompt"] not in train_set] + suite("unseen"),
    }
    n_images = {r["prompt"]: per_prompt for r in rows["train"]}
    n_images.update({r["prompt"]: test_per_prompt or per_prompt for r in rows["test"]})
    if extra:
        more = extra_prompts(extra)
        rows["train"] = rows["train"] + more
        n_images.update({r["prompt"]: extra_per_prompt for r in more})
    model = load_generator(model_path, device=device)
    settings = {"steps": STEPS, "guidance": GUIDANCE}
    stores = {}
    for name, prompts in rows.items():
        path = work / name
        store = (
            FeedbackStore.open(path) if (path / "feedback.sqlite").exists() else FeedbackStore.create(path, 1)
        )
        others = {g["model_id"] for g in store.generations()} - {model.model_id}
        if others:
            raise SystemExit(
                f"{path} holds images of other generators {sorted(others)}; use another --work for "
                f"{model.model_id}"
            )
        todo = [
            (r, s)
            for r in prompts
            for s in range(n_images[r["prompt"]])
            if store.find_generation(model.model_id, r["prompt"], s, settings) is None
        ]
        t0 = time.time()
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            imgs = generate_images(
                model, [r["prompt"] for r, _ in chunk], [s for _, s in chunk], steps=STEPS, guidance=GUIDANCE
            )
            store.add_generations(
                [
                    dict(
                        image=im,
                        prompt=r["prompt"],
                        spec=r["spec"],
                        model_id=model.model_id,
                        seed=s,
                        settings=settings,
                    )
                    for im, (r, s) in zip(imgs, chunk, strict=True)
                ]
            )
            done = i + len(chunk)
            rate = done / max(time.time() - t0, 1e-9)
            print(f"  {name}: generated {done}/{len(todo)} images ({rate:.2f} images/s)", flush=True)
        # labels on every image; pairwise comparisons (all pairs of a prompt's images) on the
        # training project only, for the Bradley-Terry variant
        res = simulate(store, SimulatedRater("oracle", noise=noise, seed=0), pairs=name == "train")
        print(
            f"  {name}: {store.counts()['generations']} images, {res['labels']} new labels, "
            f"{res['comparisons']} new comparisons",
            flush=True,
        )
        stores[name] = store
    return stores["train"], stores["test"]


def oracle_accuracy(parts, split_lists) -> dict:
    """Per split: agreement with the checker at the threshold that maximises it on that split itself.
    Not an evaluation (the threshold sees the answers): a ceiling of what the ranking allows."""
    from t2ialign.reward.eval import choose_threshold, split_names

    scores, names, truth = [], [], []
    for ps in parts:
        keep = [c is not None for c in ps.checker]
        scores += [s for s, k in zip(ps.scores, keep, strict=True) if k]
        names += [n for n, k in zip(split_names(ps, *split_lists), keep, strict=True) if k]
        truth += [bool(c) for c in ps.checker if c is not None]
    scores, names, truth = np.array(scores), np.array(names), np.array(truth)
    out = {}
    for split in ("val", "heldout", "unseen"):
        m = names == split
        if m.any():
            t = choose_threshold(scores[m], truth[m])
            out[split] = {"threshold": t, "accuracy": float(((scores[m] >= t) == truth[m]).mean())}
    return out


def training_labels(ps, split_lists) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels of every labelled image of the training project's training and validation
    prompts."""
    from t2ialign.reward.eval import split_names

    names = np.array(split_names(ps, *split_lists))[ps.label_index]
    keep = np.isin(names, ["train", "val"])
    return ps.scores[ps.label_index][keep], ps.label_values[keep]


def per_task(parts, split_lists, threshold, stores) -> dict:
    """Accuracy against the checker per task, on the unseen and held-out splits."""
    from t2ialign.reward.eval import split_names

    out: dict = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for ps, store in zip(parts, stores, strict=True):
        names = split_names(ps, *split_lists)
        for i, gid in enumerate(ps.gids):
            if ps.checker[i] is None or names[i] not in ("heldout", "unseen"):
                continue
            task = store.generation(gid)["task"]
            cell = out[names[i]][task]
            cell[0] += int((ps.scores[i] >= threshold) == ps.checker[i])
            cell[1] += 1
    return {s: {t: {"accuracy": a / n, "n": n} for t, (a, n) in sorted(d.items())} for s, d in out.items()}


def summarise(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of each (split, against, metric)."""
    out: dict = {}
    for split in runs[0]["splits"]:
        for against in ("labels", "checker"):
            for metric in ("accuracy", "auc", "ece"):
                vals = [r["splits"][split][against].get(metric) for r in runs if split in r["splits"]]
                vals = [v for v in vals if v is not None]
                if vals:
                    out.setdefault(split, {}).setdefault(against, {})[metric] = {
                        "mean": float(np.mean(vals)),
                        "std": float(np.std(vals)),
                        "n_seeds": len(vals),
                    }
            out[split][against]["n"] = runs[0]["splits"][split][against]["n"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/reward_bench", help="cache folder for the projects and models")
    ap.add_argument("--per-prompt", type=int, default=6, help="generated images per prompt")
    ap.add_argument("--noise", type=float, default=0.1, help="label noise of the simulated rater")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per reward variant")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64, help="generation batch size")
    ap.add_argument("--gen-device", default="cpu", help="device of the generator (cpu or cuda)")
    ap.add_argument(
        "--test-per-prompt",
        type=int,
        default=None,
        help="generated images per prompt of the test project (default: --per-prompt)",
    )
    ap.add_argument("--extra-prompts", type=int, default=0, help="more seen-split training prompts")
    ap.add_argument("--extra-per-prompt", type=int, default=3, help="images per extra training prompt")
    ap.add_argument("--variants", default=None, help="comma-separated reward variants (default: all)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--only-data", action="store_true", help="stop after generating and labelling")
    ap.add_argument(
        "--encoder",
        default=None,
        help="encoder folder for every reward and the similarity (default: shipped)",
    )
    ap.add_argument(
        "--model",
        default=None,
        help="generator folder whose images are labelled (default: shipped); one --work per model",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t_start = time.time()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print("1. images and labels", flush=True)
    train_store, test_store = build_projects(
        work,
        args.per_prompt,
        args.noise,
        args.batch,
        args.gen_device,
        extra=args.extra_prompts,
        extra_per_prompt=args.extra_per_prompt,
        test_per_prompt=args.test_per_prompt,
        model_path=args.model,
    )
    t_data = time.time() - t_start
    if args.only_data:
        print(f"data ready in {t_data:.0f} s")
        return 0

    backbone = EncoderBackbone(args.encoder)
    models_dir = work / ("models" if args.encoder is None else f"models-{backbone.fingerprint}")
    print(f"encoder: {backbone.reference()}", flush=True)
    verdicts: dict = {}  # the checker's verdict per (image, prompt), shared by all scorings
    variants = {  # name -> RewardTrainConfig settings
        "reward": dict(aux=True),
        "reward-no-aux": dict(aux=False),
        "reward+pairs": dict(aux=True, pairs=True),
        "reward-skip": dict(aux=True, cosine_skip=True),
        "reward-skip-no-aux": dict(aux=False, cosine_skip=True),
        "product-no-aux": dict(aux=False, features="product"),
        "product-skip-no-aux": dict(aux=False, features="product", cosine_skip=True),
    }
    if args.variants:
        unknown = set(args.variants.split(",")) - set(variants)
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    results: dict = {"runs": {}, "summary": {}, "per_task": {}, "oracle_threshold": {}}
    split_lists = None
    print("2. reward models", flush=True)
    for name, settings in variants.items():
        runs = []
        for seed in range(args.seeds):
            cfg = RewardTrainConfig(hidden=args.hidden, seed=seed, **({"pairs": False} | settings))
            out = models_dir / f"{name}-seed{seed}"
            model = train_reward_model(
                train_store, cfg, out=out, progress=False, backbone=backbone, name=name
            )
            card = model.card
            split_lists = (card["split"]["train_prompts"], card["split"]["val_prompts"])
            fn = ModelReward(model)
            parts = [score_project(s, fn, checker_cache=verdicts) for s in (train_store, test_store)]
            res = evaluate_scores(parts, *split_lists, threshold=card["metrics"]["threshold"])
            res["epochs"], res["best_epoch"] = card["epochs"], card["best_epoch"]
            if seed == 0:
                results["oracle_threshold"][name] = oracle_accuracy(parts, split_lists)
                results["per_task"][name] = per_task(
                    parts, split_lists, res["threshold"], [train_store, test_store]
                )
            runs.append(res)
            u = res["splits"]["unseen"]["checker"]["accuracy"]
            h = res["splits"]["heldout"]["checker"]["accuracy"]
            print(
                f"  {name} seed {seed}: best epoch {card['best_epoch']}; vs checker: held-out {h:.3f}, "
                f"unseen {u:.3f}"
            )
        results["runs"][name] = runs
        results["summary"][name] = summarise(runs)

    print("3. baselines", flush=True)
    sim = SimilarityReward(backbone)
    parts = [score_project(s, sim, checker_cache=verdicts) for s in (train_store, test_store)]
    res = evaluate_scores(parts, *split_lists, calibration="platt")
    results["runs"]["similarity"] = [res]
    results["summary"]["similarity"] = summarise([res])
    results["oracle_threshold"]["similarity"] = oracle_accuracy(parts, split_lists)
    results["per_task"]["similarity"] = per_task(
        parts, split_lists, res["threshold"], [train_store, test_store]
    )
    # the similarity trains nothing on the labels, so its threshold and calibration may use all of
    # the training project's labels (training and validation prompts), not only the validation ones
    scores, labels = training_labels(parts[0], split_lists)
    res = evaluate_scores(
        parts,
        *split_lists,
        threshold=choose_threshold(scores, labels),
        calibration="platt",
        platt=fit_platt(scores, labels),
    )
    results["runs"]["similarity-all-labels"] = [res]
    results["summary"]["similarity-all-labels"] = summarise([res])
    parts = [score_project(s, checker_reward, checker_cache=verdicts) for s in (train_store, test_store)]
    res = evaluate_scores(parts, *split_lists, threshold=0.5)
    results["runs"]["checker"] = [res]
    results["summary"]["checker"] = summarise([res])

    # table
    print()
    cols = [
        ("val", "labels"),
        ("heldout", "labels"),
        ("unseen", "labels"),
        ("heldout", "checker"),
        ("unseen", "checker"),
    ]
    head = "reward".ljust(22) + "  ".join(f"{s[:7]}/{a[:5]}".ljust(16) for s, a in cols)
    for metric in ("accuracy", "auc", "ece"):
        print(f"{metric}:")
        print(head)
        for name, summ in results["summary"].items():
            cells = []
            for s, a in cols:
                m = summ.get(s, {}).get(a, {}).get(metric)
                cells.append("-".ljust(16) if m is None else f"{m['mean']:.3f} +- {m['std']:.3f}".ljust(16))
            print(f"{name:<22}" + "  ".join(cells))
        print()
    first = next(iter(variants))
    n = {s: results["summary"][first][s]["checker"]["n"] for s in ("val", "heldout", "unseen")}
    print(f"images: {n}; label noise {args.noise}; per prompt {args.per_prompt}")
    print("agreement with the checker at the threshold best for each split itself (a ceiling, seed 0):")
    for name, o in results["oracle_threshold"].items():
        print(f"  {name:<20}" + "  ".join(f"{s} {v['accuracy']:.3f}" for s, v in o.items()))
    unseen = {
        name: summ["unseen"]["checker"]["accuracy"]["mean"]
        for name, summ in results["summary"].items()
        if name in variants
    }
    main_name = "reward" if "reward" in unseen else first
    unseen_acc = unseen[main_name]
    met = unseen_acc >= TARGET_UNSEEN_CHECKER_ACCURACY
    best = max(unseen, key=unseen.get)
    print(
        f"target: agreement with the checker on unseen-suite images >= {TARGET_UNSEEN_CHECKER_ACCURACY:.0%}: "
        f"{main_name} {unseen_acc:.1%} ({'met' if met else 'missed'}); best variant {best} {unseen[best]:.1%}"
    )
    results.update(
        {
            "settings": vars(args)
            | {"steps": STEPS, "guidance": GUIDANCE, "heldout_fraction": HELDOUT_FRACTION},
            "encoder": backbone.reference(),
            "counts": {"train_project": train_store.counts(), "test_project": test_store.counts()},
            "target_unseen_checker_accuracy": TARGET_UNSEEN_CHECKER_ACCURACY,
            "target_met": bool(met),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
            "wall_time_s": {"data": round(t_data, 1), "total": round(time.time() - t_start, 1)},
        }
    )
    print(f"wall time: {results['wall_time_s']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
