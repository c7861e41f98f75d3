"""Data-parallel training of the ``tiny`` preset under Hugging Face Accelerate (Flow-GRPO, RWR, DDPO,
DiffusionNFT, RAFT, Diffusion-DPO, ReFL, DRaFT; or the reward model's head on a feedback project).

Run with several processes (on CPU, ``--multi_gpu`` asks accelerate for its torchrun launcher; the
script's ``Accelerator(cpu=True)`` then joins a gloo group):

    OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --main_process_port 29555 \\
        benchmarks/accelerate_train.py --method grpo --out runs/acc_grpo --iterations 2

or as one process with ``python benchmarks/accelerate_train.py ...``. ``--dump DIR`` writes each
rank's final denoiser weights (the reward head's for ``--method reward``) and last gradients
(``rank{R}.pt``) and log rows (``rows{R}.json``; the epoch history for ``reward``)
for comparison, and the main process prints a throughput line (samples per second over the run, all
ranks together; a smoke-level figure on the tiny preset, not a benchmark of real models).
With ``--no-accelerator`` the trainers get ``accelerator=None`` (the plain single-process path).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def tiny_backend(seed: int = 0):
    from t2ialign.backends import ShapesBackend
    from t2ialign.models import build_generator

    g = build_generator("tiny", seed=seed)
    torch.manual_seed(seed)
    with torch.no_grad():  # zero-initialised convs (output, residual) would block the gradients
        for p in g.unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return ShapesBackend(g)


def red_reward(images, prompts, metadata):
    """The mean of the red channel: a cheap reward with a gradient signal on the tiny model."""
    return images[:, 0].mean((1, 2)), {"n": len(prompts)}


PROMPTS = [
    {"prompt": "a red circle"},
    {"prompt": "two blue squares"},
    {"prompt": "a green triangle"},
    {"prompt": "three yellow circles"},
]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--method",
        choices=["grpo", "rwr", "ddpo", "nft", "raft", "dpo", "refl", "draft", "reward"],
        required=True,
    )
    ap.add_argument("--out", required=True, help="the trainer's output folder (log, checkpoint, model)")
    ap.add_argument("--iterations", type=int, default=2, help="iterations (RWR: steps; RAFT: rounds)")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="RWR: model samples per process per step; DDPO: global samples per iteration; "
        "RAFT: kept samples per process per gradient step",
    )
    ap.add_argument("--pretrain-batch-size", type=int, default=4, help="RWR, NFT, RAFT: per process")
    ap.add_argument(
        "--beta", type=float, default=0.0, help="RWR, NFT, RAFT: pre-training weight; GRPO: KL weight"
    )
    ap.add_argument("--ema", type=float, default=0.0, help="RWR: EMA decay of the saved weights")
    ap.add_argument(
        "--prompts-per-iter", type=int, default=2, help="GRPO, NFT, RAFT: global prompts per iteration"
    )
    ap.add_argument("--group-size", type=int, default=4, help="GRPO, NFT, RAFT: global images per prompt")
    ap.add_argument(
        "--minibatch-size", type=int, default=4, help="GRPO, DDPO, NFT: samples per process per update"
    )
    ap.add_argument("--train-steps", type=int, default=3, help="GRPO, DDPO, NFT, RAFT: denoising steps")
    ap.add_argument("--steps-per-round", type=int, default=2, help="RAFT: gradient steps per round")
    ap.add_argument("--data", type=int, default=16, help="RWR: labelled samples in the fixed data set")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lv-samples", type=int, default=0, help="DRaFT: DRaFT-LV re-noisings (0: DRaFT-K)")
    ap.add_argument("--project", default=None, help="reward: the feedback project to train on")
    ap.add_argument("--dropout", type=float, default=0.1, help="reward: dropout of the head")
    ap.add_argument("--dump", default=None, help="write rank{R}.pt and rows{R}.json here")
    ap.add_argument("--no-accelerator", action="store_true", help="train with accelerator=None")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    accelerator = None
    rank, world = 0, 1
    if not args.no_accelerator:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        rank, world = accelerator.process_index, accelerator.num_processes
    backend = tiny_backend()
    t0 = time.perf_counter()
    if args.method == "grpo":
        from t2ialign.algorithms.grpo import GRPOConfig, train_grpo

        cfg = GRPOConfig(
            iterations=args.iterations,
            prompts_per_iter=args.prompts_per_iter,
            group_size=args.group_size,
            train_steps=args.train_steps,
            guidance=1.0,
            beta=args.beta,
            minibatch_size=args.minibatch_size,
            lora_rank=0,
            lr=args.lr,
            checkpoint_every=1,
        )
        rows = train_grpo(
            backend, red_reward, PROMPTS, cfg, args.out, progress=False, accelerator=accelerator
        )
        samples = args.iterations * args.prompts_per_iter * args.group_size
    elif args.method == "ddpo":
        from t2ialign.algorithms.ddpo import DDPOConfig, train_ddpo

        cfg = DDPOConfig(
            iterations=args.iterations,
            batch_size=args.batch_size,
            train_steps=args.train_steps,
            guidance=1.0,
            buffer_size=4,
            min_count=2,
            minibatch_size=args.minibatch_size,
            lora_rank=0,
            lr=args.lr,
            checkpoint_every=1,
        )
        rows = train_ddpo(
            backend, red_reward, PROMPTS, cfg, args.out, progress=False, accelerator=accelerator
        )
        samples = args.iterations * args.batch_size
    elif args.method in ("nft", "raft"):
        from t2ialign.pipeline import world_pretrain_source

        pretrain = world_pretrain_source() if args.beta > 0 else None
        if args.method == "nft":
            from t2ialign.algorithms.nft import NFTConfig, train_nft

            cfg = NFTConfig(
                iterations=args.iterations,
                prompts_per_iter=args.prompts_per_iter,
                group_size=args.group_size,
                sample_steps=args.train_steps,
                train_batch_size=args.minibatch_size,
                pretrain_weight=args.beta,
                pretrain_batch_size=args.pretrain_batch_size,
                lr=args.lr,
                checkpoint_every=1,
            )
            train = train_nft
        else:
            from t2ialign.algorithms.raft import RAFTConfig, train_raft

            cfg = RAFTConfig(
                rounds=args.iterations,
                prompts_per_round=args.prompts_per_iter,
                samples_per_prompt=args.group_size,
                sample_steps=args.train_steps,
                guidance=1.0,
                steps_per_round=args.steps_per_round,
                batch_size=args.batch_size,
                pretrain_weight=args.beta,
                pretrain_batch_size=args.pretrain_batch_size,
                lr=args.lr,
                checkpoint_every=1,
            )
            train = train_raft
        rows = train(
            backend,
            red_reward,
            PROMPTS,
            cfg,
            args.out,
            progress=False,
            pretrain_source=pretrain,
            accelerator=accelerator,
        )
        samples = args.iterations * args.prompts_per_iter * args.group_size
    elif args.method == "dpo":
        from t2ialign.algorithms.dpo import DPOConfig, PairSamples, train_dpo
        from t2ialign.models.pretrain import world_batch

        x, prompts, _ = world_batch(3, 0, args.data)
        pairs = PairSamples(x, x[:, [1, 2, 0]], prompts)  # the loser: the winner in wrong colours
        cfg = DPOConfig(
            steps=args.iterations,
            batch_size=args.batch_size,
            beta=args.beta if args.beta > 0 else 500.0,
            lr=args.lr,
            checkpoint_every=1,
        )
        rows = train_dpo(backend, pairs, cfg, args.out, progress=False, accelerator=accelerator)
        samples = args.iterations * args.batch_size * world
    elif args.method in ("refl", "draft"):
        from t2ialign.algorithms.refl import DRaFTConfig, ReFLConfig, train_draft, train_refl
        from t2ialign.pipeline import world_pretrain_source

        common = dict(
            iterations=args.iterations,
            batch_size=args.batch_size,
            sample_steps=args.train_steps,
            guidance=1.0,
            phi="neg",
            pretrain_weight=args.beta,
            pretrain_batch_size=args.pretrain_batch_size,
            lr=args.lr,
            checkpoint_every=1,
        )
        if args.method == "refl":
            cfg, train = ReFLConfig(**common, late_steps=min(2, args.train_steps)), train_refl
        else:
            cfg, train = DRaFTConfig(**common, lv_samples=args.lv_samples), train_draft
        rows = train(
            backend,
            red_reward,
            PROMPTS,
            cfg,
            args.out,
            progress=False,
            pretrain_source=world_pretrain_source() if args.beta > 0 else None,
            accelerator=accelerator,
        )
        samples = args.iterations * args.batch_size * world
    elif args.method == "reward":
        from t2ialign.feedback import FeedbackStore
        from t2ialign.reward.train import RewardTrainConfig, train_reward_model

        if not args.project:
            ap.error("--method reward needs --project")
        cfg = RewardTrainConfig(
            hidden=32,
            dropout=args.dropout,
            batch_size=args.batch_size,
            max_epochs=args.iterations,
            patience=args.iterations,
            val_fraction=0.3,
            lr=args.lr,
        )
        model = train_reward_model(
            FeedbackStore.open(args.project),
            cfg,
            out=args.out,
            progress=False,
            command="accelerate_train.py",
            accelerator=accelerator,
        )
        rows = model.card["history"]
        samples = len(rows) * model.card["data"]["train_labels"]
    else:
        from t2ialign.algorithms.rwr import RWRConfig, WeightedSamples, train_rwr
        from t2ialign.models.pretrain import world_batch
        from t2ialign.pipeline import world_pretrain_source

        x, prompts, _ = world_batch(3, 0, args.data)
        weights = torch.linspace(0.0, 1.0, args.data)
        cfg = RWRConfig(
            steps=args.iterations,
            batch_size=args.batch_size,
            pretrain_batch_size=args.pretrain_batch_size,
            beta=args.beta,
            lr=args.lr,
            ema=args.ema,
            checkpoint_every=1,
        )
        rows = train_rwr(
            backend,
            cfg,
            WeightedSamples(x, prompts, weights),
            args.out,
            pretrain_source=world_pretrain_source() if args.beta > 0 else None,
            progress=False,
            accelerator=accelerator,
        )
        samples = args.iterations * args.batch_size * world
    wall = time.perf_counter() - t0
    summary = {"method": args.method, "processes": world, "samples": samples, "wall_s": wall}
    summary["samples_per_s"] = samples / wall
    if args.dump:
        dump = Path(args.dump)
        dump.mkdir(parents=True, exist_ok=True)
        unet = model.head if args.method == "reward" else backend.gen.unet
        state = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
        # the last step's gradient (averaged over ranks, clipped) is still on the parameters
        grads = {k: p.grad.detach().cpu() for k, p in unet.named_parameters() if p.grad is not None}
        torch.save({"params": state, "grads": grads}, dump / f"rank{rank}.pt")
        (dump / f"rows{rank}.json").write_text(json.dumps(rows))
    if rank == 0:
        print(json.dumps(summary), flush=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
