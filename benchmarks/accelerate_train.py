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
import dataclasses
import json
import time
from pathlib import Path

import torch

from t2ialign.algorithms.common import Ranks


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


class CPUFSDPAccelerator:
    """An ``Accelerator`` of a CPU (gloo) process group that reports ``DistributedType.FSDP`` with an
    FSDP2 plugin, so that the trainers shard the denoiser exactly as they do under an FSDP launch on
    GPUs. accelerate itself only routes FSDP to accelerator devices (on CPU it is MULTI_CPU); every
    other attribute is the wrapped accelerator's."""

    def __init__(self, accelerator, reshard_after_forward: bool = True, transformer_wrap: bool = False):
        from types import SimpleNamespace

        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        self._acc = accelerator
        self.distributed_type = DistributedType.FSDP
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            reshard_after_forward=reshard_after_forward,
            auto_wrap_policy="transformer_based_wrap" if transformer_wrap else None,
        )
        self.state = SimpleNamespace(fsdp_plugin=plugin)

    def __getattr__(self, name):
        return getattr(self._acc, name)


class CPUDeepSpeedAccelerator:
    """An ``Accelerator`` of a CPU (gloo) process group that reports ``DistributedType.DEEPSPEED``
    with accelerate's ``DeepSpeedPlugin`` (ZeRO ``stage``), so that the trainers hand their optimiser
    to DeepSpeed's engine exactly as under a DeepSpeed launch on GPUs (accelerate itself starts
    DeepSpeed on accelerator devices only); every other attribute is the wrapped accelerator's."""

    def __init__(self, accelerator, stage: int = 2):
        from types import SimpleNamespace

        from accelerate.utils import DeepSpeedPlugin, DistributedType

        self._acc = accelerator
        self.distributed_type = DistributedType.DEEPSPEED
        self.state = SimpleNamespace(deepspeed_plugin=DeepSpeedPlugin(zero_stage=stage))

    def __getattr__(self, name):
        return getattr(self._acc, name)


def red_reward(images, prompts, metadata):
    """The mean of the red channel: a cheap reward with a gradient signal on the tiny model."""
    return images[:, 0].mean((1, 2)), {"n": len(prompts)}


PROMPTS = [
    {"prompt": "a red circle"},
    {"prompt": "two blue squares"},
    {"prompt": "a green triangle"},
    {"prompt": "three yellow circles"},
]


# the script's flags -> the fields they set, in each config that has the field
FLAG_FIELDS = {
    "iterations": ("iterations", "steps", "rounds"),
    "batch_size": ("batch_size",),
    "pretrain_batch_size": ("pretrain_batch_size",),
    "prompts_per_iter": ("prompts_per_iter", "prompts_per_round"),
    "group_size": ("group_size", "samples_per_prompt"),
    "minibatch_size": ("minibatch_size", "train_batch_size"),
    "train_steps": ("train_steps", "sample_steps"),
    "steps_per_round": ("steps_per_round",),
    "lr": ("lr",),
    "lora_rank": ("lora_rank",),
    "ema": ("ema",),
    "lv_samples": ("lv_samples",),
    "gradient_accumulation_steps": ("gradient_accumulation_steps",),
}
# fixed for every run of this script where the config has the field: cheap, CFG-free, resumable
FIXED = {"guidance": 1.0, "checkpoint_every": 1, "buffer_size": 4, "min_count": 2, "phi": "neg"}


def config_for(args):
    """The method's config from the script's flags (through the CLI's ``method_config``)."""
    from t2ialign.cli.finetune import method_config

    fields = {f.name for f in dataclasses.fields(method_config(args.method))}
    values = {**FIXED}
    for flag, names in FLAG_FIELDS.items():
        name = next((n for n in names if n in fields), None)
        if name is not None and getattr(args, flag) is not None:
            values[name] = getattr(args, flag)
    # --beta: the pre-training weight where there is one (RWR's beta), else the KL weight (GRPO) or,
    # when > 0, DPO's temperature
    weight = "pretrain_weight" if "pretrain_weight" in fields else "beta"
    if weight in fields and (args.method != "dpo" or args.beta > 0):
        values[weight] = args.beta
    if "late_steps" in fields:
        values["late_steps"] = min(2, args.train_steps)
    return method_config(args.method, [f"{k}={v}" for k, v in values.items() if k in fields])


