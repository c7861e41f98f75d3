"""Quality and cost of the shipped base generator (and the FID floor of the shipped encoder).

Measures, at the default sampler settings (20 Euler steps, guidance 3.0):

1. **ShapesEval**: per-task accuracy on the seen and unseen suites, ``--per-prompt`` images a prompt
   (4: 129 prompts, 516 images), with 95% Wilson intervals;
2. **FID** (encoder image features) between the samples and true renders of the same prompts, and
   between two sets of true renders (the floor), all sets of the same size;
3. **sampling throughput** (images/s, with guidance) and **peak memory** (peak RSS from
   ``resource.getrusage``; torch's tensors are invisible to ``tracemalloc``), from the ShapesEval
   sampling run, which is the first heavy work of the process;
4. **overhead**: the share of sampling time spent outside the UNet's forward passes, two ways:
   (a) in the ShapesEval run itself, timing each forward pass with hooks; (b) side by side,
   ``generate_images`` on one batch against a bare loop of the same forward calls on the same
   inputs, interleaved, ``--overhead-reps`` times (median);
5. **pre-training cost**: wall time of ``--pretrain-steps`` steps of ``pretrain`` at the shipped
   settings (``small`` preset, batch 64), scaled to 1,000 steps.

Times are wall-clock (``perf_counter``) and CPU (``process_time``) seconds; on a shared machine the
CPU figures are the steadier ones, and ``cpu_share`` (CPU / wall) says how much of a core the run
got. The load averages at the start and end of each part are recorded. ``--json PATH`` writes all
figures.

::

    python benchmarks/eval_generator.py --threads 1 --json eval_generator.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import numpy as np
import torch

from t2ialign.evaluation.fid import frechet_distance, gaussian_stats, image_features
from t2ialign.models import Cond, load_generator
from t2ialign.models.encoder import load_encoder
from t2ialign.sampling import generate_images, initial_noise
from t2ialign.world import check, render, suite
from t2ialign.world.imagefolder import summarize
from t2ialign.world.spec import Spec

TRUE_SEED_A, TRUE_SEED_B = 1_000_000, 2_000_000  # render seeds of the two true-render sets


def rss_mib() -> float:
    """Current resident set size (MiB), from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Clock:
    """Wall and CPU seconds of a block, with the load averages around it."""

    def __init__(self):
        self.wall = self.cpu = 0.0
        self.load = {}

    @contextmanager
    def run(self):
        self.load["start"] = [round(x, 2) for x in os.getloadavg()]
        w, c = time.perf_counter(), time.process_time()
        yield self
        self.wall, self.cpu = time.perf_counter() - w, time.process_time() - c
        self.load["end"] = [round(x, 2) for x in os.getloadavg()]

    def to_dict(self) -> dict:
        return {
            "wall_s": round(self.wall, 2),
            "cpu_s": round(self.cpu, 2),
            "cpu_share": round(self.cpu / self.wall, 3) if self.wall else None,
            "loadavg_1_5_15": self.load,
        }


