"""``t2ialign pretrain``, ``pretrain-encoder`` and ``sample``: the base models of the embedded world."""

from __future__ import annotations

from pathlib import Path

from t2ialign.cli.common import add_command, add_model_args, check_device
from t2ialign.cli.inputs import add_long_prompts_arg


def add_captions_arg(p) -> None:
    p.add_argument(
        "--captions",
        default="web",
        choices=["web", "exact"],
        help="caption noise of the pre-training stream: web (alt-text that miscounts and misnames, "
        "the default) or exact (the true prompts); see 't2ialign world captions'",
    )


def add_parsers(sub) -> None:
    p = add_command(
        sub,
        "pretrain",
        cmd_pretrain,
        "pre-train the text-to-image flow model on scenes rendered on the fly (resumable)",
        "t2ialign pretrain --preset small --steps 4000 --out runs/base",
    )
    p.add_argument("--preset", default="small", help="model size: tiny or small")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0, help="seeds the data stream, the noise and the weights")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after this wall time (0: none)")
    p.add_argument(
        "--snapshots",
        default="",
        help="comma-separated steps at which a copy of the weights is also kept in OUT/stepN "
        "(multiples of --checkpoint-every), for a curve of quality against steps",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    add_captions_arg(p)
    p.add_argument("--out", required=True, help="run folder; rerunning with the same folder resumes")

    p = add_command(
        sub,
        "pretrain-encoder",
        cmd_pretrain_encoder,
        "train the CLIP-like image-text encoder contrastively on renders (resumable)",
        "t2ialign pretrain-encoder --steps 2000 --out runs/encoder",
    )
    p.add_argument("--preset", default="small", help="encoder size: tiny or small")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=1, help="seeds the data stream")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--out", required=True, help="run folder; rerunning with the same folder resumes")
    p.add_argument(
        "--eval-images",
        type=int,
        default=1000,
        help="held-out renders for the zero-shot retrieval report (0: skip)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    add_captions_arg(p)
    p.add_argument(
        "--degrade",
        type=float,
        default=0.0,
        help="fraction of each batch's renders blurred and noised (0: clean renders only)",
    )
    p.add_argument(
        "--near-miss",
        type=float,
        default=0.0,
        help="probability that a prompt with two same-colour objects gets a render where they touch, "
        "as an extra negative image (0: none)",
    )
    p.add_argument(
        "--swap-negatives",
        action="store_true",
        help="also give each prompt with two coloured objects its colour swap as a negative prompt",
    )

    p = add_command(
        sub,
        "sample",
        cmd_sample,
        "sample images for prompts into an image folder",
        "t2ialign sample --prompts seen.jsonl --per-prompt 4 --out samples/ && "
        "t2ialign eval --images samples/",
    )
    p.add_argument(
        "--prompts",
        required=True,
        help="prompt file: plain text, one prompt a line, or JSON lines with 'prompt' and any metadata",
    )
    p.add_argument("--per-prompt", type=int, default=4)
    p.add_argument("--out", required=True)
    add_long_prompts_arg(p)
    add_model_args(
        p,
        "a generator folder (default: the shipped model), a fine-tuned run folder, or a diffusers "
        "pipeline folder (SD 1.5, SDXL, SD3, FLUX; a saved LoRA folder too)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (Euler for flow models, DDIM for SD)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance weight")
    p.add_argument("--seed", type=int, default=0, help="first seed; image k uses seed + k")


def cmd_pretrain(args) -> int:
    from t2ialign.models.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(
        preset=args.preset,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        data_seed=args.seed,
        init_seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        max_minutes=args.max_minutes,
        device=args.device,
        captions=args.captions,
    )
    snapshots = tuple(int(s) for s in args.snapshots.split(",") if s.strip())
    pretrain(cfg, args.out, snapshots=snapshots)
    print(f"saved the generator to {args.out} (load it with --model {args.out})")
    return 0


def cmd_pretrain_encoder(args) -> int:
    import json

    from t2ialign.models.encoder import EncoderTrainConfig, pretrain_encoder, zero_shot_retrieval

    cfg = EncoderTrainConfig(
        preset=args.preset,
        steps=args.steps,
        batch_size=args.batch_size,
        data_seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        degrade=args.degrade,
        near_miss=args.near_miss,
        swap_negatives=args.swap_negatives,
        captions=args.captions,
    )
    model = pretrain_encoder(cfg, args.out)
    if args.eval_images > 0:
        res = zero_shot_retrieval(model, n=args.eval_images)
        card_path = Path(args.out) / "card.json"
        card = json.loads(card_path.read_text())
        card["zero_shot_retrieval"] = res
        card_path.write_text(json.dumps(card, indent=1))
        print(f"zero-shot retrieval on {res['n']} held-out renders: overall {res['overall']:.3f}")
        for a, v in res["per_attribute"].items():
            print(f"  {a:<11} {v['accuracy']:.3f}  (n={v['n']})")
    print(f"saved the encoder to {args.out}")
    return 0


def cmd_sample(args) -> int:
    from t2ialign.cli.inputs import check_prompts_for, load_sampler
    from t2ialign.prompts import read_prompt_file
    from t2ialign.sampling import generate_images
    from t2ialign.world.imagefolder import MANIFEST, manifest_row, save_image, write_prompts

    if args.per_prompt < 1:
        raise ValueError("--per-prompt must be at least 1")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    check_device(args.device)
    pf = read_prompt_file(args.prompts)
    model = load_sampler(args.model, args.backend, args.device, args.dtype)
    check_prompts_for(pf, model, args.long_prompts)
    expanded = [r for r in pf.rows for _ in range(args.per_prompt)]
    seeds = [args.seed + k for k in range(len(expanded))]
    settings = {"model": model.model_id, "steps": args.steps, "guidance": args.guidance}
    manifest = [
        manifest_row(f"{k:06d}.png", r, seed=seeds[k], **settings) for k, r in enumerate(expanded)
    ]  # before sampling: a metadata key that clashes stops here
    images = generate_images(
        model,
        [r["prompt"] for r in expanded],
        seeds,
        steps=args.steps,
        guidance=args.guidance,
        batch_size=args.batch_size,
        progress=True,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for m, img in zip(manifest, images, strict=True):
        save_image(img, out / m["file"])
    write_prompts(manifest, out / MANIFEST)
    print(f"wrote {len(manifest)} images from {model.model_id} to {out}")
    return 0
