"""``t2ialign world ...`` and ``t2ialign eval``: the shapes world and ShapesEval from the shell."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from t2ialign.cli.common import add_command, print_table


def add_parsers(sub) -> None:
    w = sub.add_parser(
        "world",
        help="the embedded shapes world: prompt suites, renders, a showcase",
        description="The embedded shapes world: prompt suites, renders, a showcase.",
        epilog="example:\n  t2ialign world prompts --suite seen --out seen.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    wsub = w.add_subparsers(dest="world_command", metavar="WHAT", required=True)

    p = add_command(
        wsub,
        "prompts",
        cmd_prompts,
        "write a prompt suite as JSONL",
        "t2ialign world prompts --suite unseen --out unseen.jsonl",
    )
    p.add_argument("--suite", choices=["seen", "unseen"], required=True)
    p.add_argument("--out", required=True, help="output .jsonl file")

    p = add_command(
        wsub,
        "render",
        cmd_render,
        "render true images of prompts into an image folder",
        "t2ialign world render --prompts seen.jsonl --per-prompt 4 --out renders/",
    )
    p.add_argument("--prompts", required=True, help="prompts .jsonl (from 'world prompts')")
    p.add_argument("--per-prompt", type=int, default=4)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (32 or 64)")
    p.add_argument("--seed", type=int, default=0, help="first seed; image k uses seed + k")

    p = add_command(
        wsub,
        "showcase",
        cmd_showcase,
        "a labelled grid of renders, one per task",
        "t2ialign world showcase --out showcase.png",
    )
    p.add_argument("--out", default="showcase.png")
    p.add_argument("--size", type=int, default=32)

    p = add_command(
        wsub,
        "captions",
        cmd_captions,
        "caption a stream of random scenes as the web would, and print how often each attribute is "
        "stated truly",
        "t2ialign world captions --noise web --n 20000 --out web_captions.jsonl",
    )
    p.add_argument("--noise", default="web", choices=["web", "exact"], help="caption noise preset")
    p.add_argument("--n", type=int, default=20000, help="scenes to caption")
    p.add_argument("--seed", type=int, default=0, help="seeds the scenes and the noise")
    p.add_argument(
        "--out", default=None, help="write the captions with their true and stated specs here (.jsonl)"
    )

    p = add_command(
        wsub,
        "check",
        cmd_check,
        "check one image against a prompt, with reasons",
        't2ialign world check image.png "two blue circles on a black background"',
    )
    p.add_argument("image")
    p.add_argument("prompt")

    p = add_command(
        sub,
        "eval",
        cmd_eval,
        "score image folders: ShapesEval for prompts of the shapes world (writes DIR/eval.json), or, "
        "for free-text prompts, a learned reward and a CLIP score per prompt group and the reward's "
        "agreement with held-out human labels (a before/after report)",
        "t2ialign eval --images samples/\n"
        "  t2ialign eval --images before/ after/ --reward runs/reward --clip models/clip "
        "--project proj --report report.md",
    )
    p.add_argument("--images", required=True, nargs="+", help="image folder(s) with manifest.jsonl")
    p.add_argument("--reward", default=None, help="a learned reward folder ('reward train'): its scores")
    p.add_argument("--clip", default=None, help="a local CLIPModel folder: the CLIP score (cosine)")
    p.add_argument(
        "--project",
        default=None,
        help="a feedback project: the scores' agreement with its held-out human labels (prompts the "
        "reward did not train on)",
    )
    p.add_argument("--by", default="group", help="the metadata key that groups prompts (default group)")
    p.add_argument("--json", default=None, help="free text: write every figure to this JSON file")
    p.add_argument("--report", default=None, help="free text: write the before/after report (Markdown)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def cmd_prompts(args) -> int:
    from t2ialign.world.imagefolder import write_prompts
    from t2ialign.world.suites import suite

    rows = suite(args.suite)
    write_prompts(rows, args.out)
    print(f"wrote {len(rows)} {args.suite} prompts to {args.out}")
    return 0


def cmd_render(args) -> int:
    from tqdm import tqdm

    from t2ialign.world.imagefolder import MANIFEST, read_prompts, save_image, write_prompts
    from t2ialign.world.scene import render
    from t2ialign.world.spec import Spec

    if args.per_prompt < 1:
        raise ValueError("--per-prompt must be at least 1")
    if args.size < 16:  # before any output: render() would fail only after the folder is made
        raise ValueError(f"--size must be at least 16 pixels, got {args.size}")
    rows = read_prompts(args.prompts, require_spec=True)  # rendering draws the spec
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    k = 0
    for r in tqdm(rows, desc="render", unit="prompt"):
        spec = Spec.from_dict(r["spec"])
        for _ in range(args.per_prompt):
            seed = args.seed + k
            name = f"{k:06d}.png"
            save_image(render(spec, seed, args.size), out / name)
            manifest.append(
                {
                    "file": name,
                    "prompt": r["prompt"],
                    "spec": r["spec"],
                    "task": r["task"],
                    "split": r["split"],
                    "seed": seed,
                }
            )
            k += 1
    write_prompts(manifest, out / MANIFEST)
    print(f"wrote {k} images and {MANIFEST} to {out}")
    return 0


def cmd_showcase(args) -> int:
    from t2ialign.world.grammar import to_prompt
    from t2ialign.world.scene import random_spec, render
    from t2ialign.world.viz import labelled_grid
    from t2ialign.world.vocab import TASKS

    rng = np.random.default_rng(0)
    images, captions = [], []
    for task in TASKS:
        for i in range(3):
            spec = random_spec(rng, task)
            images.append(render(spec, seed=i, size=args.size))
            captions.append(to_prompt(spec))
    labelled_grid(images, captions, cols=6).save(args.out)
    print(f"wrote {args.out}: {len(images)} renders, three per task ({', '.join(TASKS)})")
    return 0


def cmd_captions(args) -> int:
    import json

    from t2ialign.world.captions import caption_accuracy, caption_preset, caption_spec
    from t2ialign.world.grammar import to_prompt
    from t2ialign.world.scene import random_spec

    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    noise = caption_preset(args.noise)
    rng, crng = np.random.default_rng([args.seed, 0]), np.random.default_rng([args.seed, 1])
    pairs = []
    for _ in range(args.n):
        spec = random_spec(rng)
        pairs.append((spec, caption_spec(spec, noise, crng)))
    acc = caption_accuracy(pairs)
    configured = noise.configured_accuracy()
    rows = [
        [a, f"{v['accuracy']:.3f}", "-" if configured.get(a) is None else f"{configured[a]:.3f}", v["n"]]
        for a, v in acc.items()
    ]
    print(f"{args.noise} captions of {args.n} random scenes (seed {args.seed}): how often each is true")
    print_table(["attribute", "caption accuracy", "configured", "n"], rows)
    by_task: dict[str, list[int]] = {}
    for true, cap in pairs:
        by_task.setdefault(cap.task, []).append(int(cap == true))
    print("\ncaption precision: of the captions of each task, the share whose scene is the one stated")
    print_table(
        ["task of the caption", "precision", "n"],
        [[t, f"{np.mean(v):.3f}", len(v)] for t, v in sorted(by_task.items())],
    )
    if args.out:
        with open(args.out, "w") as f:
            for true, cap in pairs:
                row = {
                    "caption": to_prompt(cap),
                    "prompt": to_prompt(true),
                    "task": true.task,
                    "spec": true.to_dict(),
                    "caption_spec": cap.to_dict(),
                }
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(pairs)} captions with their true and stated specs to {args.out}")
    return 0


def cmd_check(args) -> int:
    from t2ialign.world.checker import check
    from t2ialign.world.imagefolder import load_image

    res = check(load_image(args.image), args.prompt)
    print(f"{'MATCH' if res.correct else 'NO MATCH'} ({res.task})")
    for attr, ok in res.ok.items():
        print(f"  {'ok ' if ok else 'BAD'} {attr}: {res.reasons[attr]}")
    return 0 if res.correct else 1


def cmd_eval(args) -> int:
    if args.reward or args.clip:
        return _eval_free_text(args)
    if args.project or args.json or args.report:
        raise ValueError("--project, --json and --report go with --reward or --clip (free-text evaluation)")
    from t2ialign.world.imagefolder import evaluate_folder

    for folder in args.images:
        s = evaluate_folder(folder)
        rows = [
            [t, f"{v['accuracy']:.3f}", f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]", v["n"]]
            for t, v in s["tasks"].items()
        ]
        rows += [
            [f"split:{t}", f"{v['accuracy']:.3f}", f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]", v["n"]]
            for t, v in s["splits"].items()
        ]
        if len(args.images) > 1:
            print(f"{folder}:")
        print_table(["task", "accuracy", "95% CI", "n"], rows)
        print(
            f"overall {s['overall']:.3f} over {s['n']} images (task mean {s['task_mean']:.3f}); "
            f"wrote {Path(folder) / 'eval.json'}"
        )
    return 0


def _eval_free_text(args) -> int:
    import json

    from t2ialign.cli.common import check_device
    from t2ialign.evaluation.freetext import label_agreement, report_markdown, score_folder

    check_device(args.device)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    for folder in args.images:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--images {folder}: no such folder")
    scorers, threshold, train_prompts = {}, {}, []
    if args.reward:
        from t2ialign.reward.model import load_reward_model
        from t2ialign.reward.rewards import ModelReward

        if not Path(args.reward).is_dir():
            raise FileNotFoundError(f"--reward {args.reward}: no such folder")
        model = load_reward_model(args.reward, device=args.device)
        scorers["reward"] = ModelReward(model, name="reward")
        threshold["reward"] = model.card.get("metrics", {}).get("threshold", 0.5)
        train_prompts = model.card.get("split", {}).get("train_prompts", [])
    if args.clip:
        from t2ialign.reward.clip import CLIPBackbone
        from t2ialign.reward.rewards import SimilarityReward

        if not Path(args.clip).is_dir():
            raise FileNotFoundError(f"--clip {args.clip}: no such folder")
        scorers["clip"] = SimilarityReward(CLIPBackbone(args.clip, device=args.device), name="clip")
    results = [score_folder(f, scorers, by=args.by, batch_size=args.batch_size) for f in args.images]
    agreement = None
    if args.project:
        from t2ialign.feedback import FeedbackStore

        agreement = label_agreement(
            FeedbackStore.open(args.project), scorers, train_prompts, threshold, args.by, args.batch_size
        )
    names = [str(f) for f in args.images]
    for name, res in zip(names, results, strict=True):
        rows = [
            [g, d["n"], *[_mean(d["scores"][s]) for s in scorers]]
            for g, d in [*res["groups"].items(), ("all", {"n": res["n"], "scores": res["overall"]})]
        ]
        print(f"{name}: mean scores per {args.by}")
        print_table([args.by, "images", *scorers], rows)
    if agreement is not None:
        print(f"agreement with held-out human labels ({agreement['held_out_prompts']} prompts)")
        rows = []
        for g, d in [*agreement["groups"].items(), ("all", agreement["overall"])]:
            cells = [_num(d[s]["auc"]) for s in scorers]
            cells += [_num(d[s]["accuracy"]) for s in scorers if "accuracy" in d[s]]
            rows.append([g, d["n"], _num(d["positive_rate"]), *cells])
        acc = [f"{s} acc" for s in scorers if s in threshold]
        print_table([args.by, "labels", "good rate", *[f"{s} auc" for s in scorers], *acc], rows)
    if args.json:
        out = {"folders": results, "agreement": agreement, "scorers": list(scorers), "threshold": threshold}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(report_markdown(results, agreement, names))
        print(f"wrote {args.report}")
    return 0


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _mean(st: dict) -> str:
    if st["mean"] is None:
        return "-"
    ci = st.get("ci95")
    return f"{st['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
