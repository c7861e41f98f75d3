"""``t2ialign reward train`` and ``t2ialign reward eval``: the reward model of the seed paper.

``reward train`` started by ``accelerate launch`` with several processes trains data-parallel (each
batch split over the processes; see ``t2ialign.reward.train.train_reward_model``); the main process
alone writes the checkpoint and prints.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from t2ialign.cli.common import add_command, check_device, finish_accelerator, launch_accelerator, print_table


def add_parsers(sub) -> None:
    group = add_command(
        sub,
        "reward",
        _no_subcommand,
        "train and evaluate reward models on a feedback project",
        "t2ialign reward train --project proj && t2ialign reward eval --project proj --reward proj/reward",
    )
    rsub = group.add_subparsers(dest="reward_command", metavar="SUBCOMMAND")
    group.set_defaults(_group=group)

    p = add_command(
        rsub,
        "train",
        cmd_train,
        "train a reward model (frozen encoder + MLP head) on a project's labels and comparisons",
        "t2ialign reward train --project proj --out proj/reward --lambda 0.5 --temperature 2",
    )
    p.add_argument("--project", required=True, help="feedback project folder")
    p.add_argument("--out", default=None, help="checkpoint folder (default: PROJECT/reward)")
    p.add_argument("--no-aux", action="store_true", help="leave out the prompt-classification loss")
    p.add_argument(
        "--swap-words",
        action="append",
        default=[],
        metavar="counts|colours|FILE",
        help="free-text prompts without metadata 'negatives': make the auxiliary loss's negatives by "
        "swapping counts (one .. ten), colours, or the words of a word-list file (one group of "
        "interchangeable words a line); repeatable",
    )
    p.add_argument(
        "--swap-limit", type=int, default=16, help="at most this many word-swapped negatives a prompt"
    )
    p.add_argument("--lambda", dest="lam", type=float, default=0.5, help="weight of the auxiliary loss")
    p.add_argument("--temperature", type=float, default=2.0, help="T of the auxiliary softmax")
    p.add_argument("--no-pairs", action="store_true", help="ignore pairwise comparisons (Bradley-Terry)")
    p.add_argument("--bt-weight", type=float, default=1.0, help="weight of the Bradley-Terry loss")
    p.add_argument(
        "--labels", choices=["all", "human", "simulated"], default="all", help="which labels to learn from"
    )
    p.add_argument(
        "--backbone", choices=["encoder", "clip"], default="encoder", help="frozen image-text encoder"
    )
    p.add_argument(
        "--backbone-path",
        default=None,
        help="encoder folder (default: the shipped one), or the local CLIP folder for --backbone clip",
    )
    p.add_argument("--hidden", type=int, default=256, help="hidden units of the MLP head")
    p.add_argument(
        "--features",
        choices=["concat", "product"],
        default="concat",
        help="MLP input: [img, txt, img*txt] (the paper's kind) or img*txt alone",
    )
    p.add_argument(
        "--cosine-skip",
        action="store_true",
        help="add a skip connection from the encoder's cosine similarity (fitted by least squares first)",
    )
    p.add_argument("--epochs", type=int, default=300, help="at most this many epochs")
    p.add_argument("--patience", type=int, default=30, help="early stopping patience, in epochs")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of prompts for validation")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda (under 'accelerate launch': cuda trains on each process's own GPU)",
    )

    p = add_command(
        rsub,
        "eval",
        cmd_eval,
        "accuracy, ROC AUC and calibration error of a reward model, per split, against the labels "
        "and against the ShapesEval checker",
        "t2ialign reward eval --project proj --reward proj/reward --json reward_eval.json",
    )
    p.add_argument("--project", required=True, help="feedback project folder")
    p.add_argument("--reward", required=True, help="reward checkpoint folder (from 'reward train')")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--labels", choices=["all", "human", "simulated"], default="all", help="which labels")
    p.add_argument("--backbone-path", default=None, help="where the reward's backbone lives now, if moved")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def _no_subcommand(args) -> int:
    args._group.print_help(sys.stderr)
    return 2


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _project(path: str):
    from t2ialign.feedback import FeedbackStore

    if not Path(path).is_dir():
        raise FileNotFoundError(f"--project {path}: no such folder")
    return FeedbackStore.open(path)


def swap_groups(names: list[str]) -> tuple[tuple[str, ...], ...]:
    """``--swap-words`` values -> word groups: ``counts``, ``colours`` (``colors``) or a word-list file."""
    from t2ialign.reward.negatives import COLOUR_WORDS, COUNT_WORDS, read_word_groups

    groups: list[tuple[str, ...]] = []
    for name in names:
        if name == "counts":
            groups.append(COUNT_WORDS)
        elif name in ("colours", "colors"):
            groups.append(COLOUR_WORDS)
        elif Path(name).is_file():
            groups.extend(read_word_groups(name))
        else:
            raise ValueError(f"--swap-words {name!r}: not counts, colours, nor a word-list file")
    return tuple(groups)


def cmd_train(args) -> int:
    from t2ialign.reward.train import RewardTrainConfig, train_reward_model

    cfg = RewardTrainConfig(
        swap_words=swap_groups(args.swap_words),
        swap_limit=args.swap_limit,
        backbone=args.backbone,
        backbone_path=args.backbone_path,
        hidden=args.hidden,
        features=args.features,
        cosine_skip=args.cosine_skip,
        aux=not args.no_aux,
        lam=args.lam,
        temperature=args.temperature,
        pairs=not args.no_pairs,
        bt_weight=args.bt_weight,
        labels=args.labels,
        val_fraction=args.val_fraction,
        lr=args.lr,
        max_epochs=args.epochs,
        patience=args.patience,
        seed=args.seed,
        device=args.device,
    )
    if args.backbone_path is not None and not Path(args.backbone_path).is_dir():
        raise FileNotFoundError(f"--backbone-path {args.backbone_path}: no such folder")
    store = _project(args.project)
    out = Path(args.out) if args.out else Path(args.project) / "reward"
    command = shlex.join(["t2ialign", *sys.argv[1:]])
    accelerator = launch_accelerator(check_device(args.device))
    if accelerator is not None and accelerator.is_main_process:
        n, kind = accelerator.num_processes, accelerator.device.type
        print(f"reward train: data-parallel over {n} processes ({kind})")
    model = train_reward_model(store, cfg, out=out, command=command, accelerator=accelerator)
    finish_accelerator(accelerator)
    if accelerator is not None and not accelerator.is_main_process:
        return 0
    card = model.card
    d, m = card["data"], card["metrics"]
    print(
        f"trained on {d['labels']} labels of {d['images']} images ({d['train_prompts']} train / "
        f"{d['val_prompts']} validation prompts), {d['aux_examples']} auxiliary examples, "
        f"{d['pairs']} pairs; {card['epochs']} epochs, best {card['best_epoch']}"
    )
    rows = [
        [s, m[s]["n"]] + [_f(m[s].get(k)) for k in ("accuracy", "auc", "ece")]
        for s in ("train", "val")
        if s in m
    ]
    if cfg.aux and d.get("good_without_negatives"):
        print(
            f"note: {d['good_without_negatives']} good labels have no negatives for the auxiliary loss "
            "(free-text prompts: give 'negatives' in the prompt file's metadata, or --swap-words); "
            "they train the other losses only"
        )
    if rows:
        print_table(["split", "labels", "acc", "auc", "ece"], rows)
        print(f"threshold {m['threshold']:.3f} (chosen on {m['threshold_from']})")
    print(f"saved {out}")
    return 0


def cmd_eval(args) -> int:
    from t2ialign.reward.eval import evaluate_scores, format_table, score_project
    from t2ialign.reward.model import load_reward_model
    from t2ialign.reward.rewards import ModelReward

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not Path(args.reward).exists():
        raise FileNotFoundError(f"--reward {args.reward}: no such folder")
    model = load_reward_model(args.reward, device=args.device, backbone_path=args.backbone_path)
    store = _project(args.project)
    scores = score_project(
        store, ModelReward(model), labels=args.labels, batch_size=args.batch_size, progress=True
    )
    if len(scores.gids) == 0:
        raise ValueError(f"{args.project}: no labelled images to evaluate on")
    split = model.card.get("split", {})
    threshold = model.card.get("metrics", {}).get("threshold", 0.5)
    result = evaluate_scores(
        [scores], split.get("train_prompts", []), split.get("val_prompts", []), threshold=threshold
    )
    result.update({"reward": str(Path(args.reward).resolve()), "project": str(Path(args.project).resolve())})
    result["threshold_from"] = model.card.get("metrics", {}).get("threshold_from", "default 0.5")
    headers, rows = format_table(result)
    print_table(headers, rows)
    print(
        f"threshold {result['threshold']:.3f} ({result['threshold_from']}); probabilities: score clamped "
        "to [0, 1]; 'checker': agreement with ShapesEval"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0