def train(args, backend, accelerator, world: int) -> tuple[list[dict], int]:
    """Train through the CLI's ``train_method``; returns the log rows and the samples trained on."""
    from t2ialign.cli.finetune import METHODS, train_method
    from t2ialign.models.pretrain import world_batch
    from t2ialign.pipeline import world_pretrain_source

    cfg = config_for(args)
    needs = METHODS[args.method][3]
    data = {}
    x, prompts, _ = world_batch(3, 0, args.data)
    side = getattr(backend, "resolution", None)  # a diffusers pipeline's side: resize the renders
    if side is not None and x.shape[-1] != side:
        x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True).clamp(0, 1)
    if needs == "project":
        from t2ialign.algorithms.rwr import WeightedSamples

        data["labelled"] = WeightedSamples(x, prompts, torch.linspace(0.0, 1.0, args.data))
    elif needs == "pairs":
        from t2ialign.algorithms.dpo import PairSamples

        data["pairs"] = PairSamples(x, x[:, [1, 2, 0]], prompts)  # the loser: the winner in wrong colours
    else:
        data.update(reward_fn=red_reward, prompts=PROMPTS)
    if args.beta > 0 and (getattr(cfg, "pretrain_weight", 0) > 0 or args.method == "rwr"):
        data["pretrain_source"] = world_pretrain_source()
    rows = train_method(args.method, backend, cfg, args.out, accelerator=accelerator, progress=False, **data)
    iterations = len(rows)
    if needs == "reward" and args.method not in ("refl", "draft", "ddpo"):
        samples = iterations * args.prompts_per_iter * args.group_size  # global groups
    elif args.method == "ddpo":
        samples = iterations * args.batch_size  # a global batch
    else:
        samples = iterations * args.batch_size * world  # per-process batches
    return rows, samples


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
    ap.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=None,
        help="the trainers' gradient accumulation (micro-batches per optimiser step; default: the "
        "config's 1, or the launch's)",
    )
    ap.add_argument("--lv-samples", type=int, default=0, help="DRaFT: DRaFT-LV re-noisings (0: DRaFT-K)")
    ap.add_argument("--project", default=None, help="reward: the feedback project to train on")
    ap.add_argument("--dropout", type=float, default=0.1, help="reward: dropout of the head")
    ap.add_argument("--dump", default=None, help="write rank{R}.pt and rows{R}.json here")
    ap.add_argument("--no-accelerator", action="store_true", help="train with accelerator=None")
    ap.add_argument(
        "--fsdp",
        choices=["full", "grad-op"],
        default=None,
        help="shard the denoiser with FSDP2 (full: FULL_SHARD; grad-op: SHARD_GRAD_OP, ZeRO-2's "
        "sharding); on CPU through CPUFSDPAccelerator, since accelerate routes FSDP to GPUs only",
    )
    ap.add_argument(
        "--deepspeed",
        type=int,
        choices=[1, 2],
        default=None,
        help="DeepSpeed ZeRO stage: the trainers' optimiser goes to DeepSpeed's engine; on CPU through "
        "CPUDeepSpeedAccelerator, since accelerate starts DeepSpeed on accelerator devices only",
    )
    ap.add_argument(
        "--fsdp-wrap",
        choices=["root", "transformer"],
        default="root",
        help="FSDP units: the whole denoiser (root) or also each block its class lists in "
        "_no_split_modules (transformer, TRANSFORMER_BASED_WRAP; diffusers models)",
    )
    ap.add_argument("--lora-rank", type=int, default=0, help="GRPO, DDPO, RWR: LoRA rank (0: full)")
    ap.add_argument("--dtype", default="float32", help="--model: storage dtype of the frozen weights")
    ap.add_argument(
        "--model",
        default=None,
        help="a diffusers pipeline folder (load_backend; at most 16 tokens per prompt) instead of "
        "the tiny shapes model; GRPO, DDPO, RWR, DPO",
    )
    args = ap.parse_args(argv)
    if args.fsdp and args.deepspeed:
        ap.error("--fsdp and --deepspeed are two different engines: choose one")

    torch.set_num_threads(1)
    accelerator = None
    rank, world = 0, 1
    if not args.no_accelerator:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        if args.fsdp:
            accelerator = CPUFSDPAccelerator(
                accelerator,
                reshard_after_forward=args.fsdp == "full",
                transformer_wrap=args.fsdp_wrap == "transformer",
            )
        if args.deepspeed:
            accelerator = CPUDeepSpeedAccelerator(accelerator, stage=args.deepspeed)
        rank, world = accelerator.process_index, accelerator.num_processes
    if args.model:
        from t2ialign.backends.loader import load_backend

        pipeline = json.loads((Path(args.model) / "model_index.json").read_text())["_class_name"]
        flow = "StableDiffusion3" in pipeline or "Flux" in pipeline
        opts = {"max_sequence_length": 16} if flow else {}
        backend = load_backend(args.model, device="cpu", dtype=args.dtype, **opts)
        torch.manual_seed(0)  # LoRA's random initialisation: the same in every run
    else:
        backend = tiny_backend()
    t0 = time.perf_counter()
    if args.method == "reward":
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
        rows, samples = train(args, backend, accelerator, world)
    wall = time.perf_counter() - t0
    summary = {"method": args.method, "processes": world, "samples": samples, "wall_s": wall}
    summary["samples_per_s"] = samples / wall
    if args.dump:
        dump = Path(args.dump)
        dump.mkdir(parents=True, exist_ok=True)
        unet = model.head if args.method == "reward" else backend.denoiser()
        ranks = Ranks(accelerator)  # gathers FSDP shards (a collective: every rank dumps)

        def full(t):
            return ranks.full(t, everywhere=True)

        state = {k: full(v.detach()).cpu() for k, v in unet.state_dict().items()}
        # the last step's gradient (averaged over ranks, clipped) is still on the parameters
        grads = {k: full(p.grad.detach()).cpu() for k, p in unet.named_parameters() if p.grad is not None}
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
