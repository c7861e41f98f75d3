"""``t2ialign finetune METHOD`` and ``t2ialign demo``: alignment from the shell.

The CLI is the one place where names map to callables: METHOD to a trainer, REWARD to a reward
function (``checker``, a rule reward's name, a trained reward's folder, or a weighted mix such as
``checker:0.7,runs/reward:0.3``).

Started by ``accelerate launch`` with several processes (``accelerate launch --multi_gpu
--num_processes 2 -m t2ialign finetune grpo ...``), ``finetune`` trains data-parallel: one
``accelerate.Accelerator`` (on the CPU with ``--device cpu`` or without CUDA) goes to the trainer,
each process holds the model on its own device, and the main process alone writes the run folder
and prints.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from pathlib import Path

from t2ialign.cli.common import (
    add_command,
    add_model_args,
    check_device,
    finish_accelerator,
    launch_accelerator,
)
from t2ialign.cli.inputs import add_long_prompts_arg

# METHOD -> (module, config class, train function, needs)
METHODS = {
    "rwr": ("t2ialign.algorithms.rwr", "RWRConfig", "train_rwr", "project"),
    "ddpo": ("t2ialign.algorithms.ddpo", "DDPOConfig", "train_ddpo", "reward"),
    "grpo": ("t2ialign.algorithms.grpo", "GRPOConfig", "train_grpo", "reward"),
    "mixgrpo": ("t2ialign.algorithms.mixgrpo", "MixGRPOConfig", "train_mixgrpo", "reward"),
    "nft": ("t2ialign.algorithms.nft", "NFTConfig", "train_nft", "reward"),
    "raft": ("t2ialign.algorithms.raft", "RAFTConfig", "train_raft", "reward"),
    "refl": ("t2ialign.algorithms.refl", "ReFLConfig", "train_refl", "reward"),
    "draft": ("t2ialign.algorithms.refl", "DRaFTConfig", "train_draft", "reward"),
    "dpo": ("t2ialign.algorithms.dpo", "DPOConfig", "train_dpo", "pairs"),
    "nft-labelled": (
        "t2ialign.algorithms.nft_labelled",
        "LabelledNFTConfig",
        "train_nft_labelled",
        "project",
    ),
}
ITERATION_FIELDS = ("steps", "iterations", "rounds", "epochs")


def add_parsers(sub) -> None:
    p = add_command(
        sub,
        "finetune",
        cmd_finetune,
        "fine-tune a generator: the seed paper's reward-weighted likelihood or an online/preference method",
        "t2ialign finetune grpo --reward checker --iterations 20 --out runs/grpo\n"
        "  t2ialign finetune rwr --project proj --reward runs/reward --out runs/rwr\n"
        "  accelerate launch --multi_gpu --num_processes 2 -m t2ialign finetune grpo --reward checker "
        "--out runs/grpo2",
    )
    p.add_argument("method", choices=list(METHODS), help="the algorithm")
    p.add_argument("--out", required=True, help="run folder; rerunning with the same folder resumes")
    add_model_args(
        p,
        "base model: a shapes generator folder (default: the shipped one) or a diffusers "
        "pipeline folder (SD 1.5, SDXL, SD3, FLUX)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cpu or cuda (default: cpu for a shapes generator, cuda when available for a diffusers "
        "pipeline; under 'accelerate launch' each process's own GPU, or the CPU with --device cpu)",
    )
    p.add_argument(
        "--reward",
        default=None,
        help="checker | counting | partial | similarity | clip=CLIP_FOLDER (CLIP score) | "
        "pickscore=FOLDER (PickScore) | aesthetic=MLP_WEIGHTS@CLIP_FOLDER (LAION's aesthetic predictor) | "
        "a reward folder | a mix 'checker:0.7,DIR:0.3'; checker, counting and partial need prompts of "
        "the shapes grammar",
    )
    p.add_argument("--project", default=None, help="feedback project (rwr: labelled images; dpo: pairs)")
    p.add_argument(
        "--prompts",
        default=None,
        help="prompt file for online methods: plain text, one prompt a line, or JSON lines with "
        "'prompt' and any metadata (passed to the reward); default: the world's seen suite",
    )
    add_long_prompts_arg(p)
    p.add_argument("--iterations", type=int, default=None, help="steps / iterations / rounds of the method")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--weight",
        choices=["label", "reward", "filter"],
        default="label",
        help="rwr: weight labelled samples by the label, the reward score or a 0/1 filter",
    )
    p.add_argument(
        "--pseudo-per-prompt",
        type=int,
        default=0,
        help="rwr: unlabelled samples per prompt scored by --reward (the paper's pseudo-labels)",
    )
    p.add_argument("--humans-only", action="store_true", help="use only human labels (not simulated ones)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any field of the method's config dataclass, e.g. --set beta=0.5 (repeatable)",
    )

    p = add_command(
        sub,
        "demo",
        cmd_demo,
        "run the whole loop on the embedded world and write a report (the main job)",
        "t2ialign demo --out demo   # or: t2ialign demo --quick --out demo-quick",
    )
    p.add_argument("--out", default="demo", help="output folder (must be new or empty)")
    p.add_argument("--quick", action="store_true", help="a 3-minute version with fewer images and steps")
    p.add_argument("--ablation", action="store_true", help="also run the paper's Table 3 ablation")
    p.add_argument("--model", default=None, help="base generator folder (default: the shipped model)")
    p.add_argument("--encoder", default=None, help="encoder folder (default: the shipped encoder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts-per-task", type=int, default=None, help="seen/unseen prompts per task")
    p.add_argument("--sample-steps", type=int, default=None, help="Euler steps of every sampling stage")
    p.add_argument(
        "--feedback-per-prompt", type=int, default=None, help="images labelled per prompt and round"
    )
    p.add_argument(
        "--train-guidance",
        type=float,
        default=None,
        help="guidance of the images labelled and pseudo-labelled for fine-tuning (default: 3, the "
        "evaluation's)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="relabelling rounds: label the tuned model's images, retrain the reward, fine-tune again",
    )
    p.add_argument(
        "--select",
        choices=["random", "uncertain"],
        default="random",
        help="images sent to be labelled in rounds after the first: random, or those the reward is least "
        "sure of (active learning)",
    )
    p.add_argument(
        "--method",
        choices=["rwr", "nft-labelled"],
        default="rwr",
        help="fine-tuning on the labels: rwr (the seed paper's) or nft-labelled (DiffusionNFT's loss on "
        "the good and the bad images; docs/RESULTS.md says why)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the demo in --out (a killed round resumes)"
    )
    p.add_argument(
        "--ceiling", default=None, help="with --ablation: an exact-caption generator, as Table 3's last row"
    )


def apply_overrides(cfg, items: list[str]):
    """Apply ``FIELD=VALUE`` strings to a config dataclass (types from its annotations)."""
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        key, val = item.split("=", 1)
        if key not in hints:
            names = ", ".join(f.name for f in dataclasses.fields(cfg))
            raise ValueError(f"--set {key!r}: {type(cfg).__name__} has no such field; fields: {names}")
        typ = hints[key]
        base = typing.get_args(typ)[0] if typing.get_origin(typ) in (typing.Union, type(int | None)) else typ
        if base is bool:
            changes[key] = val.lower() in ("1", "true", "yes", "on")
        elif base in (int, float, str):
            try:
                changes[key] = base(val)
            except ValueError:
                raise ValueError(f"--set {key}={val!r}: expected {base.__name__}") from None
        else:
            raise ValueError(f"--set {key}: fields of type {typ} cannot be set from the command line")
    return dataclasses.replace(cfg, **changes)


def method_config(method: str, overrides: list[str] | None = None):
    """METHOD's config dataclass with ``FIELD=VALUE`` overrides (its defaults without)."""
    mod_name, cfg_name, _, _ = METHODS[method]
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"method {method!r} is not available in this build ({e})") from None
    return apply_overrides(getattr(mod, cfg_name)(), list(overrides or []))


