"""A deliberately misaligned tiny generator for the learning tests (issue 17): the web, in miniature.

Its world is one red circle on one of the four backgrounds, 16 x 16 pixels. Its pre-training
captions come from the project's captioner (:mod:`t2ialign.world.captions`) with the background
named wrongly three times in four (``background_wrong = 0.75``, another background drawn uniformly):
a caption's background word is then independent of the image's. The model learns to draw the object
from these captions but not to follow the background word: it draws each background about a quarter
of the time whatever the prompt says, the misalignment that labelled feedback (the checker's verdict
on its own samples) has to remove. A prompt's true answer is known: background accuracy 1.

    python tests/misaligned_fixture.py            # writes tests/fixtures/misaligned16 (about 4 CPU-minutes)
    python tests/misaligned_fixture.py --rwr --beta 0.5 --json F   # the learning test's run

The folder is a normal generator checkpoint (``load_generator``) whose card holds this command, the
data seed, the steps, the wall time, the machine and the base's accuracy per attribute; its
``prompts.txt`` lists the four true prompts (``benchmarks/compare_methods.py --prompts``).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from t2ialign.models.generator import build_generator, preset, save_generator
from t2ialign.pipeline import to_tensor
from t2ialign.sampling.flow import add_noise, flow_matching_loss
from t2ialign.sampling.sample import generate_images
from t2ialign.world.captions import CaptionNoise, caption
from t2ialign.world.checker import check
from t2ialign.world.grammar import to_prompt
from t2ialign.world.scene import render
from t2ialign.world.spec import ObjectSpec, Spec
from t2ialign.world.vocab import BACKGROUNDS

FOLDER = Path(__file__).resolve().parent / "fixtures" / "misaligned16"
SIZE = 16
NOISE = CaptionNoise(background_wrong=0.75)
BACKGROUND_NAMES = list(BACKGROUNDS)


def scene(background: str) -> Spec:
    return Spec((ObjectSpec("circle", 1, "red"),), background=background)


PROMPTS = [to_prompt(scene(b)) for b in BACKGROUND_NAMES]  # the true prompts: feedback and evaluation


def web_batch(k: int, batch_size: int = 64, cond_dropout: float = 0.0, data_seed: int = 0):
    """Batch ``k`` of the fixture's web stream: images in [0, 1] (B, 3, 16, 16) and their captions."""
    rng = np.random.default_rng([data_seed, k])
    specs = [scene(BACKGROUND_NAMES[int(i)]) for i in rng.integers(len(BACKGROUND_NAMES), size=batch_size)]
    imgs = np.stack([render(s, int(rng.integers(2**31)), SIZE) for s in specs])
    crng = np.random.default_rng([data_seed, k, 3])
    texts = [caption(s, NOISE, crng) if rng.random() >= cond_dropout else "" for s in specs]
    return to_tensor(imgs), texts


