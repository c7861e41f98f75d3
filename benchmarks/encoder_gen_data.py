"""Generated images for fine-tuning the encoder on the generator's own output (issue #5).

Prompts: seen-split specs of every task (round robin, ``combination`` twice as often), excluding
every prompt of reward_eval's test project (the held-out seen prompts and the whole unseen suite).
Seeds: 10_000_000 + i, never the benchmark's 0..per_prompt-1. Writes chunks of
(images uint8 (N, 32, 32, 3), prompts, seeds) as ``chunk-XXX.npz`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from t2ialign.models import load_generator
from t2ialign.reward.train import split_prompts
from t2ialign.sampling import generate_images
from t2ialign.world import suite
from t2ialign.world.grammar import to_prompt
from t2ialign.world.suites import TASKS, enumerate_specs, split_of

HELDOUT_FRACTION = 0.25  # as benchmarks/reward_eval.py
SEED0 = 10_000_000


def test_prompts() -> set[str]:
    seen = suite("seen")
    train_p, held_p = split_prompts([r["prompt"] for r in seen], HELDOUT_FRACTION, seed=2023)
    return set(held_p) | {r["prompt"] for r in suite("unseen")}


def prompt_stream(n: int, seed: int = 5) -> list[str]:
    banned = test_prompts()
    rng = random.Random(seed)
    pools = {
        t: [to_prompt(s) for s in enumerate_specs(t) if split_of(s) == "seen" and to_prompt(s) not in banned]
        for t in TASKS
    }
    order = [t for t in TASKS for _ in range(2 if t == "combination" else 1)]
    out = []
    while len(out) < n:
        for t in order:
            out.append(rng.choice(pools[t]))
    return out[:n]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=2400)
    ap.add_argument("--chunk", type=int, default=192)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument(
        "--first-chunk", type=int, default=0, help="skip the chunks before (another process makes them)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = prompt_stream(args.n)
    banned = test_prompts()
    assert not set(prompts) & banned
    (out / "meta.json").write_text(json.dumps({"n": args.n, "seed0": SEED0, "n_banned": len(banned)}))
    model = load_generator(device="cpu")
    t0 = time.time()
    for c, s in enumerate(range(0, args.n, args.chunk)):
        path = out / f"chunk-{c:03d}.npz"
        if path.exists() or c < args.first_chunk:
            continue
        ps = prompts[s : s + args.chunk]
        seeds = [SEED0 + s + i for i in range(len(ps))]
        imgs = []
        for b in range(0, len(ps), args.batch):
            imgs.append(
                generate_images(
                    model, ps[b : b + args.batch], seeds[b : b + args.batch], steps=20, guidance=3.0
                )
            )
        np.savez(
            path.with_suffix(".tmp.npz"),
            images=np.concatenate(imgs),
            prompts=np.array(ps),
            seeds=np.array(seeds),
        )
        path.with_suffix(".tmp.npz").rename(path)
        print(f"chunk {c}: {s + len(ps)}/{args.n} images, {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