def check_launch(cfg, accelerator, dtype: str | None = None) -> None:
    """Before any model loads: the config's gradient accumulation against the launch's, and the
    launcher's ``--mixed_precision`` against the model's ``--dtype`` (see ``algorithms.run``)."""
    from t2ialign.algorithms.run import check_mixed_precision, resolve_accumulation

    resolve_accumulation(cfg.gradient_accumulation_steps, accelerator)
    if dtype is not None:
        from t2ialign.backends.loader import parse_dtype

        check_mixed_precision(accelerator, parse_dtype(dtype))
    else:  # the embedded model trains in float32
        check_mixed_precision(accelerator, None)


def train_method(
    method: str,
    backend,
    cfg,
    out,
    *,
    reward_fn=None,
    prompts: list[dict] | None = None,
    labelled=None,
    pseudo=None,
    pairs=None,
    pretrain_source=None,
    accelerator=None,
    progress: bool = True,
) -> list[dict]:
    """Train ``backend`` with METHOD: the one entry point from a method's name to its trainer, for
    the CLI and the benchmarks. What a method needs: ``labelled`` (and ``pseudo``) samples for RWR,
    ``pairs`` for DPO, ``reward_fn`` and ``prompts`` for the online methods; ``pretrain_source``
    goes to every trainer with a pre-training term. Returns the trainer's log rows."""
    mod_name, _, fn_name, needs = METHODS[method]
    train = getattr(importlib.import_module(mod_name), fn_name)
    kwargs = {"progress": progress}
    if accelerator is not None:
        if "accelerator" not in inspect.signature(train).parameters:
            raise ValueError(f"method {method!r} does not train data-parallel (no accelerator support)")
        kwargs["accelerator"] = accelerator
    if needs == "project":
        if "pseudo" in inspect.signature(train).parameters:
            kwargs["pseudo"] = pseudo
        elif pseudo is not None:
            raise ValueError(f"{method} trains on the labelled images only: drop --pseudo-per-prompt")
        return train(backend, cfg, labelled, out, pretrain_source=pretrain_source, **kwargs)
    if needs == "pairs":
        return train(backend, pairs, cfg, out, **kwargs)
    if "pretrain_source" in inspect.signature(train).parameters:
        kwargs["pretrain_source"] = pretrain_source
    return train(backend, reward_fn, prompts, cfg, out, **kwargs)


