"""Evaluation of free-text prompts, where no checker can say what is correct: rewards' scores of
image folders per prompt group, a reward's agreement with held-out human labels per group, and a
before/after report.

- :func:`score_folder`: every image of an image folder (``manifest.jsonl``; prompts may be free text)
  scored by each given reward function (the learned reward, a CLIP score, ...), averaged per group.
  The group of an image is its prompt's metadata ``group`` (another key with ``by``); images without
  one are in group ``(none)``. Each mean comes with a 95% normal interval (``mean +- 1.96 sd /
  sqrt(n)``).
- :func:`label_agreement`: how well scores agree with **held-out** human labels of a feedback
  project: the labels of prompts that the reward model did not train on (its card's
  ``train_prompts``; validation prompts count as held out, though they chose the reward's early
  stop and threshold). Per group: the reward's accuracy at its threshold, and each score's ROC AUC
  against the labels (every active human good/bad label is one example).
- :func:`report_markdown`: the before/after tables, the first folder being "before".

Reward functions come in by name (``{"reward": fn, "clip": fn}``); nothing here maps names to
callables.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

NO_GROUP = "(none)"


def _stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean, sd = float(v.mean()), float(v.std(ddof=1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": sd, "ci95": [mean - half, mean + half] if n > 1 else None}


def group_of(meta: dict, by: str) -> str:
    g = meta.get(by)
    return str(g) if g is not None and str(g).strip() else NO_GROUP


def _batches(images: list[np.ndarray], batch_size: int):
    """Consecutive runs of images of one size, at most ``batch_size`` long: (start, tensor)."""
    start = 0
    while start < len(images):
        end = start + 1
        while end < len(images) and end - start < batch_size and images[end].shape == images[start].shape:
            end += 1
        x = torch.from_numpy(np.stack(images[start:end])).permute(0, 3, 1, 2).float() / 255.0
        yield start, x
        start = end


@torch.no_grad()
def score_images(images: list[np.ndarray], rows: list[dict], scorers: dict, batch_size: int = 32) -> dict:
    """Each scorer's score (a float array) of every image; ``rows`` (prompt rows, with metadata) are
    passed to the reward functions as metadata."""
    out = {}
    for name, fn in scorers.items():
        scores = np.zeros(len(images))
        for start, x in _batches(images, batch_size):
            md = rows[start : start + len(x)]
            r, _ = fn(x, [m["prompt"] for m in md], md)
            scores[start : start + len(x)] = torch.as_tensor(r).detach().float().cpu().numpy()
        if not np.isfinite(scores).all():
            raise ValueError(f"the {name} scores of some images are not finite")
        out[name] = scores
    return out


def score_folder(folder: str | Path, scorers: dict, by: str = "group", batch_size: int = 32) -> dict:
    """Score an image folder (see the module docstring): ``{"folder", "n", "by", "overall": {name:
    stats}, "groups": {group: {"n", "scores": {name: stats}}}, "images": [...]}``."""
    from t2ialign.world.imagefolder import load_image, read_manifest

    if not scorers:
        raise ValueError("score_folder needs at least one reward function")
    folder = Path(folder)
    rows = read_manifest(folder)
    if not rows:
        raise ValueError(f"{folder}: the manifest lists no images")
    images = [load_image(folder / r["file"]) for r in rows]
    scores = score_images(images, rows, scorers, batch_size)
    groups = [group_of(r, by) for r in rows]
    out = {
        "folder": str(folder),
        "n": len(rows),
        "by": by,
        "overall": {name: _stats(s) for name, s in scores.items()},
        "groups": {},
        "images": [
            {
                "file": r["file"],
                "prompt": r["prompt"],
                "group": g,
                **{k: float(s[i]) for k, s in scores.items()},
            }
            for i, (r, g) in enumerate(zip(rows, groups, strict=True))
        ],
    }
    for g in sorted(set(groups)):
        idx = [i for i, x in enumerate(groups) if x == g]
        out["groups"][g] = {"n": len(idx), "scores": {k: _stats(s[idx]) for k, s in scores.items()}}
    return out


def label_agreement(
    store,
    scorers: dict,
    train_prompts=(),
    threshold: dict | None = None,
    by: str = "group",
    batch_size: int = 32,
) -> dict:
    """Agreement of each scorer with the project's held-out human labels, per group and overall:
    ``n`` labels, ``positive_rate``, each scorer's ``auc`` and, for the scorers with a threshold in
    ``threshold`` (name -> t), ``accuracy`` of ``score >= t``."""
    from t2ialign.reward.eval import roc_auc

    train = set(train_prompts)
    recs = [r for r in store.labelled_images(simulated=False, load_images=False) if r.prompt not in train]
    if not recs:
        raise ValueError(
            f"{store.path}: no held-out human labels (every human label is of a prompt the reward "
            "trained on); label images of other prompts to measure agreement"
        )
    metas = store.prompt_metadata()
    gids = list(dict.fromkeys(r.generation_id for r in recs))
    gens = [store.generation(g) for g in gids]
    rows = [{**g["metadata"], "prompt": g["prompt"], "spec": g["spec"]} for g in gens]
    images = [store.load_image_file(g["image_sha256"]) for g in gens]
    scores = score_images(images, rows, scorers, batch_size)
    pos = {g: i for i, g in enumerate(gids)}
    idx = np.array([pos[r.generation_id] for r in recs])
    y = np.array([r.label for r in recs], dtype=bool)
    groups = np.array([group_of(metas.get(r.prompt, {}), by) for r in recs])

    def block(mask) -> dict:
        d: dict = {"n": int(mask.sum()), "positive_rate": float(y[mask].mean())}
        for name, s in scores.items():
            v = s[idx[mask]]
            auc = roc_auc(v, y[mask])
            d[name] = {"auc": None if math.isnan(auc) else auc}
            if threshold and name in threshold:
                d[name]["accuracy"] = float(((v >= threshold[name]) == y[mask]).mean())
        return d

    return {
        "by": by,
        "held_out_prompts": len({r.prompt for r in recs}),
        "overall": block(np.ones(len(recs), dtype=bool)),
        "groups": {g: block(groups == g) for g in sorted(set(groups))},
    }


def _f(x, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def report_markdown(
    folders: list[dict], agreement: dict | None = None, names: list[str] | None = None
) -> str:
    """A before/after report: per group, each scorer's mean in each folder (the first is "before")
    and the change from the first; then the agreement table when given."""
    names = names or [Path(f["folder"]).name for f in folders]
    scorers = list(folders[0]["overall"])
    groups = sorted({g for f in folders for g in f["groups"]})
    lines = ["# Evaluation report", ""]
    counts = ", ".join(f"{n} ({f['n']})" for n, f in zip(names, folders, strict=True))
    lines.append(f"Images: {counts}.")
    lines.append(f"Mean scores per prompt `{folders[0]['by']}` (95% interval in brackets).")
    lines.append("")
    head = ["group", "scorer", *names] + ([f"change {names[0]} -> {n}" for n in names[1:]])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in [*groups, "all"]:
        for s in scorers:
            cells, means = [], []
            for f in folders:
                st = f["overall"][s] if g == "all" else f["groups"].get(g, {}).get("scores", {}).get(s)
                m = st["mean"] if st else None
                means.append(m)
                ci = st.get("ci95") if st else None
                cells.append(_f(m) + (f" [{_f(ci[0])}, {_f(ci[1])}]" if ci else ""))
            change = [_f(m - means[0]) if m is not None and means[0] is not None else "-" for m in means[1:]]
            lines.append("| " + " | ".join([g, s, *cells, *change]) + " |")
    if agreement is not None:
        lines += ["", f"Agreement with held-out human labels ({agreement['held_out_prompts']} prompts):", ""]
        scorer_names = [k for k in agreement["overall"] if isinstance(agreement["overall"][k], dict)]
        head = ["group", "labels", "good rate"] + [f"{s} auc" for s in scorer_names]
        head += [f"{s} accuracy" for s in scorer_names if "accuracy" in agreement["overall"][s]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for g, d in [*agreement["groups"].items(), ("all", agreement["overall"])]:
            row = [g, str(d["n"]), _f(d["positive_rate"])] + [_f(d[s]["auc"]) for s in scorer_names]
            row += [_f(d[s]["accuracy"]) for s in scorer_names if "accuracy" in d[s]]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
