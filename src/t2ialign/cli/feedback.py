"""``t2ialign generate`` and ``t2ialign label ...``: collect human feedback on generated images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from t2ialign.cli.common import add_command, add_model_args, check_device, print_table
from t2ialign.cli.inputs import add_long_prompts_arg


def add_parsers(sub) -> None:
    p = add_command(
        sub,
        "generate",
        cmd_generate,
        "generate images of prompts into a feedback project (adds; never duplicates or overwrites)",
        "t2ialign generate --project proj --prompts seen.jsonl --per-prompt 4",
    )
    p.add_argument("--project", required=True, help="project folder (created when missing)")
    p.add_argument(
        "--prompts",
        required=True,
        help="prompt file: plain text, one prompt a line, or JSON lines with 'prompt' and any metadata "
        "(kept with the prompt: 'group', 'negatives', ...)",
    )
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt (seeds SEED .. SEED+N-1)")
    add_model_args(
        p,
        "generator: a shapes generator folder (default: the shipped model), a fine-tuned run folder, or "
        "a diffusers pipeline folder (SD 1.5, SDXL, SD3, FLUX; a saved LoRA folder too)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    add_long_prompts_arg(p)
    p.add_argument(
        "--update-metadata",
        action="store_true",
        help="replace the stored metadata of prompts already in the project by the prompt file's "
        "(without it, other metadata for a known prompt is an error)",
    )
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance weight")
    p.add_argument("--seed", type=int, default=0, help="image j of every prompt uses seed SEED + j")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--labels-per-image", type=int, default=None, help="k for a new project (default 3)")

    label = sub.add_parser(
        "label",
        help="label images: the web app, annotators, simulated raters, stats, exports, imports",
        description="Label images: the web app, annotators, simulated raters, stats, exports, imports.",
        epilog="example:\n  t2ialign label add-annotator alice --project proj && "
        "t2ialign label serve --project proj",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lsub = label.add_subparsers(dest="label_command", metavar="WHAT", required=True)

    p = add_command(
        lsub,
        "serve",
        cmd_serve,
        "serve the labelling web app",
        "t2ialign label serve --project proj --port 8000",
    )
    p.add_argument("--project", required=True)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--labels-per-image", type=int, default=None, help="set k, the annotators per image")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    p = add_command(
        lsub,
        "add-annotator",
        cmd_add_annotator,
        "add a human annotator and print their login token",
        "t2ialign label add-annotator --project proj alice",
    )
    p.add_argument("name")
    p.add_argument("--project", required=True)
    p.add_argument("--rotate-token", action="store_true", help="give an existing annotator a new token")

    p = add_command(
        lsub,
        "simulate",
        cmd_simulate,
        "label with a simulated rater (the ShapesEval checker with noise and leniency)",
        "t2ialign label simulate --project proj --rater oracle --noise 0.1 --bias count=0.2",
    )
    p.add_argument("--project", required=True)
    p.add_argument("--rater", default="oracle", choices=["oracle", "random"])
    p.add_argument("--noise", type=float, default=0.0, help="probability of flipping a verdict")
    p.add_argument(
        "--bias",
        action="append",
        default=[],
        metavar="ATTR=P",
        help="leniency: forgive a failure on ATTR (count, shape, color, background, position) "
        "with probability P",
    )
    p.add_argument("--name", default=None, help="annotator name (default sim-RATER)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--what", choices=["both", "labels", "pairs"], default="both")
    p.add_argument("--pairs-per-prompt", type=int, default=None, help="cap on pairs per prompt (default all)")
    p.add_argument("--limit", type=int, default=None, help="label at most this many new images")

    p = add_command(
        lsub,
        "export",
        cmd_export,
        "export labels and pairs: Parquet, a Hugging Face dataset with a card, Pick-a-Pic pairs",
        "t2ialign label export --project proj --out export/ --labels human",
    )
    p.add_argument("--project", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=["all", "parquet", "hf"], default="all")
    p.add_argument("--labels", choices=["all", "human", "simulated"], default="all", help="which labels")

    p = add_command(
        lsub,
        "import",
        cmd_import,
        "import a Label Studio JSON export (image classification or pairwise)",
        "t2ialign label import --project proj --labelstudio export.json --images images/",
    )
    p.add_argument("--project", required=True, help="project folder (created when missing)")
    p.add_argument("--labelstudio", required=True, help="Label Studio JSON export file")
    p.add_argument("--images", default=None, help="folder holding the tasks' image files")
    p.add_argument("--model-id", default="labelstudio", help="model id recorded for imported images")

    p = add_command(
        lsub,
        "stats",
        cmd_stats,
        "labels per task and split, good rates, agreement, annotators' progress",
        "t2ialign label stats --project proj",
    )
    p.add_argument("--project", required=True)
    p.add_argument("--json", action="store_true", help="print JSON")


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def _open_or_create(project: str, k: int | None):
    from t2ialign.feedback.store import DEFAULT_LABELS_PER_IMAGE, FeedbackStore

    path = Path(project)
    if (path / "feedback.sqlite").exists():
        store = FeedbackStore.open(path)
        if k is not None and k != store.labels_per_image:
            store.set_labels_per_image(k)
        return store
    store = FeedbackStore.create(path, labels_per_image=k or DEFAULT_LABELS_PER_IMAGE)
    print(f"created feedback project {path} (admin token in {path / 'admin.token'})")
    return store


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from t2ialign.cli.inputs import check_prompts_for, load_sampler
    from t2ialign.prompts import metadata_of, read_prompt_file

    _positive("--per-prompt", args.per_prompt)
    _positive("--steps", args.steps)
    _positive("--batch-size", args.batch_size)
    check_device(args.device)
    if args.model is not None and not Path(args.model).exists():
        raise FileNotFoundError(f"--model {args.model}: no such file or folder")
    pf = read_prompt_file(args.prompts)
    rows = pf.rows
    from t2ialign.sampling import generate_images

    model = load_sampler(args.model, args.backend, args.device, args.dtype)
    check_prompts_for(pf, model, args.long_prompts)
    store = _open_or_create(args.project, args.labels_per_image)
    with store.transaction():  # the prompts and their metadata first, all or none
        for r in rows:
            store.add_prompt(
                r["prompt"], r["spec"], r["task"], r["split"], metadata_of(r), args.update_metadata
            )
    settings = {"steps": int(args.steps), "guidance": float(args.guidance)}
    todo, have = [], 0
    for r in rows:
        for seed in range(args.seed, args.seed + args.per_prompt):
            if store.find_generation(model.model_id, r["prompt"], seed, settings) is None:
                todo.append((r, seed))
            else:
                have += 1
    added = 0
    with tqdm(total=len(todo), desc="generate", unit="image", disable=not todo) as bar:
        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start : start + args.batch_size]
            images = generate_images(
                model,
                [r["prompt"] for r, _ in chunk],
                [s for _, s in chunk],
                steps=args.steps,
                guidance=args.guidance,
            )
            res = store.add_generations(
                [
                    dict(
                        image=img,
                        prompt=r["prompt"],
                        spec=r["spec"],
                        task=r["task"],
                        split=r["split"],
                        metadata=metadata_of(r),
                        model_id=model.model_id,
                        seed=seed,
                        settings=settings,
                    )
                    for img, (r, seed) in zip(images, chunk, strict=True)
                ]
            )
            added += sum(created for _, created in res)
            bar.update(len(chunk))
    total = store.counts()["generations"]
    print(
        f"added {added} images of {len(rows)} prompts by {model.model_id} ({have} were there already); "
        f"{total} in {args.project}"
    )
    return 0


def cmd_serve(args) -> int:
    from t2ialign.feedback.app import serve
    from t2ialign.feedback.store import FeedbackStore

    _positive("--labels-per-image", args.labels_per_image)
    store = FeedbackStore.open(args.project)
    if args.labels_per_image is not None:
        store.set_labels_per_image(args.labels_per_image)
    c, k = store.counts(), store.labels_per_image
    store.close()
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"labelling {c['generations']} images of {c['prompts']} prompts, {k} annotators per image")
    print(
        f"open http://{host}:{args.port}/  (annotators: their token; "
        f"admin: the token in {Path(args.project) / 'admin.token'})"
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: other machines can reach this server (plain HTTP)")
    serve(args.project, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_add_annotator(args) -> int:
    from t2ialign.feedback.store import FeedbackStore

    store = FeedbackStore.open(args.project)
    token = store.rotate_token(args.name) if args.rotate_token else store.add_annotator(args.name)
    print(f"annotator {args.name}: log in with this token (shown once; keep it secret):")
    print(token)
    return 0


def cmd_simulate(args) -> int:
    from t2ialign.feedback.simulate import SimulatedRater, parse_bias, simulate
    from t2ialign.feedback.store import FeedbackStore

    _positive("--pairs-per-prompt", args.pairs_per_prompt)
    _positive("--limit", args.limit)
    rater = SimulatedRater(args.rater, noise=args.noise, bias=parse_bias(args.bias), seed=args.seed)
    store = FeedbackStore.open(args.project)
    out = simulate(
        store,
        rater,
        name=args.name,
        labels=args.what in ("both", "labels"),
        pairs=args.what in ("both", "pairs"),
        pairs_per_prompt=args.pairs_per_prompt,
        limit=args.limit,
    )
    extra = f"; {out['no_spec']} images outside the world's grammar left alone" if out["no_spec"] else ""
    print(
        f"{out['annotator']}: added {out['labels']} labels and {out['comparisons']} comparisons "
        f"(simulated){extra}"
    )
    return 0


def cmd_export(args) -> int:
    from t2ialign.feedback.export import export
    from t2ialign.feedback.store import FeedbackStore

    if args.format in ("all", "hf"):
        import datasets

        datasets.disable_progress_bars()
    store = FeedbackStore.open(args.project)
    simulated = {"all": None, "human": False, "simulated": True}[args.labels]
    out = export(store, args.out, formats=args.format, simulated=simulated)
    for name, path in out["files"].items():
        print(f"  {name}: {path}")
    print(f"exported {out['labels']} labels and {out['pairs']} pairs ({args.labels}) to {args.out}")
    return 0


def cmd_import(args) -> int:
    from t2ialign.feedback.labelstudio import import_labelstudio

    store = _open_or_create(args.project, None)
    out = import_labelstudio(store, args.labelstudio, images=args.images, model_id=args.model_id)
    print(
        f"imported {out['labels']} labels and {out['comparisons']} comparisons from {out['tasks']} tasks "
        f"({out['duplicates']} already there, {out['images']} new images, annotators: "
        f"{', '.join(out['annotators']) or 'none'})"
    )
    return 0


def cmd_stats(args) -> int:
    from t2ialign.feedback.app import _clean
    from t2ialign.feedback.stats import project_stats
    from t2ialign.feedback.store import FeedbackStore

    s = project_stats(FeedbackStore.open(args.project))
    if args.json:
        print(json.dumps(_clean(s), indent=1))
        return 0
    c, p = s["counts"], s["progress"]

    def f(x, spec=".2f"):
        return "-" if x is None or x != x else format(x, spec)

    print(
        f"{c['generations']} images, {c['prompts']} prompts, {c['labels']} labels, "
        f"{c['comparisons']} comparisons; "
        f"human progress {p['images']['project']}/{p['images']['project_total']} labels, "
        f"{p['pairs']['project']}/{p['pairs']['project_total']} comparisons (k={s['labels_per_image']})"
    )
    print()
    print_table(
        ["who", "task", "split", "good", "bad", "skip", "good rate"],
        [
            [r["group"], r["task"], r["split"], r["good"], r["bad"], r["skip"], f(r["good_rate"], ".3f")]
            for r in s["by_task_split"]
        ],
    )
    print()
    rows = []
    for group, ag in s["agreement"].items():
        for what, a in ag.items():
            if a["n_items"]:
                method = "Cohen" if a["method"] == "cohen" else "Fleiss"
                rows.append([group, what, method, f(a["kappa"]), a["n_items"], len(a["raters"])])
    if rows:
        print_table(["who", "what", "kappa", "value", "items", "raters"], rows)
        print()
    print_table(
        ["annotator", "kind", "good", "bad", "skip", "pairs", "checker agreement", "last label"],
        [
            [
                a["name"],
                a["kind"],
                a["good"],
                a["bad"],
                a["skip"],
                a["comparisons"],
                f(a.get("checker_agree"), ".3f"),
                a["last"] or "-",
            ]
            for a in s["annotators"]
        ],
    )
    return 0