def accuracy(model, n: int = 128, seed0: int = 10**6, guidance: float = 3.0) -> dict[str, float]:
    """The checker's accuracy on the fixture's prompts (n images, prompts in turn), overall and per
    attribute."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    images = generate_images(model, prompts, list(range(seed0, seed0 + n)), steps=10, guidance=guidance)
    results = [check(im, p) for im, p in zip(images, prompts, strict=True)]
    out = {"overall": float(np.mean([r.correct for r in results]))}
    for a in ("count", "shape", "color", "background"):
        out[a] = float(np.mean([r.ok.get(a, True) for r in results]))
    return out


def build(steps: int = 2000, lr: float = 3e-3, ema: float = 0.995, batch_size: int = 64, seed: int = 0):
    """Pre-train the fixture on its web stream (AdamW, cosine decay to 10%, EMA of the weights)."""
    torch.manual_seed(seed)
    cfg = dataclasses.replace(preset("tiny"), image_size=SIZE)
    model = build_generator(cfg, seed=seed).train()
    avg = build_generator(cfg, seed=seed)
    avg.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.1 + 0.45 * (1 + math.cos(math.pi * k / steps)))
    g = torch.Generator().manual_seed(seed)
    for k in range(steps):
        x, texts = web_batch(k, batch_size, cond_dropout=0.1, data_seed=seed)
        x0 = model.encode_images(x)
        eps = torch.randn(x0.shape, generator=g)
        s = torch.rand(len(x0), generator=g)
        loss = flow_matching_loss(model.velocity(add_noise(x0, eps, s), s, model.encode(texts)), x0, eps)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for pa, pm in zip(avg.parameters(), model.parameters(), strict=True):
                pa.lerp_(pm, 1 - ema)
    return avg.eval()


def checker_labelled(model, n: int = 256, guidance: float = 1.0, seed0: int = 0):
    """``n`` samples of ``model`` (the prompts in turn, seeds from ``seed0``), weighted by the
    checker's verdict (1 right, 0 wrong): the seed paper's binary labels from an exact rater."""
    from t2ialign.algorithms.rwr import WeightedSamples

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    images = generate_images(model, prompts, list(range(seed0, seed0 + n)), steps=10, guidance=guidance)
    labels = torch.tensor([float(check(im, p).correct) for im, p in zip(images, prompts, strict=True)])
    return WeightedSamples(to_tensor(images), prompts, labels)


def rwr_on_checker_labels(
    cfg, out: str | Path, n: int = 256, eval_n: int = 128, pre_dropout: float = 0.0
) -> dict:
    """Fine-tune the fixture by RWR on :func:`checker_labelled` samples (``n`` of them), the
    pre-training term on the fixture's web stream (seeds of its own); the checker's accuracy before
    and after, on ``eval_n`` images; ``pre_dropout``: the pre-training term's condition dropout.
    ``cfg.seed`` also picks the labelled samples' seeds (from ``cfg.seed * 10**5``; the evaluation's
    start at 10**6)."""
    if n > 10**5 or eval_n > 10**5:
        raise ValueError(f"n and eval_n must be at most 100000 (seeds must not overlap), got {n}, {eval_n}")
    from t2ialign.algorithms.rwr import train_rwr
    from t2ialign.backends import ShapesBackend
    from t2ialign.models import load_generator

    t0 = time.time()
    model = load_generator(FOLDER)
    before = accuracy(model, eval_n)
    labelled = checker_labelled(model, n, guidance=cfg.sample_guidance, seed0=cfg.seed * 10**5)
    pre = (lambda k, b: web_batch(10**6 + k, b, cond_dropout=pre_dropout)) if cfg.beta > 0 else None
    train_rwr(ShapesBackend(model), cfg, labelled, out, pretrain_source=pre, progress=False)
    after = accuracy(load_generator(out), eval_n)
    good = float(labelled.weights.mean())
    return {
        "before": before,
        "after": after,
        "labelled": n,
        "eval_n": eval_n,
        "pre_dropout": pre_dropout,
        "good_rate": good,
        "seconds": round(time.time() - t0, 1),
    }


def main() -> None:
    import argparse
    import json
    import tempfile

    from t2ialign.algorithms.rwr import RWRConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rwr", action="store_true", help="fine-tune the committed fixture (default: build it)")
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ema", type=float, default=0.9)
    ap.add_argument("--n", type=int, default=256, help="labelled samples (the prompts in turn)")
    ap.add_argument("--eval-n", type=int, default=128, help="images evaluated before and after")
    ap.add_argument("--seed", type=int, default=0, help="RWR's seed (labelled samples, batches, noise)")
    ap.add_argument(
        "--cond-dropout", type=float, default=0.0, help="RWR's condition dropout of the labelled term"
    )
    ap.add_argument(
        "--pre-dropout", type=float, default=0.0, help="condition dropout of the pre-training term"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.rwr:
        cfg = RWRConfig(
            steps=args.steps,
            lr=args.lr,
            beta=args.beta,
            ema=args.ema,
            seed=args.seed,
            cond_dropout=args.cond_dropout,
            checkpoint_every=10**6,
        )
        with tempfile.TemporaryDirectory() as d:
            res = {
                "config": dataclasses.asdict(cfg),
                **rwr_on_checker_labels(cfg, d, args.n, args.eval_n, args.pre_dropout),
            }
        print(json.dumps(res, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        return
    steps = 2000
    t0 = time.time()
    model = build(steps=steps)
    wall = time.time() - t0
    card = {
        "name": "misaligned16",
        "command": "python tests/misaligned_fixture.py",
        "captions": {"preset": "fixture", "noise": NOISE.to_dict()},
        "data_seed": 0,
        "steps": steps,
        "wall_seconds": round(wall, 1),
        "threads": 1,
        "machine": f"{platform.machine()} {platform.processor() or ''} ({platform.node()})".strip(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "accuracy_guidance3_n128": accuracy(model),
    }
    save_generator(model, FOLDER, card)
    (FOLDER / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS))  # for --prompts of the benchmarks
    print(card)


if __name__ == "__main__":
    main()
