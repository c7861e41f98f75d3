"""The image-folder interchange format, and scoring a folder with ShapesEval.

A folder holds PNG images and ``manifest.jsonl``, one JSON object a line::

    {"file": "000000.png", "prompt": "two blue circles", "spec": {...}, "task": "counting",
     "split": "seen", "seed": 0}

``file`` is relative to the folder; ``prompt`` is required, the rest is derived from it when missing
(``spec`` by parsing, ``task`` from the spec) where the world's grammar reads the prompt. Other keys
are the prompt's metadata (``group``, ...). Any model's images, ours or another's, are scored by
writing such a folder and running ``t2ialign eval --images DIR`` (ShapesEval: prompts of the
grammar only; free-text prompts are scored by a reward or CLIP, ``t2ialign.evaluation.freetext``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from t2ialign.prompts import PromptFileError, metadata_of, read_jsonl_rows, read_prompt_file
from t2ialign.world.checker import check
from t2ialign.world.spec import Spec

MANIFEST = "manifest.jsonl"


ManifestError = PromptFileError  # a manifest or image that cannot be read; names the file and line


def write_prompts(rows: list[dict], path: str | Path) -> None:
    """Write rows (dicts) as JSON lines."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_prompts(path: str | Path, require_spec: bool = False) -> list[dict]:
    """Read a prompt file: JSON lines with ``prompt`` (and any metadata) or plain text, one prompt a
    line (see :mod:`t2ialign.prompts`). ``spec``, ``task`` and ``split`` are filled in where the
    world's grammar reads the prompt, else None; ``require_spec`` makes that an error."""
    return read_prompt_file(path, require_spec=require_spec).rows


def read_manifest(folder: str | Path, require_spec: bool = False) -> list[dict]:
    """Read ``folder/manifest.jsonl`` (``file`` and ``prompt`` required; prompts may be free text
    unless ``require_spec``); errors name the file and the line."""
    return read_jsonl_rows(Path(folder) / MANIFEST, ("file", "prompt"), require_spec=require_spec).rows


def manifest_row(file: str, row: dict, **extra) -> dict:
    """The manifest entry of an image of prompt row ``row``: ``file``, the prompt, its spec, task and
    split (None for free text), its metadata, then ``extra`` (seed, model, sampler settings). A
    metadata key that the manifest writes itself is an error."""
    meta = metadata_of(row)
    clash = sorted(k for k in meta if k == "file" or k in extra)
    if clash:
        raise ValueError(
            f"the metadata of {row['prompt']!r} holds {', '.join(clash)}, which the image folder's "
            "manifest writes itself: rename that key in the prompt file"
        )
    out = {"file": file, "prompt": row["prompt"]}
    out.update({k: row.get(k) for k in ("spec", "task", "split")})
    return {**out, **meta, **extra}


def save_image(image: np.ndarray, path: str | Path) -> None:
    Image.fromarray(np.asarray(image, dtype=np.uint8), mode="RGB").save(path)


def load_image(path: str | Path, size: int | None = None) -> np.ndarray:
    """Load an image as RGB uint8 (H, W, 3).

    Greyscale, RGBA and palette images are converted to RGB (alpha composited on black). When
    ``size`` is given, an image of another size is an error (resize it yourself: the checker's
    verdict depends on pixels).
    """
    try:
        with Image.open(path) as im:
            if im.mode == "RGBA":
                im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im)
            arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: cannot read image ({e})") from None
    if size is not None and arr.shape[:2] != (size, size):
        raise ManifestError(f"{path}: image is {arr.shape[1]}x{arr.shape[0]}, expected {size}x{size}")
    return arr


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(rows: list[dict]) -> dict:
    """Aggregate rows with ``correct``, ``task`` and ``split`` into accuracies with 95% intervals.

    ``overall`` is the fraction of images correct; ``task_mean`` the mean of the task accuracies
    (GenEval's score).
    """

    def block(rs):
        k, n = sum(r["correct"] for r in rs), len(rs)
        lo, hi = wilson_interval(k, n)
        return {"accuracy": k / n if n else float("nan"), "n": n, "ci95": [lo, hi]}

    tasks = sorted({r["task"] for r in rows})
    splits = sorted({r["split"] for r in rows})
    out = {
        "overall": block(rows)["accuracy"] if rows else float("nan"),
        "n": len(rows),
        "tasks": {t: block([r for r in rows if r["task"] == t]) for t in tasks},
        "splits": {s: block([r for r in rows if r["split"] == s]) for s in splits},
    }
    task_accs = [v["accuracy"] for v in out["tasks"].values()]
    out["task_mean"] = sum(task_accs) / len(task_accs) if task_accs else float("nan")
    return out


def evaluate_folder(folder: str | Path, write: bool = True) -> dict:
    """Score every image in an image folder; writes ``folder/eval.json`` when ``write``."""
    folder = Path(folder)
    try:
        rows = read_manifest(folder, require_spec=True)
    except PromptFileError as e:
        raise PromptFileError(
            f"{e} (ShapesEval checks prompts of the shapes world's grammar; score free-text prompts "
            "with 't2ialign eval --images DIR --reward REWARD_DIR' or '--clip CLIP_DIR')"
        ) from None
    scored = []
    for r in rows:
        img = load_image(folder / r["file"])
        res = check(img, Spec.from_dict(r["spec"]))
        scored.append(
            {
                "file": r["file"],
                "task": r["task"],
                "split": r["split"],
                "correct": res.correct,
                "failed": [a for a, ok in res.ok.items() if not ok],
            }
        )
    summary = summarize(scored)
    summary["images"] = scored
    if write:
        with open(folder / "eval.json", "w") as f:
            json.dump(summary, f, indent=1)
    return summary
