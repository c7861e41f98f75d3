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
        "score an image folder with ShapesEval (writes DIR/eval.json)",
        "t2ialign eval --images samples/",
    )
    p.add_argument("--images", required=True, help="image folder with manifest.jsonl")


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
    rows = read_prompts(args.prompts)
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
    rate = noise.to_dict()
    configured = {
        "count": None,
        **{f"count_{n}": 1 - r for n, r in enumerate(noise.count_wrong, 1)},
        "color": 1 - rate["color_wrong"],
        "color_binding": 1 - rate["color_swap"],
        "shape": 1 - rate["shape_wrong"],
        "position": 1 - rate["relation_wrong"],
        "background": 1 - rate["background_wrong"],
    }
    rows = [
        [a, f"{v['accuracy']:.3f}", "-" if configured.get(a) is None else f"{configured[a]:.3f}", v["n"]]
        for a, v in acc.items()
    ]
    print(f"{args.noise} captions of {args.n} random scenes (seed {args.seed}): how often each is true")
    print_table(["attribute", "caption accuracy", "configured", "n"], rows)
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
    from t2ialign.world.imagefolder import evaluate_folder

    s = evaluate_folder(args.images)
    rows = [
        [t, f"{v['accuracy']:.3f}", f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]", v["n"]]
        for t, v in s["tasks"].items()
    ]
    rows += [
        [f"split:{t}", f"{v['accuracy']:.3f}", f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]", v["n"]]
        for t, v in s["splits"].items()
    ]
    print_table(["task", "accuracy", "95% CI", "n"], rows)
    print(
        f"overall {s['overall']:.3f} over {s['n']} images (task mean {s['task_mean']:.3f}); "
        f"wrote {Path(args.images) / 'eval.json'}"
    )
    return 0