def build_reward(text: str | None):
    """REWARD string -> reward_fn(images, prompts, metadata) -> (rewards, info)."""
    from t2ialign.reward import rewards as R

    if not text:
        raise ValueError(
            "this method needs --reward (checker, counting, partial, similarity, clip=CLIP_FOLDER, "
            "pickscore=FOLDER, a reward folder, or a mix like 'checker:0.7,runs/reward:0.3')"
        )
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) > 1 or ":" in parts[0]:
        fns = []
        for part in parts:
            name, _, w = part.rpartition(":")
            if not name:
                raise ValueError(f"--reward {text!r}: each part of a mix is NAME:WEIGHT")
            try:
                weight = float(w)
            except ValueError:
                raise ValueError(f"--reward {text!r}: {w!r} is not a weight") from None
            fns.append((build_reward(name), weight))
        return R.mix_rewards(fns)
    name = parts[0]
    named = {"checker": R.checker_reward, "counting": R.counting_reward, "partial": R.partial_credit_reward}
    if name in named:
        return named[name]
    if name == "similarity":
        return R.SimilarityReward()
    kind, _, folder = name.partition("=")
    if kind == "aesthetic" and folder:
        from t2ialign.reward.aesthetic import AestheticReward
        from t2ialign.reward.clip import CLIPBackbone

        weights, at, clip = folder.partition("@")
        if not at or not Path(clip).is_dir():
            raise ValueError(f"--reward {name!r}: expected aesthetic=WEIGHTS_FILE@CLIP_FOLDER")
        return AestheticReward(CLIPBackbone(clip), weights)
    if kind in ("clip", "pickscore") and folder:
        from t2ialign.reward.clip import CLIPBackbone

        if not Path(folder).is_dir():
            raise ValueError(f"--reward {name!r}: {folder} is not a folder (a local CLIPModel folder)")
        backbone = CLIPBackbone(folder)
        if kind == "clip":  # the CLIP score: the cosine of the embeddings
            return R.SimilarityReward(backbone, name="clip")
        # PickScore: logit_scale.exp() times the cosine, on PickScore_v1's weights and processor
        return R.SimilarityReward(backbone, name="pickscore", scale=float(backbone.model.logit_scale.exp()))
    if Path(name).is_dir():
        return R.ModelReward.load(name)
    raise ValueError(
        f"--reward {name!r}: not a known reward (checker, counting, partial, similarity, clip=FOLDER, "
        "pickscore=FOLDER, aesthetic=WEIGHTS@CLIP_FOLDER) nor a reward folder"
    )


RULE_REWARDS = ("checker", "counting", "partial")  # they read the prompt's spec


def _prompt_file(path: str | None, reward: str | None):
    """The online methods' prompt file (read before any model loads; None: the seen suite). A rule
    reward (the checker, counting, partial) with free-text prompts is an error naming the line."""
    from t2ialign.prompts import needs_spec_error, read_prompt_file

    if not path:
        return None
    pf = read_prompt_file(path)
    names = [part.strip().rpartition(":")[0] or part.strip() for part in (reward or "").split(",")]
    rules = [n for n in names if n in RULE_REWARDS]
    free = pf.free_text()
    if rules and free:
        err = needs_spec_error(f"the {rules[0]} reward", pf.rows[free[0]]["prompt"], pf.where(free[0]))
        raise ValueError(
            f"{err}; {len(free)} of {len(pf.rows)} prompts are free text: score them with a learned "
            "reward (--reward REWARD_DIR) or a CLIP score (--reward clip=CLIP_DIR)"
        )
    return pf


