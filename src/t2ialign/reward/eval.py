"""Evaluation of rewards on feedback projects: accuracy, ROC AUC and calibration error, per split,
against the labels and against the ShapesEval checker.

Splits of an image, from its prompt: ``train`` and ``val`` (the prompts the reward model was trained
and validated on, from its card), ``heldout`` (other prompts of the seen part of the world),
``unseen`` (prompts of the world's held-out part, ``world.suites``) and ``other`` (outside the
world's grammar).

- **against the labels**: every active label is one example (an image labelled by three annotators
  counts three times);
- **against the checker**: every image with a spec is one example, its truth the checker's verdict.

A reward is turned into a decision by a threshold chosen on the validation split (the one that
maximises accuracy against its labels) and into a probability (for the calibration error) by
clamping to [0, 1] (a reward model trained by MSE on 0/1 labels) or, for a score that is not a
probability (a similarity), by Platt scaling fitted on the validation labels. ECE: 10 equal-width
bins, ``sum_b n_b / n * |mean label_b - mean probability_b|``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import rankdata

from t2ialign.world.checker import check

SPLITS = ("train", "val", "heldout", "unseen", "other")


# ---------------------------------------------------------------- metrics


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); NaN with one class only."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(probs, labels, bins: int = 10) -> float:
    """ECE of probabilities of the positive class: equal-width bins on [0, 1]."""
    p, y = np.clip(np.asarray(probs, dtype=np.float64), 0, 1), np.asarray(labels, dtype=np.float64)
    if len(p) == 0:
        return float("nan")
    idx = np.minimum((p * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(y[m].mean() - p[m].mean())
    return float(ece)


def choose_threshold(scores, labels) -> float:
    """The threshold t maximising the accuracy of ``score >= t`` against ``labels`` (the middle of
    the best run of cut points between sorted distinct scores)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if len(s) == 0:
        raise ValueError("cannot choose a threshold without validation examples")
    u = np.unique(s)
    cuts = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2, [u[-1] + 1.0]])
    acc = np.array([((s >= t) == y).mean() for t in cuts])
    best = np.flatnonzero(acc == acc.max())
    return float(cuts[best[len(best) // 2]])


def fit_platt(scores, labels, steps: int = 200) -> tuple[float, float]:
    """Platt scaling: (a, b) of ``P(y = 1) = sigmoid(a * s + b)`` by maximum likelihood (L-BFGS)."""
    s = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    mu, sd = s.mean(), s.std().clamp_min(1e-8) if len(s) > 1 else torch.tensor(1.0, dtype=torch.float64)
    z = (s - mu) / sd
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(w[0] * z + w[1], y) + 1e-4 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    a, b = w.detach()
    return float(a / sd), float(b - a * mu / sd)


def _none_if_nan(v: float) -> float | None:
    return None if math.isnan(v) else v


def binary_metrics(scores, labels, threshold: float, probs=None) -> dict:
    """n, accuracy at ``threshold``, ROC AUC, ECE (of ``probs``, when given) and base rates."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if len(s) == 0:
        return {"n": 0}
    out = {
        "n": int(len(s)),
        "accuracy": float(((s >= threshold) == y).mean()),
        "auc": _none_if_nan(roc_auc(s, y)),  # None with one class only
        "positive_rate": float(y.mean()),
        "predicted_positive_rate": float((s >= threshold).mean()),
    }
    if probs is not None:
        out["ece"] = expected_calibration_error(probs, y)
    return out


# ---------------------------------------------------------------- scoring projects


@dataclass
class ProjectScores:
    """One reward's scores on every labelled (or every) image of a project."""

    gids: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    world_split: list[str] = field(default_factory=list)  # seen / unseen / other
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    checker: list[bool | None] = field(default_factory=list)  # None: no spec
    label_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))  # label -> image
    label_values: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))


def score_project(
    store,
    reward_fn,
    labels: str = "all",
    only_labelled: bool = True,
    batch_size: int = 256,
    progress: bool = False,
    checker_cache: dict | None = None,
) -> ProjectScores:
    """Score the images of ``store`` with ``reward_fn`` (no gradient); run the checker on each.
    ``labels``: which labels to keep (all, human, simulated). ``checker_cache``: a dict kept across
    calls (image hash and prompt -> verdict) so that scoring several rewards checks each image once."""
    from tqdm import tqdm

    simulated = {"all": None, "human": False, "simulated": True}.get(labels, "?")
    if simulated == "?":
        raise ValueError(f"labels must be all, human or simulated, got {labels!r}")
    recs = list(store.labelled_images(simulated=simulated, load_images=False))
    if only_labelled:
        wanted = dict.fromkeys(r.generation_id for r in recs)
        gens = [store.generation(g) for g in wanted]
    else:
        gens = list(store.generations())
    out = ProjectScores()
    pos = {}
    scores = []
    starts = range(0, len(gens), batch_size)
    for i in tqdm(starts, desc="score", unit="batch", disable=not progress):
        chunk = gens[i : i + batch_size]
        imgs = np.stack([store.load_image_file(g["image_sha256"]) for g in chunk])
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
        meta = [{**g.get("metadata", {}), **({"spec": g["spec"]} if g["spec"] else {})} for g in chunk]
        with torch.no_grad():
            r, _ = reward_fn(x, [g["prompt"] for g in chunk], meta)
        scores.append(r.detach().float().cpu().numpy())
        for g, img in zip(chunk, imgs, strict=True):
            pos[g["id"]] = len(out.gids)
            out.gids.append(g["id"])
            out.prompts.append(g["prompt"])
            out.world_split.append(g["split"] if g["split"] in ("seen", "unseen") else "other")
            key = (g["image_sha256"], g["prompt"])
            if checker_cache is not None and key in checker_cache:
                verdict = checker_cache[key]
            else:
                verdict = bool(check(img, g["spec"]).correct) if g["spec"] else None
                if checker_cache is not None:
                    checker_cache[key] = verdict
            out.checker.append(verdict)
    out.scores = np.concatenate(scores) if scores else np.zeros(0)
    kept = [r for r in recs if r.generation_id in pos]
    out.label_index = np.array([pos[r.generation_id] for r in kept], dtype=int)
    out.label_values = np.array([r.label for r in kept], dtype=int)
    return out