class ForwardTimer:
    """Accumulates wall and CPU time inside ``module.forward`` (hooks, negligible cost)."""

    def __init__(self, module: torch.nn.Module):
        self.wall = self.cpu = 0.0
        self.calls = 0
        self._t = (0.0, 0.0)
        self._hooks = [
            module.register_forward_pre_hook(self._pre),
            module.register_forward_hook(self._post),
        ]

    def _pre(self, *_):
        self._t = (time.perf_counter(), time.process_time())

    def _post(self, *_):
        self.wall += time.perf_counter() - self._t[0]
        self.cpu += time.process_time() - self._t[1]
        self.calls += 1

    def remove(self):
        for h in self._hooks:
            h.remove()


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), ""
        )
    except OSError:
        model = ""
    import scipy

    return {
        "platform": platform.platform(),
        "cpu": model,
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def true_renders(rows: list[dict], seed0: int) -> np.ndarray:
    return np.stack([render(Spec.from_dict(r["spec"]), seed0 + i, 32) for i, r in enumerate(rows)])


def shapes_eval(images: np.ndarray, rows: list[dict]) -> dict:
    scored = []
    for img, r in zip(images, rows, strict=True):
        res = check(img, Spec.from_dict(r["spec"]))
        scored.append({"task": r["task"], "split": r["split"], "correct": res.correct})
    out = {split: summarize([s for s in scored if s["split"] == split]) for split in ("seen", "unseen")}
    out["all"] = summarize(scored)
    return out


@torch.no_grad()
def overhead_side_by_side(model, prompts: list[str], steps: int, guidance: float, reps: int) -> dict:
    """``generate_images`` on one batch against a bare loop of the same UNet calls, interleaved."""
    n = len(prompts)
    seeds = list(range(n))
    # the inputs of the guided forward pass: conditional and null prompts in one padded batch
    cond = model.encode(prompts)
    both = Cond.cat([cond, model.encode([""] * n)])
    x = initial_noise(seeds, model.latent_shape)
    x2, s2 = torch.cat([x, x]), torch.ones(2 * n)
    generate_images(model, prompts[:2], seeds[:2], steps=2, guidance=guidance)  # warm-up
    runs = []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        generate_images(model, prompts, seeds, steps=steps, guidance=guidance, batch_size=n)
        sw, sc = time.perf_counter() - w, time.process_time() - c
        w, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            model.unet(x2, s2, both.ctx, both.mask)
        bw, bc = time.perf_counter() - w, time.process_time() - c
        runs.append(
            {
                "sample_wall_s": round(sw, 3),
                "bare_wall_s": round(bw, 3),
                "sample_cpu_s": round(sc, 3),
                "bare_cpu_s": round(bc, 3),
                "share_wall": round((sw - bw) / sw, 4),
                "share_cpu": round((sc - bc) / sc, 4),
            }
        )
    return {
        "batch": n,
        "steps": steps,
        "reps": runs,
        "share_cpu_median": statistics.median(r["share_cpu"] for r in runs),
        "share_wall_median": statistics.median(r["share_wall"] for r in runs),
    }


def pretrain_cost(steps: int, warmup_steps: int = 2) -> dict:
    """Time ``steps`` steps of ``pretrain`` at the shipped settings. A first call runs
    ``warmup_steps`` steps (model construction, the optimizer's first use, lazy imports); the timed
    call resumes it in the same folder and runs ``steps`` more (loading that checkpoint and writing
    one at the end are included)."""
    from t2ialign.models.pretrain import PretrainConfig, pretrain

    def cfg(n: int) -> PretrainConfig:
        return PretrainConfig(preset="small", steps=n, batch_size=64, checkpoint_every=10**6)

    clock = Clock()
    with tempfile.TemporaryDirectory() as d:
        pretrain(cfg(warmup_steps), d, progress=False)
        with clock.run():
            pretrain(cfg(warmup_steps + steps), d, progress=False)
    out = clock.to_dict()
    out.update(
        steps=steps,
        preset="small",
        batch_size=64,
        wall_s_per_1000_steps=round(clock.wall / steps * 1000, 1),
        cpu_s_per_1000_steps=round(clock.cpu / steps * 1000, 1),
        note=f"{steps} steps after {warmup_steps} warm-up steps, times {1000 / steps:g}",
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="image k of the evaluation uses seed + k")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--overhead-reps", type=int, default=2)
    ap.add_argument("--pretrain-steps", type=int, default=20, help="0: skip the pre-training timing")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N prompts (smoke runs)")
    ap.add_argument("--model", default=None, help="generator folder (default: the shipped one)")
    ap.add_argument("--json", default=None, help="write the figures to this path")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    res: dict = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    }
    res["machine"] = machine()
    model = load_generator(args.model)
    encoder = load_encoder()
    card_path = None if args.model else "src/t2ialign/checkpoints/generator/card.json"
    res["generator"] = {"model_id": model.model_id, "card": card_path}
    res["settings"] = {
        "steps": args.steps,
        "guidance": args.guidance,
        "per_prompt": args.per_prompt,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }

    prompts = suite("seen") + suite("unseen")
    if args.limit:
        prompts = prompts[: args.limit]
    rows = [r for r in prompts for _ in range(args.per_prompt)]
    seeds = [args.seed + k for k in range(len(rows))]
    print(f"sampling {len(rows)} images ({len(prompts)} prompts x {args.per_prompt})", file=sys.stderr)

    # 1 + 3: the evaluation sampling run, timed, with the UNet's forward passes timed inside it
    rss_before = rss_mib()
    timer = ForwardTimer(model.unet)
    clock = Clock()
    with clock.run():
        images = generate_images(
            model,
            [r["prompt"] for r in rows],
            seeds,
            steps=args.steps,
            guidance=args.guidance,
            batch_size=args.batch_size,
            progress=True,
        )
    timer.remove()
    res["sampling"] = {
        "images": len(rows),
        **clock.to_dict(),
        "images_per_s_wall": round(len(rows) / clock.wall, 3),
        "images_per_s_cpu": round(len(rows) / clock.cpu, 3),
        "rss_before_mib": round(rss_before, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "unet_calls": timer.calls,
        "outside_forward_share_wall": round(1 - timer.wall / clock.wall, 4),
        "outside_forward_share_cpu": round(1 - timer.cpu / clock.cpu, 4),
    }
    print(json.dumps(res["sampling"]), file=sys.stderr)

    res["shapes_eval"] = shapes_eval(images, rows)

    # 2: FID in the encoder's image features, all sets of len(rows) images
    clock = Clock()
    with clock.run():
        f_gen = image_features(images, encoder)
        f_a = image_features(true_renders(rows, TRUE_SEED_A), encoder)
        f_b = image_features(true_renders(rows, TRUE_SEED_B), encoder)
        st_gen, st_a, st_b = gaussian_stats(f_gen), gaussian_stats(f_a), gaussian_stats(f_b)
        res["fid"] = {
            "n_per_set": len(rows),
            "features": f"encoder image_features ({f_gen.shape[1]} dims)",
            "generator_vs_true": frechet_distance(*st_gen, *st_a),
            "generator_vs_true_b": frechet_distance(*st_gen, *st_b),
            "floor_true_vs_true": frechet_distance(*st_a, *st_b),
            "true_render_seeds": [TRUE_SEED_A, TRUE_SEED_B],
        }
    res["fid"]["time"] = clock.to_dict()
    print(json.dumps(res["fid"]), file=sys.stderr)

    # 4b: overhead, side by side on one batch of the evaluation's prompts
    if args.overhead_reps > 0:
        batch = [r["prompt"] for r in rows[: args.batch_size]]
        clock = Clock()
        with clock.run():
            res["overhead"] = overhead_side_by_side(
                model, batch, args.steps, args.guidance, args.overhead_reps
            )
        res["overhead"]["time"] = clock.to_dict()
        print(json.dumps(res["overhead"]), file=sys.stderr)

    # 5: pre-training cost
    if args.pretrain_steps > 0:
        res["pretrain"] = pretrain_cost(args.pretrain_steps)
        print(json.dumps(res["pretrain"]), file=sys.stderr)

    report(res)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def report(res: dict) -> None:
    def pct(b):
        lo, hi = b["ci95"]
        return f"{100 * b['accuracy']:5.1f}%  [{100 * lo:5.1f}, {100 * hi:5.1f}]  n={b['n']}"

    print(f"generator {res['generator']['model_id']}, {res['machine']['date_utc']}")
    for split in ("seen", "unseen"):
        ev = res["shapes_eval"][split]
        print(
            f"\nShapesEval, {split} suite: overall {100 * ev['overall']:.1f}%, "
            f"task mean {100 * ev['task_mean']:.1f}%"
        )
        for task, b in ev["tasks"].items():
            print(f"  {task:<14} {pct(b)}")
    f = res["fid"]
    print(
        f"\nFID ({f['n_per_set']} images a set): generator vs true renders {f['generator_vs_true']:.3f}; "
        f"true vs true (floor) {f['floor_true_vs_true']:.3f}"
    )
    s = res["sampling"]
    print(
        f"sampling: {s['images_per_s_wall']:.3f} images/s wall ({s['images_per_s_cpu']:.3f} per CPU second), "
        f"peak RSS {s['peak_rss_mib']:.0f} MiB (before sampling {s['rss_before_mib']:.0f} MiB), "
        f"CPU share {s['cpu_share']}"
    )
    print(
        f"outside the forward passes (in-run hooks): {100 * s['outside_forward_share_cpu']:.1f}% CPU, "
        f"{100 * s['outside_forward_share_wall']:.1f}% wall"
    )
    if "overhead" in res:
        o = res["overhead"]
        print(
            f"outside the forward passes (side by side, median of {len(o['reps'])}): "
            f"{100 * o['share_cpu_median']:.1f}% CPU, {100 * o['share_wall_median']:.1f}% wall"
        )
    if "pretrain" in res:
        p = res["pretrain"]
        print(
            f"pre-training: {p['wall_s_per_1000_steps']:.0f} s wall / 1,000 steps "
            f"({p['cpu_s_per_1000_steps']:.0f} CPU s), from {p['steps']} steps"
        )


if __name__ == "__main__":
    sys.exit(main())