def cmd_finetune(args) -> int:
    from t2ialign.backends import ShapesBackend
    from t2ialign.models import load_generator

    needs = METHODS[args.method][3]
    cfg = method_config(args.method)
    overrides = list(args.set)
    if args.iterations is not None:
        field = next((f for f in ITERATION_FIELDS if hasattr(cfg, f)), None)
        overrides.append(f"{field}={args.iterations}")
    if args.lora_rank is not None:
        overrides.append(f"lora_rank={args.lora_rank}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = apply_overrides(cfg, overrides)
    accelerator = launch_accelerator(check_device(args.device))
    check_launch(cfg, accelerator, args.dtype if args.model is not None else None)
    device = args.device
    if accelerator is not None:
        device = accelerator.device
        if accelerator.is_main_process:
            fsdp = str(accelerator.distributed_type.value) == "FSDP"
            how = "FSDP2, the denoiser sharded" if fsdp else "replicated weights"
            n = accelerator.num_processes
            print(f"{args.method}: data-parallel over {n} processes ({device.type}, {how})")
    is_main = accelerator is None or accelerator.is_main_process
    run = dict(accelerator=accelerator)
    pf = _prompt_file(args.prompts, args.reward) if needs == "reward" else None
    if args.model is None:
        backend = ShapesBackend(load_generator(device=device if device is not None else "cpu"))
    else:
        from t2ialign.backends.loader import load_backend

        backend = load_backend(args.model, args.backend, device=device, dtype=args.dtype)
    shapes = isinstance(backend, ShapesBackend)
    pre = None
    if shapes:
        from t2ialign.pipeline import world_pretrain_source

        pre = world_pretrain_source(size=backend.gen.config.image_size)
    out = Path(args.out)
    if needs == "project":
        from t2ialign.feedback import FeedbackStore
        from t2ialign.pipeline import pseudo_labelled, rwr_data_from_store

        if not args.project:
            raise ValueError(f"{args.method} needs --project (a feedback project with labels)")
        store = FeedbackStore.open(args.project)
        reward_fn = build_reward(args.reward) if args.reward else None
        labelled = rwr_data_from_store(
            store, reward_fn, weight=args.weight, simulated=False if args.humans_only else None
        )
        pseudo = None
        if args.pseudo_per_prompt > 0:
            if reward_fn is None:
                raise ValueError("--pseudo-per-prompt needs --reward to score the unlabelled samples")
            rows = [{"prompt": p} for p in dict.fromkeys(labelled.prompts)]
            if not shapes:
                raise ValueError("--pseudo-per-prompt is implemented for the embedded world's model only")
            pseudo = pseudo_labelled(
                backend.gen, rows, args.pseudo_per_prompt, reward_fn, weight="filter", progress=is_main
            )
        knob = "beta" if args.method == "rwr" else "pretrain_weight"
        if pre is None and getattr(cfg, knob) > 0:
            raise ValueError(f"this model has no built-in pre-training data: add --set {knob}=0")
        train_method(
            args.method, backend, cfg, out, labelled=labelled, pseudo=pseudo, pretrain_source=pre, **run
        )
    elif needs == "pairs":
        from t2ialign.feedback import FeedbackStore
        from t2ialign.pipeline import pairs_from_store

        if not args.project:
            raise ValueError("dpo needs --project (a feedback project with pairwise comparisons)")
        pairs = pairs_from_store(
            FeedbackStore.open(args.project), simulated=False if args.humans_only else None
        )
        train_method(args.method, backend, cfg, out, pairs=pairs, **run)
    else:
        from t2ialign.cli.inputs import check_prompts_for
        from t2ialign.world.suites import suite

        if pf is not None:
            check_prompts_for(pf, backend, args.long_prompts)
        rows = pf.rows if pf is not None else suite("seen")
        reward_fn = build_reward(args.reward)
        train_method(
            args.method, backend, cfg, out, reward_fn=reward_fn, prompts=rows, pretrain_source=pre, **run
        )
    finish_accelerator(accelerator)
    if is_main:
        print(f"saved the fine-tuned generator to {out}; sample it with: t2ialign sample --model {out} ...")
    return 0


def cmd_demo(args) -> int:
    from t2ialign.demo import DemoConfig, quick_config, run_demo

    kw = dict(
        out=args.out,
        model=args.model,
        encoder=args.encoder,
        ablation=args.ablation,
        ceiling=args.ceiling,
        seed=args.seed,
        rounds=args.rounds,
        select=args.select,
        method=args.method,
    )
    for name in ("prompts_per_task", "sample_steps", "feedback_per_prompt", "train_guidance"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    cfg = quick_config(**kw) if args.quick else DemoConfig(**kw)
    run_demo(cfg, resume=args.resume)
    return 0
