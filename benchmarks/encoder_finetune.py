"""Fine-tune the shipped dual encoder on the generator's own images (issue #5, reward accuracy).

The frozen encoder was trained on clean renders only; the generator's images are blurry, with merged
or partial shapes, and there the encoder ranks prompts poorly. This script starts from the shipped
weights (same architecture, a drop-in replacement) and continues the contrastive training on a mix:

- generated images (``benchmarks/encoder_gen_data.py``: seen-split prompts only, never a prompt of
  reward_eval's test project, seeds 10_000_000+), each captioned with what ``checker.detect`` finds
  in it, written at the detail level of the prompt it was generated for (the same attributes
  named). Images whose detection cannot be written as a prompt, or whose caption the checker
  itself rejects, are dropped. Hard negatives: the prompt it was generated for when the checker
  rejects the image, and a one-attribute perturbation of its caption;
- clean renders (``world_batch`` with a data seed not used before), optionally blurred / noised
  (``--augment``), with a one-attribute perturbation as a hard negative, as in pre-training.

Validation (a tenth of the generated prompts, held out by prompt): ROC AUC of the cosine similarity
of (image, the prompt it was generated for) against the checker's verdict.

::

    python benchmarks/encoder_finetune.py --data /work/runs/enc5/gen --out /work/runs/enc5/encoder
"""

from __future__ import annotations

import argparse
import math
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # encoder_gen_data

from t2ialign.models.encoder import load_encoder, save_encoder, zero_shot_retrieval
from t2ialign.models.pretrain import world_batch
from t2ialign.world.checker import check, detect
from t2ialign.world.grammar import parse, to_prompt
from t2ialign.world.scene import relation_holds
from t2ialign.world.spec import ObjectSpec, Spec, SpecError
from t2ialign.world.suites import is_unseen, perturbations
from t2ialign.world.vocab import RELATIONS


def caption_spec(spec: Spec, det) -> Spec | None:
    """The detection written at ``spec``'s level of detail (colours only if the prompt names one,
    background only if it names one, relation only if it has one), or None."""
    colored = any(o.color is not None for o in spec.objects)
    groups: dict = {}
    for o in det.objects:
        key = (o.shape, o.color if colored else None)
        groups.setdefault(key, []).append(o)
    if not groups or len(groups) > 2:
        return None
    keys = list(groups)
    if len(keys) == 2:  # keep the prompt's order where a group matches its first group
        first = spec.objects[0]
        if keys[1] == (first.shape, first.color if colored else None):
            keys = keys[::-1]
    bg = det.background if spec.background is not None else None
    try:
        objs = tuple(ObjectSpec(s, len(groups[(s, c)]), c) for s, c in keys)
        relation = None
        if spec.relation is not None and len(objs) == 2 and all(o.count == 1 for o in objs):
            a, b = groups[keys[0]][0], groups[keys[1]][0]
            ok = [r for r in RELATIONS if relation_holds((a.cx, a.cy), (b.cx, b.cy), r)]
            if not ok:
                return None
            relation = spec.relation if spec.relation in ok else ok[0]
        return Spec(objs, relation=relation, background=bg)
    except SpecError:
        return None


def load_generated(folder: Path):
    imgs, prompts = [], []
    for p in sorted(folder.glob("chunk-[0-9][0-9][0-9].npz")):
        z = np.load(p)
        imgs.append(z["images"])
        prompts += [str(s) for s in z["prompts"]]
    return np.concatenate(imgs), prompts


def prepare(images, prompts):
    """Per image: prompt, verdict, caption (or None). A caption that is a test prompt of reward_eval
    or falls in the unseen split (the generator can draw an orange triangle when asked for a red
    one) is dropped with its image, so that no generated example names a test prompt."""
    from encoder_gen_data import test_prompts

    banned = test_prompts()
    rows = []
    dropped = 0
    for im, p in zip(images, prompts, strict=True):
        spec = parse(p)
        det = detect(im)
        verdict = check(im, spec).correct
        cap = spec if verdict else caption_spec(spec, det)
        if cap is not None and not verdict and not check(im, cap).correct:
            cap = None
        if cap is not None and (is_unseen(cap) or to_prompt(cap) in banned):
            cap = None
        if cap is None:
            dropped += 1
        rows.append(
            {"prompt": p, "verdict": verdict, "caption": to_prompt(cap) if cap else None, "spec": cap}
        )
    return rows, dropped


