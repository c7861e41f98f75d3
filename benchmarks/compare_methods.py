"""Online alignment methods side by side, against wall-clock training time (issue 7).

Every method starts from the same base model (the shipped generator), trains on the same seen
prompts with the same reward (the checker by default) for the same wall-clock budget, for each of
``--seeds``. Training runs in chunks: the method's train function is called again and again on the
same run folder with a growing ``iterations`` (``rounds`` for RAFT), each call resuming from the
folder, and after each chunk the saved model is evaluated on a fixed set of seen and unseen prompts
(fixed prompts and seeds, the same for every method and seed):

- the checker's accuracy (ShapesEval, the gold measure) on the seen and on the unseen prompts;
- the proxy reward: the mean training reward of the evaluation images (equal to the accuracy when
  the reward is the checker; with a learned reward, ``--reward runs/reward``, a proxy that rises
  while the accuracy stalls or falls is reward hacking);
- FID against true renders of the same prompts (the shipped encoder's features; few images a set,
  so only comparable between points of this benchmark; none for a generator of another image size
  than the encoder's).

Only the train calls are timed (``perf_counter`` wall seconds, and ``process_time`` CPU seconds, the
steadier figure on a shared machine); evaluation and loading are not. A chunk's size is chosen from
the time an iteration has taken so far so that about ``--evals`` evaluations fall in the budget, and
no chunk is started that is expected to end more than half an iteration past it (``--chunk`` fixes
the size instead). The base model's evaluation is every run's point at 0 seconds.

Outputs: ``--json`` (every point), a markdown table (the final point of each method and seed, and
the mean over seeds) on stdout, plots ``<name>_accuracy.png`` and ``<name>_reward.png`` in
``--img-dir``, and with ``--results`` the table, the command, the machine and the date appended to
``docs/RESULTS.md`` under "Method comparison". Method settings are each config's defaults (their
docstrings give the sources) unless changed with ``--set METHOD.FIELD=VALUE``. ReFL and DRaFT need a
reward differentiable in the pixels (a learned reward), so by default they run only with one.

::

    python benchmarks/compare_methods.py --methods grpo,nft --seeds 0,1 --budget-seconds 600 \\
        --json /tmp/compare.json --results
    python benchmarks/compare_methods.py --tiny --json /tmp/tiny.json --img-dir /tmp/img   # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ONLINE = ("grpo", "mixgrpo", "ddpo", "nft", "raft", "refl", "draft")
NEEDS_GRADIENT = ("refl", "draft")
ROOT = Path(__file__).resolve().parent.parent

# --tiny: settings small enough for a random tiny generator to run a chunk in well under a second
TINY_SETTINGS = {
    "grpo": dict(
        prompts_per_iter=2, group_size=2, train_steps=2, minibatch_size=4, lora_rank=2, lora_alpha=4.0
    ),
    "mixgrpo": dict(
        prompts_per_iter=2,
        group_size=2,
        train_steps=2,
        minibatch_size=4,
        lora_rank=2,
        lora_alpha=4.0,
        window_size=1,
        window_shift_every=1,
    ),
    "ddpo": dict(batch_size=4, train_steps=2, minibatch_size=4, buffer_size=4, min_count=2, lora_rank=2),
    "nft": dict(prompts_per_iter=2, group_size=2, sample_steps=2, train_batch_size=4),
    "raft": dict(prompts_per_round=2, samples_per_prompt=2, sample_steps=2, steps_per_round=2, batch_size=2),
    "refl": dict(batch_size=2, sample_steps=2, late_steps=1, pretrain_batch_size=2),
    "draft": dict(batch_size=2, sample_steps=2, pretrain_batch_size=2),
}


# ---- set-up --------------------------------------------------------------------------------------


def tiny_generator(folder: Path) -> Path:
    """A random ``tiny`` generator saved to ``folder``, with its zero-initialised output convolution
    perturbed so that gradients reach the rest of the network."""
    from t2ialign.models import build_generator
    from t2ialign.models.generator import save_generator

    gen = build_generator("tiny", seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in gen.unet.conv_out.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    save_generator(gen, folder, card={"name": "tiny-random"})
    return folder


def spread(rows: list[dict], k: int) -> list[dict]:
    """``k`` rows taken round-robin over the tasks (in suite order), so every task is represented."""
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    out, i = [], 0
    while len(out) < min(k, len(rows)):
        for task_rows in by_task.values():
            if i < len(task_rows) and len(out) < k:
                out.append(task_rows[i])
        i += 1
    return out


def prompt_rows(path: str) -> list[dict]:
    """The rows of a prompt file (:func:`t2ialign.prompts.read_prompts`, every prompt of the grammar),
    all trained on and evaluated as task ``prompts``, split ``seen``. A bad file or a prompt outside
    the grammar is an error naming its line."""
    from t2ialign.prompts import PromptFileError, read_prompts

    try:
        rows = read_prompts(path, require_spec=True)
    except PromptFileError as e:
        raise SystemExit(str(e)) from None
    return [{**r, "task": "prompts", "split": "seen"} for r in rows]


def reward_is_differentiable(reward_fn, image_size: int, rows: list[dict]) -> bool:
    x = torch.rand(len(rows), 3, image_size, image_size, requires_grad=True)
    try:
        r, _ = reward_fn(x, [row["prompt"] for row in rows], rows)
    except Exception:  # noqa: BLE001 - a reward that cannot take the probe is treated as not differentiable
        return False
    return isinstance(r, torch.Tensor) and r.requires_grad


def method_config(method: str, seed: int, overrides: list[str], tiny: bool):
    from t2ialign.cli.finetune import METHODS, apply_overrides

    mod_name, cfg_name, fn_name, _ = METHODS[method]
    mod = importlib.import_module(mod_name)
    cfg = getattr(mod, cfg_name)()
    if tiny:
        cfg = dataclasses.replace(cfg, **TINY_SETTINGS[method])
    mine = [o.split(".", 1)[1] for o in overrides if o.split(".", 1)[0] == method]
    cfg = apply_overrides(cfg, [*mine, f"seed={seed}"])
    return cfg, getattr(mod, fn_name)


def iteration_field(cfg) -> str:
    from t2ialign.cli.finetune import ITERATION_FIELDS

    return next(f for f in ITERATION_FIELDS if hasattr(cfg, f))


def warm_imports() -> None:
    """Import what the trainers import lazily (peft, TensorBoard), so that the first timed chunk of the
    first method does not pay for it."""
    for name in ("peft", "torch.utils.tensorboard", "tqdm"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "nproc": os.cpu_count(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ---- evaluation ----------------------------------------------------------------------------------


def evaluate(gen, rows: list[dict], args, reward_fn, encoder) -> dict:
    from t2ialign.evaluation.evaluate import evaluate_generator

    t0 = time.perf_counter()
    res = evaluate_generator(
        gen,
        rows,
        per_prompt=args.eval_per_prompt,
        seed=args.eval_seed,
        steps=args.eval_steps,
        guidance=args.eval_guidance,
        reward_fn=reward_fn,
        encoder=encoder,
        progress=False,
        with_fid=gen.config.image_size == encoder.config.image_size,
    )
    splits = res["splits"]
    return {
        "seen_acc": splits["seen"]["accuracy"] if "seen" in splits else None,
        "unseen_acc": splits["unseen"]["accuracy"] if "unseen" in splits else None,
        "overall_acc": res["overall"],
        "n_images": res["n"],
        "tasks": {t: round(b["accuracy"], 4) for t, b in res["tasks"].items()},
        "proxy_reward": res.get("mean_reward"),
        "fid": res["fid"],
        "eval_wall_s": round(time.perf_counter() - t0, 2),
    }


# ---- one run: a method and a seed, trained in chunks ---------------------------------------------


def run_method(method: str, seed: int, ctx: dict, args, log) -> dict:
    from t2ialign.backends import ShapesBackend
    from t2ialign.models import load_generator

    cfg0, train = method_config(method, seed, args.set, args.tiny)
    field = iteration_field(cfg0)
    out = Path(ctx["work"]) / method / f"seed{seed}"
    if out.exists():
        shutil.rmtree(out)
    kwargs = {}
    if "pretrain_source" in train.__code__.co_varnames:
        kwargs["pretrain_source"] = ctx["pretrain_source"]
    points = [{"iteration": 0, "train_wall_s": 0.0, "train_cpu_s": 0.0, **ctx["base_point"]}]
    done, wall, cpu, per_iter = 0, 0.0, 0.0, None
    while True:
        remaining = args.budget_seconds - wall
        if remaining <= 0 or (args.max_iterations and done >= args.max_iterations):
            break
        if args.chunk:
            n = args.chunk
        elif per_iter is None:
            n = 1  # measure an iteration first
        else:
            if remaining < 0.5 * per_iter:
                break
            want = round(args.budget_seconds / args.evals / per_iter)
            n = max(1, min(want, round(remaining / per_iter)))
        if args.max_iterations:
            n = min(n, args.max_iterations - done)
        cfg = dataclasses.replace(cfg0, **{field: done + n})
        backend = ShapesBackend(load_generator(ctx["base"]))
        w0, c0 = time.perf_counter(), time.process_time()
        rows = train(backend, ctx["reward_fn"], ctx["train_rows"], cfg, out, progress=False, **kwargs)
        wall += time.perf_counter() - w0
        cpu += time.process_time() - c0
        done += n
        per_iter = wall / done
        del backend
        point = evaluate(load_generator(out), ctx["eval_rows"], args, ctx["reward_fn"], ctx["encoder"])
        rewards = [r["reward_mean"] for r in rows if "reward_mean" in r]
        point = {
            "iteration": done,
            "train_wall_s": round(wall, 2),
            "train_cpu_s": round(cpu, 2),
            "train_reward": sum(rewards) / len(rewards) if rewards else None,
            **point,
        }
        points.append(point)
        log(
            f"{method} seed {seed}: {field} {done}, {wall:.0f} s training ({cpu:.0f} CPU s): "
            f"seen {fmt(point['seen_acc'])}, unseen {fmt(point['unseen_acc'])}, "
            f"proxy {fmt(point['proxy_reward'])}, FID {fmt(point['fid'], 2)}"
        )
    if not args.keep_runs:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "method": method,
        "seed": seed,
        "iteration_field": field,
        "config": dataclasses.asdict(cfg0) | {field: done},
        "points": points,
    }


def fmt(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


# ---- reporting -----------------------------------------------------------------------------------


def mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def time_to(points: list[dict], target: float) -> float | None:
    """Training seconds of the first point whose seen accuracy reaches ``target``."""
    return next((p["train_wall_s"] for p in points if (p["seen_acc"] or 0) >= target), None)


def markdown_table(res: dict) -> str:
    target = res["settings"]["target"]
    base = res["base"]
    lines = [
        f"| method | seeds | iterations | train s (wall / CPU) | seen acc | unseen acc | proxy reward "
        f"| FID | s to seen >= {target:g} |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| base | - | 0 | 0 / 0 | {fmt(base['seen_acc'])} | {fmt(base['unseen_acc'])} "
        f"| {fmt(base['proxy_reward'])} | {fmt(base['fid'], 2)} | - |",
    ]
    methods = list(dict.fromkeys(r["method"] for r in res["runs"]))
    detail = []
    for m in methods:
        runs = [r for r in res["runs"] if r["method"] == m]
        finals = [r["points"][-1] for r in runs]
        reach = [time_to(r["points"], target) for r in runs]
        reached = [t for t in reach if t is not None]
        reach_txt = f"{mean(reached):.0f} ({len(reached)}/{len(runs)})" if reached else f"- (0/{len(runs)})"
        avg = {k: mean([p.get(k) for p in finals]) for k in finals[0] if k != "tasks"}
        lines.append(
            f"| {m} | {len(runs)} | {fmt(avg['iteration'], 1)} "
            f"| {fmt(avg['train_wall_s'], 0)} / {fmt(avg['train_cpu_s'], 0)} "
            f"| {fmt(avg['seen_acc'])} | {fmt(avg['unseen_acc'])} "
            f"| {fmt(avg['proxy_reward'])} | {fmt(avg['fid'], 2)} | {reach_txt} |"
        )
        for r, p, t in zip(runs, finals, reach, strict=True):
            detail.append(
                f"| {m} | {r['seed']} | {p['iteration']} | {p['train_wall_s']:.0f} / {p['train_cpu_s']:.0f} "
                f"| {fmt(p['seen_acc'])} | {fmt(p['unseen_acc'])} | {fmt(p['proxy_reward'])} "
                f"| {fmt(p['fid'], 2)} | {fmt(t, 0)} |"
            )
    head = lines[0].replace("| seeds |", "| seed |")
    return "\n".join(
        [
            "Final point of each method, mean over seeds (the column after FID: mean training seconds "
            "to the first point at the target, over the seeds that reached it):",
            "",
            *lines,
            "",
            "Per seed:",
            "",
            head,
            lines[1],
            *detail,
        ]
    )


def plot(res: dict, img_dir: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(r["method"] for r in res["runs"]))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    styles = ["-", "--", ":", "-."]
    seeds = sorted({r["seed"] for r in res["runs"]})
    reward = res["settings"]["reward"]
    paths = []

    def lines(ax, key):
        for r in res["runs"]:
            xs = [p["train_wall_s"] for p in r["points"] if p[key] is not None]
            ys = [p[key] for p in r["points"] if p[key] is not None]
            label = f"{r['method']} (seed {r['seed']})"
            ls = styles[seeds.index(r["seed"]) % len(styles)]
            ax.plot(xs, ys, ls, marker="o", ms=3, color=colors[r["method"]], label=label)
        ax.set_xlabel("training wall-clock seconds")
        ax.grid(alpha=0.3)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in zip(
        axes, ("seen_acc", "unseen_acc"), ("seen prompts", "unseen prompts"), strict=True
    ):
        lines(ax, key)
        ax.axhline(res["settings"]["target"], color="grey", lw=0.8, ls=":")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"checker accuracy, {title}")
    axes[0].set_ylabel("ShapesEval accuracy")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"reward: {reward}", fontsize=9)
    fig.tight_layout()
    paths.append(img_dir / f"{name}_accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    lines(ax, "proxy_reward")
    ax.set_ylabel(f"mean reward ({reward}) of the evaluation images")
    ax.set_title("proxy reward")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    paths.append(img_dir / f"{name}_reward.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def append_results(path: Path, res: dict, table: str, images: list[Path]) -> None:
    m, s = res["machine"], res["settings"]
    rel = [os.path.relpath(p.resolve(), path.resolve().parent) for p in images]
    body = "\n".join(
        [
            f"### Reward `{s['reward']}`, {m['date_utc']}",
            "",
            "Command (from the repository root):",
            "",
            "```",
            res["command"],
            "```",
            "",
            f"Machine: `nproc` = {m['nproc']}, load average (1, 5, 15 min) {m['loadavg_1_5_15']} "
            "at the start "
            f"and {res['machine_end']['loadavg_1_5_15']} at the end; torch {m['torch']} on "
            f"{m['torch_threads']} thread(s), Python {m['python']}. Total wall time "
            f"{res['total_wall_s'] / 60:.0f} min.",
            "",
            f"Base model `{res['base_model']}`; {s['train_prompts']} seen training prompts; evaluation on "
            f"{s['eval_seen']} seen and {s['eval_unseen']} unseen prompts x {s['eval_per_prompt']} images "
            f"(seeds from {s['eval_seed']}), {s['eval_steps']} Euler steps, guidance {s['eval_guidance']:g}; "
            f"budget {s['budget_seconds']:g} s of training per method and seed; seeds {s['seeds']}.",
            "",
            table,
            "",
            *[f"![{Path(p).stem}]({p})" for p in rel],
            "",
        ]
    )
    text = path.read_text() if path.exists() else "# Results\n"
    heading = "## Method comparison"
    if heading not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n" + body
    else:
        start = text.index(heading) + len(heading)
        nxt = text.find("\n## ", start)
        if nxt < 0:
            text = text.rstrip("\n") + "\n\n" + body
        else:
            text = text[:nxt].rstrip("\n") + "\n\n" + body + text[nxt:]
    path.write_text(text)


# ---- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=None, help="comma-separated, of " + ",".join(ONLINE))
    ap.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    ap.add_argument("--reward", default="checker", help="as `t2ialign finetune --reward` (a folder: learned)")
    ap.add_argument("--budget-seconds", type=float, default=600.0, help="training wall-clock per run")
    ap.add_argument("--evals", type=int, default=5, help="about this many evaluations per run")
    ap.add_argument("--chunk", type=int, default=0, help="fixed iterations per chunk (0: from the budget)")
    ap.add_argument("--max-iterations", type=int, default=0, help="stop a run here too (0: no cap)")
    ap.add_argument("--train-prompts", type=int, default=0, help="train on N seen prompts (0: all)")
    ap.add_argument("--eval-prompts", type=int, default=16, help="seen and unseen prompts evaluated")
    ap.add_argument("--eval-per-prompt", type=int, default=2)
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--eval-guidance", type=float, default=3.0)
    ap.add_argument("--target", type=float, default=0.95, help="seen accuracy for the time-to-target column")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=VALUE")
    ap.add_argument("--model", default=None, help="base generator folder (default: the shipped one)")
    ap.add_argument(
        "--prompts",
        default=None,
        help="a prompt file (one a line, or JSON lines) of prompts of the grammar: train and evaluate on "
        "these (split 'seen', task 'prompts') instead of the suites",
    )
    ap.add_argument("--tiny", action="store_true", help="random tiny generator, tiny settings (smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--work", default=None, help="run folders (default: a temporary folder)")
    ap.add_argument("--keep-runs", action="store_true", help="keep the run folders (needs --work)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--img-dir", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--name", default="compare_methods", help="file name prefix of the plots")
    ap.add_argument("--results", nargs="?", const=str(ROOT / "docs" / "RESULTS.md"), default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    argv_list = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/compare_methods.py " + shlex.join(argv_list)
    for item in args.set:
        if "." not in item.split("=", 1)[0]:
            ap.error(f"--set {item!r}: expected METHOD.FIELD=VALUE")
    if args.tiny:
        for name, val in (("budget_seconds", 3.0), ("eval_prompts", 2), ("eval_per_prompt", 1)):
            if ap.get_default(name) == getattr(args, name):
                setattr(args, name, val)
        if args.eval_steps == ap.get_default("eval_steps"):
            args.eval_steps = 2
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    from t2ialign.cli.finetune import build_reward
    from t2ialign.models import load_generator
    from t2ialign.models.encoder import load_encoder
    from t2ialign.pipeline import world_pretrain_source
    from t2ialign.world.suites import suite

    t_start = time.perf_counter()
    res: dict = {"command": command, "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp) / "runs"
        if args.tiny and args.model is None:
            base = str(tiny_generator(Path(tmp) / "tiny-generator"))
        else:
            base = args.model
        base_gen = load_generator(base)
        reward_fn = build_reward(args.reward)
        if args.prompts:
            seen, unseen = prompt_rows(args.prompts), []
        else:
            seen, unseen = suite("seen"), suite("unseen")
        train_rows = spread(seen, args.train_prompts) if args.train_prompts else seen
        eval_rows = spread(seen, args.eval_prompts) + spread(unseen, args.eval_prompts)
        size = base_gen.config.image_size
        grad = reward_is_differentiable(reward_fn, size, seen[:2])
        if args.methods:
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            bad = [m for m in methods if m not in ONLINE]
            if bad:
                ap.error(f"unknown or offline methods {bad}; choose from {','.join(ONLINE)}")
            if not grad and any(m in NEEDS_GRADIENT for m in methods):
                ap.error(f"{'/'.join(NEEDS_GRADIENT)} need a differentiable reward; {args.reward!r} is not")
        else:
            methods = [m for m in ONLINE if grad or m not in NEEDS_GRADIENT]
        res["base_model"] = base_gen.model_id
        res["settings"] = {
            "methods": methods,
            "seeds": seeds,
            "reward": args.reward,
            "reward_differentiable": grad,
            "budget_seconds": args.budget_seconds,
            "evals": args.evals,
            "chunk": args.chunk,
            "max_iterations": args.max_iterations,
            "train_prompts": len(train_rows),
            "eval_seen": sum(r["split"] == "seen" for r in eval_rows),
            "eval_unseen": sum(r["split"] == "unseen" for r in eval_rows),
            "eval_prompts": [r["prompt"] for r in eval_rows],
            "eval_per_prompt": args.eval_per_prompt,
            "eval_seed": args.eval_seed,
            "eval_steps": args.eval_steps,
            "eval_guidance": args.eval_guidance,
            "target": args.target,
            "overrides": args.set,
            "tiny": args.tiny,
            "prompts_file": args.prompts,
        }
        encoder = load_encoder()
        warm_imports()
        log(f"evaluating the base model on {len(eval_rows)} prompts x {args.eval_per_prompt}")
        res["base"] = evaluate(base_gen, eval_rows, args, reward_fn, encoder)
        log(f"base: seen {fmt(res['base']['seen_acc'])}, unseen {fmt(res['base']['unseen_acc'])}")
        ctx = {
            "work": work,
            "base": base,
            "reward_fn": reward_fn,
            "train_rows": train_rows,
            "eval_rows": eval_rows,
            "encoder": encoder,
            "pretrain_source": world_pretrain_source(size=size),
            "base_point": res["base"],
        }
        res["runs"] = []
        for seed in seeds:
            for method in methods:
                res["runs"].append(run_method(method, seed, ctx, args, log))
                if args.json:  # keep what is done if a long run is stopped
                    write_json(args.json, res)
    res["machine_end"] = machine()
    res["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    table = markdown_table(res)
    images = plot(res, Path(args.img_dir), args.name)
    res["images"] = [str(p) for p in images]
    if args.json:
        write_json(args.json, res)
    print(table)
    if args.results:
        append_results(Path(args.results), res, table, images)
        log(f"appended to {args.results}")
    return 0


def write_json(path: str, res: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, p)


if __name__ == "__main__":
    sys.exit(main())