def split_names(ps: ProjectScores, train_prompts, val_prompts) -> list[str]:
    """The split of each image of ``ps`` (see the module docstring)."""
    train, val = set(train_prompts or ()), set(val_prompts or ())
    out = []
    for p, ws in zip(ps.prompts, ps.world_split, strict=True):
        if p in val:
            out.append("val")
        elif p in train:
            out.append("train")
        elif ws == "seen":
            out.append("heldout")
        else:
            out.append(ws)  # unseen / other
    return out


def evaluate_scores(
    parts: list[ProjectScores],
    train_prompts=(),
    val_prompts=(),
    threshold: float | None = None,
    calibration: str = "clip",
    platt: tuple[float, float] | None = None,
) -> dict:
    """Metrics per split over one or more scored projects. ``threshold``: None chooses it on the
    validation labels. ``calibration``: 'clip' (probability = clamp(score, 0, 1)) or 'platt'
    (fitted on the validation labels unless ``platt`` gives (a, b))."""
    if calibration not in ("clip", "platt"):
        raise ValueError(f"calibration must be 'clip' or 'platt', got {calibration!r}")
    img_scores, img_split, img_checker, lab_scores, lab_split, lab_values = [], [], [], [], [], []
    for ps in parts:
        names = split_names(ps, train_prompts, val_prompts)
        img_scores += list(ps.scores)
        img_split += names
        img_checker += ps.checker
        lab_scores += list(ps.scores[ps.label_index])
        lab_split += [names[i] for i in ps.label_index]
        lab_values += list(ps.label_values)
    img_scores, lab_scores, lab_values = np.array(img_scores), np.array(lab_scores), np.array(lab_values)
    lab_split_a, img_split_a = np.array(lab_split), np.array(img_split)
    val_mask = lab_split_a == "val"
    if threshold is None:
        threshold = choose_threshold(lab_scores[val_mask], lab_values[val_mask])
    if calibration == "platt" and platt is None:
        if not val_mask.any():
            raise ValueError("Platt calibration needs validation labels")
        platt = fit_platt(lab_scores[val_mask], lab_values[val_mask])

    def prob(s):
        if calibration == "clip":
            return np.clip(s, 0.0, 1.0)
        return 1.0 / (1.0 + np.exp(-(platt[0] * s + platt[1])))

    result: dict = {"threshold": float(threshold), "calibration": calibration, "splits": {}}
    if platt is not None:
        result["platt"] = list(platt)
    for split in SPLITS:
        lm = lab_split_a == split
        im = (img_split_a == split) & np.array([c is not None for c in img_checker], dtype=bool)
        if not lm.any() and not (img_split_a == split).any():
            continue
        chk = np.array([bool(c) for c, m in zip(img_checker, im, strict=True) if m], dtype=bool)
        result["splits"][split] = {
            "images": int((img_split_a == split).sum()),
            "labels": binary_metrics(lab_scores[lm], lab_values[lm], threshold, prob(lab_scores[lm])),
            "checker": binary_metrics(img_scores[im], chk, threshold, prob(img_scores[im])),
        }
    return result


def format_table(result: dict) -> tuple[list[str], list[list]]:
    """(headers, rows) of :func:`evaluate_scores`'s result, for ``print_table``."""

    def f(d, k):
        v = d.get(k)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.3f}"

    headers = [
        "split",
        "images",
        "labels",
        "acc",
        "auc",
        "ece",
        "acc(checker)",
        "auc(checker)",
        "ece(checker)",
    ]
    rows = []
    for split, m in result["splits"].items():
        lab, chk = m["labels"], m["checker"]
        rows.append(
            [split, m["images"], lab["n"], f(lab, "accuracy"), f(lab, "auc"), f(lab, "ece")]
            + [f(chk, "accuracy"), f(chk, "auc"), f(chk, "ece")]
        )
    return headers, rows