def to_x(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Generator-like artefacts on renders: a random Gaussian blur (sigma 0-1 px) and pixel noise."""
    B = x.shape[0]
    sig = torch.rand(B, generator=g) * 1.0
    out = []
    r = torch.arange(-2, 3, dtype=torch.float32)
    for i in range(B):
        if sig[i] < 0.2:
            out.append(x[i])
            continue
        k = torch.exp(-(r**2) / (2 * sig[i] ** 2))
        k = k / k.sum()
        xi = x[i : i + 1]
        xi = F.conv2d(
            F.pad(xi, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3
        )
        xi = F.conv2d(
            F.pad(xi, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3
        )
        out.append(xi[0])
    x = torch.stack(out)
    noise = torch.randn(x.shape, generator=g) * (torch.rand(B, 1, 1, 1, generator=g) * 0.04)
    return (x + noise).clamp(0, 1)


def multi_pos_loss(img, texts_emb, pos_idx, n_pos_texts, scale):
    """Image -> text cross-entropy over unique texts (``pos_idx[i]``: the caption's index), and
    text -> image over the images sharing each caption (soft targets), on the first
    ``n_pos_texts`` texts (captions); the rest are negatives only."""
    logits = scale * img @ texts_emb.T  # (B, T)
    l_i2t = F.cross_entropy(logits, pos_idx)
    lt = logits[:, :n_pos_texts].T  # (Tp, B)
    tgt = F.one_hot(pos_idx, n_pos_texts).T.float()
    tgt = tgt / tgt.sum(1, keepdim=True)
    l_t2i = -(tgt * F.log_softmax(lt, dim=1)).sum(1).mean()
    return 0.5 * (l_i2t + l_t2i)


def auc(scores, y):
    from t2ialign.reward.eval import roc_auc

    return float(roc_auc(scores, y))


def best_acc(scores, y):
    from t2ialign.reward.eval import choose_threshold

    t = choose_threshold(scores, y)
    return float(((scores >= t) == y).mean())


@torch.no_grad()
def val_auc(model, images, rows):
    x = to_x(images)
    sims = []
    for s in range(0, len(rows), 256):
        sims.append(model.similarity(x[s : s + 256], [r["prompt"] for r in rows[s : s + 256]]))
    sims = torch.cat(sims).numpy()
    y = np.array([r["verdict"] for r in rows])
    return auc(sims, y), best_acc(sims, y)


def load_project(path: str, banned: set[str]):
    """Images, and rows (prompt, checker verdict), of a feedback project of training prompts only
    (reward_eval's training project): a larger validation set than the held-out generated prompts."""
    from t2ialign.feedback import FeedbackStore

    store = FeedbackStore.open(path)
    gens = [g for g in store.generations() if g["spec"]]
    leaked = {g["prompt"] for g in gens} & banned
    if leaked:
        raise SystemExit(f"{path} holds test prompts ({sorted(leaked)[:3]}...): not a validation set")
    images = np.stack([store.load_image_file(g["image_sha256"]) for g in gens])
    rows = [
        {"prompt": g["prompt"], "verdict": bool(check(im, g["spec"]).correct)}
        for g, im in zip(gens, images, strict=True)
    ]
    return images, rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--gen-batch", type=int, default=128)
    ap.add_argument("--render-batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--augment", action="store_true", help="blur/noise on half the renders")
    ap.add_argument("--data-seed", type=int, default=505, help="render stream seed (pre-training: 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--rank-weight",
        type=float,
        default=0.0,
        help="weight of a pairwise ranking loss: cos(image, its prompt) of checker-correct images above "
        "that of rejected ones (softplus(-10 (cos_pos - cos_neg)), over the batch's generated images)",
    )
    ap.add_argument(
        "--label-noise",
        type=float,
        default=0.0,
        help="flip each checker verdict with this probability (the simulated rater's labels) before "
        "the ranking loss, the hard negatives and the checkpoint selection see it",
    )
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument(
        "--val-project", default=None, help="a feedback project of training prompts to validate on"
    )
    ap.add_argument("--retrieval-n", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t0 = time.time()
    images, prompts = load_generated(Path(args.data))
    rows, dropped = prepare(images, prompts)
    from encoder_gen_data import test_prompts

    banned = test_prompts()
    t_prep = time.time() - t0
    # validation split by prompt
    uniq = sorted(set(prompts))
    random.Random(1).shuffle(uniq)
    val_p = set(uniq[: len(uniq) // 10])
    tr = [i for i, r in enumerate(rows) if r["prompt"] not in val_p and r["caption"] is not None]
    va = [i for i, r in enumerate(rows) if r["prompt"] in val_p]
    print(
        f"{len(rows)} generated images ({np.mean([r['verdict'] for r in rows]):.2f} correct), "
        f"{dropped} without a caption; train {len(tr)}, val {len(va)} images; prep {t_prep:.0f} s",
        flush=True,
    )
    vp = load_project(args.val_project, banned) if args.val_project else None
    if args.label_noise > 0:  # rater labels instead of checker verdicts, everywhere a verdict is used
        noise = np.random.default_rng([args.seed, 99])
        for rs in [rows] + ([vp[1]] if vp is not None else []):
            for r, f in zip(rs, noise.random(len(rs)) < args.label_noise, strict=True):
                r["verdict"] = bool(r["verdict"]) ^ bool(f)
    model = load_encoder(None)

    def validate():
        a = val_auc(model, images[va], [rows[i] for i in va])
        b = val_auc(model, *vp) if vp is not None else (float("nan"), float("nan"))
        return (*a, *b)

    base_auc = validate()
    print(
        f"before: val AUC {base_auc[0]:.4f} acc {base_auc[1]:.4f}; project AUC {base_auc[2]:.4f} "
        f"acc {base_auc[3]:.4f}",
        flush=True,
    )
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng([args.seed, 17])
    g = torch.Generator().manual_seed(args.seed)
    log = {"val_auc_acc": [[0, *base_auc]], "loss": []}
    xs_gen = to_x(images)
    losses = []
    best = (
        (base_auc[2], 0, {n: t.detach().clone() for n, t in model.state_dict().items()})
        if vp is not None
        else None
    )  # project AUC, step, state
    for k in range(args.steps):
        for pg in opt.param_groups:
            pg["lr"] = args.lr * min(1.0, (k + 1) / 50) * 0.5 * (1 + math.cos(math.pi * k / args.steps))
        idx = rng.choice(tr, size=args.gen_batch, replace=False)
        xr, pr, specs_r = world_batch(args.data_seed, k, args.render_batch, 32)
        if args.augment:
            half = args.render_batch // 2
            xr = torch.cat([xr[:half], augment(xr[half:], g)])
        x = torch.cat([xs_gen[idx], xr])
        caps = [rows[i]["caption"] for i in idx] + pr
        specs = [rows[i]["spec"] for i in idx] + specs_r
        texts: dict[str, int] = {}
        pos = [texts.setdefault(c, len(texts)) for c in caps]
        n_pos = len(texts)
        for i, sp in enumerate(specs):  # hard negatives
            pert = perturbations(sp)
            neg = pert[int(rng.integers(len(pert)))][1]
            t = to_prompt(neg)
            if i < len(idx) and (is_unseen(neg) or t in banned):
                continue  # generated examples never name a test prompt, not even as a negative
            if t not in texts:
                texts[t] = len(texts)
        for i in idx:
            if rows[i]["prompt"] not in texts:  # (accepted images' captions are their prompts)
                texts[rows[i]["prompt"]] = len(texts)
        img = model.encode_image(x)
        txt = model.encode_text(list(texts))
        scale = model.logit_scale.exp().clamp(max=100)
        loss = multi_pos_loss(img, txt, torch.tensor(pos), n_pos, scale)
        if args.rank_weight > 0:
            G = len(idx)
            cos_p = (img[:G] * txt[[texts[rows[i]["prompt"]] for i in idx]]).sum(-1)
            v = torch.tensor([rows[i]["verdict"] for i in idx])
            if v.any() and (~v).any():
                diff = cos_p[v][:, None] - cos_p[~v][None, :]
                loss = loss + args.rank_weight * F.softplus(-10 * diff).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (k + 1) % args.eval_every == 0 or k + 1 == args.steps:
            model.eval()
            a = validate()
            model.train()
            log["val_auc_acc"].append([k + 1, *a])
            if best is not None and a[2] > best[0]:
                best = (a[2], k + 1, {n: t.detach().clone() for n, t in model.state_dict().items()})
            log["loss"].append([k + 1, float(np.mean(losses[-50:]))])
            print(
                f"step {k + 1}: loss {np.mean(losses[-50:]):.3f}, val AUC {a[0]:.4f} acc {a[1]:.4f}; "
                f"project AUC {a[2]:.4f} acc {a[3]:.4f}, "
                f"{time.time() - t0:.0f} s",
                flush=True,
            )
    if best is not None:
        model.load_state_dict(best[2])
        log["selected_step"] = best[1]
        print(f"kept step {best[1]} (best project AUC {best[0]:.4f})", flush=True)
    model.eval().requires_grad_(False)
    ret = zero_shot_retrieval(model, n=args.retrieval_n)
    print(
        f"zero-shot retrieval: overall {ret['overall']:.3f}; "
        + ", ".join(f"{a} {v['accuracy']:.3f}" for a, v in ret["per_attribute"].items()),
        flush=True,
    )
    wall = time.time() - t0
    save_encoder(
        model,
        args.out,
        card={
            "training_command": "python " + shlex.join(sys.argv),
            "finetuned_from": "the shipped encoder (src/t2ialign/checkpoints/encoder)",
            "finetune_config": vars(args),
            "finetune_data": {
                "generated_images": len(rows),
                "train_images": len(tr),
                "val_images": len(va),
                "without_caption": dropped,
                "val_prompts": len(val_p),
                "note": "seen-split prompts only, none of reward_eval's test project; seeds 10_000_000+",
            },
            "finetune_log": log,
            "zero_shot_retrieval": ret,
            "wall_time_s": round(wall, 1),
        },
    )
    print(f"saved {args.out} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
