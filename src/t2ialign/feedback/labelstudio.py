"""Import Label Studio JSON exports (image classification and pairwise tasks).

Label Studio's "JSON" export is a list of tasks::

    [{"id": 7, "data": {"image": "/data/upload/3/5b1e2f0a-img.png", "prompt": "two blue circles"},
      "annotations": [{"id": 31, "completed_by": 2, "created_at": "2024-05-01T10:00:00Z",
                       "was_cancelled": false,
                       "result": [{"type": "choices", "from_name": "verdict", "to_name": "image",
                                   "value": {"choices": ["Good"]}}]}]}]

- **Classification**: one image (``data`` key ``image``, ``img``, ``image_url`` or ``url``) and a
  ``choices`` result: good / yes / correct / accept / match / 1 -> good; bad / no / incorrect /
  reject / mismatch / 0 -> bad; skip / unsure / unknown -> skip (case-insensitive). A cancelled
  (skipped) annotation is a skip.
- **Pairwise**: two images (``image1``/``image2``, ``left``/``right``, ``image_left``/``image_right``,
  ``img1``/``img2`` or ``image_0``/``image_1``), first = left, and either a ``pairwise`` result
  (``{"selected": "left"}``) or a ``choices`` result naming left / right / tie (also "image 1",
  "first", "same", "equal", ...).

The prompt is ``data["prompt"]`` (or ``caption``, ``text``). Images are read from disk, never
downloaded: a path like ``/data/upload/3/5b1e2f0a-img.png`` or ``/data/local-files/?d=dir/img.png``
(or an ``http(s)://`` / ``s3://`` URL) is looked up by its file name in ``--images``; ``data:`` URIs
are decoded. An image that is already in the project with the same prompt (exported from here, say)
maps to its existing generation. Annotators become ``ls-user-<id>`` (by Label Studio user id; kind
``imported``: they cannot log in). Importing the same file twice adds nothing: each label's request id
is ``ls:<task id>:<annotation id>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import urllib.parse
from pathlib import Path

import numpy as np
from PIL import Image

from t2ialign.feedback.labelling import Conflict, LabelError
from t2ialign.feedback.store import encode_png

GOOD = {"good", "yes", "correct", "accept", "accepted", "pass", "match", "matches", "true", "1", "positive"}
BAD = {"bad", "no", "incorrect", "reject", "rejected", "fail", "mismatch", "false", "0", "negative"}
SKIP = {"skip", "skipped", "unsure", "unknown", "n/a", "na", "cannot tell", "not sure"}
LEFT = {"left", "image1", "image 1", "first", "a", "1", "left is better", "img1", "image_1"}
RIGHT = {"right", "image2", "image 2", "second", "b", "2", "right is better", "img2", "image_2"}
TIE = {"tie", "same", "equal", "both", "neither", "draw"}
IMAGE_KEYS = ("image", "img", "image_url", "url")
PAIR_KEYS = (
    ("image1", "image2"),
    ("left", "right"),
    ("image_left", "image_right"),
    ("img1", "img2"),
    ("image_0", "image_1"),
)
PROMPT_KEYS = ("prompt", "caption", "text")


class LabelStudioError(ValueError):
    """A Label Studio file that cannot be imported; the message names the task."""


def _norm(s) -> str:
    return re.sub(r"\s+", " ", str(s).strip().lower())


def _annotator_name(completed_by) -> tuple[str, dict]:
    if isinstance(completed_by, dict):  # some exports expand the user; the id is what stays the same
        uid, email = completed_by.get("id"), completed_by.get("email")
        raw = f"ls-user-{uid}" if uid is not None else f"ls-{email}"
        params = {"labelstudio_user": uid if uid is not None else email}
    else:
        raw, params = f"ls-user-{completed_by}", {"labelstudio_user": completed_by}
    name = re.sub(r"[^A-Za-z0-9_.@+-]", "_", raw)[:64]
    return name, params


class _Images:
    """Find and decode the image a task refers to."""

    def __init__(self, images_dir: Path | None, base: Path):
        self.dir, self.base = images_dir, base
        self.index: dict[str, Path] | None = None

    def _by_name(self, name: str) -> Path | None:
        if self.dir is None:
            return None
        if self.index is None:
            self.index = {}
            for p in sorted(self.dir.rglob("*")):
                if p.is_file():
                    self.index.setdefault(p.name, p)
        if name in self.index:
            return self.index[name]
        stripped = re.sub(r"^[0-9a-f]{8}-", "", name)  # Label Studio prefixes uploads with 8 hex digits
        return self.index.get(stripped)

    def load(self, ref: str, where: str) -> np.ndarray:
        if not isinstance(ref, str) or not ref:
            raise LabelStudioError(f"{where}: the image reference must be a non-empty string, got {ref!r}")
        if ref.startswith("data:"):
            try:
                data = base64.b64decode(ref.split(",", 1)[1], validate=False)
            except (IndexError, binascii.Error):
                raise LabelStudioError(f"{where}: a data: URI that is not base64 image data") from None
            return _decode(io.BytesIO(data), where)
        parsed = urllib.parse.urlparse(ref)
        q = urllib.parse.parse_qs(parsed.query).get("d")
        path = q[0] if q else urllib.parse.unquote(parsed.path)
        candidates = []
        if not parsed.scheme or parsed.scheme == "file":
            p = Path(path)
            candidates += [p] if p.is_absolute() else [self.base / p]
            if self.dir is not None and not p.is_absolute():
                candidates.append(self.dir / p)
        for c in candidates:
            if c.is_file():
                return _decode(c, where)
        found = self._by_name(Path(path).name)
        if found is not None:
            return _decode(found, where)
        hint = "" if self.dir else " (pass --images DIR, the folder with the task images)"
        raise LabelStudioError(f"{where}: image {ref!r} not found{hint}; images are never downloaded")


def _decode(src, where: str) -> np.ndarray:
    try:
        with Image.open(src) as im:
            if im.mode == "RGBA":
                im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im)
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise LabelStudioError(f"{where}: cannot read the image ({e})") from None


def _prompt(data: dict, where: str) -> str:
    for k in PROMPT_KEYS:
        if isinstance(data.get(k), str) and data[k].strip():
            return data[k].strip()
    raise LabelStudioError(f"{where}: no prompt; expected one of the data fields {', '.join(PROMPT_KEYS)}")


def _verdict(result: list, pair: bool, where: str) -> str | None:
    """The label (good/bad/skip) or choice (left/right/tie) of an annotation's results."""
    answers = []
    for r in result or []:
        if not isinstance(r, dict):
            continue
        value = r.get("value") or {}
        if r.get("type") == "pairwise" and "selected" in value:
            answers.append(("pair", _norm(value["selected"])))
        elif r.get("type") == "choices" and isinstance(value.get("choices"), list):
            if len(value["choices"]) != 1:
                raise LabelStudioError(f"{where}: expected one choice, got {value['choices']!r}")
            answers.append(("choice", _norm(value["choices"][0])))
    if not answers:
        return None
    if len(answers) > 1:
        raise LabelStudioError(f"{where}: more than one verdict in one annotation: {[a for _, a in answers]}")
    _, a = answers[0]
    if pair:
        for name, words in (("left", LEFT), ("right", RIGHT), ("tie", TIE)):
            if a in words:
                return name
        raise LabelStudioError(f"{where}: cannot read {a!r} as left, right or tie")
    for name, words in (("good", GOOD), ("bad", BAD), ("skip", SKIP)):
        if a in words:
            return name
    raise LabelStudioError(f"{where}: cannot read {a!r} as good, bad or skip")


def import_labelstudio(
    store, path: str | Path, images: str | Path | None = None, model_id: str = "labelstudio"
):
    """Import a Label Studio JSON export into ``store``; returns counts. Each task's labels are one
    transaction, so a bad task found midway leaves the earlier ones imported and the message names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    images_dir = Path(images) if images else None
    if images_dir is not None and not images_dir.is_dir():
        raise FileNotFoundError(f"--images {images_dir}: no such folder")
    try:
        tasks = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LabelStudioError(f"{path}: not a JSON file ({e})") from None
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and "data" in t for t in tasks):
        raise LabelStudioError(
            f"{path}: expected Label Studio's JSON export (a list of tasks with 'data' and 'annotations'); "
            "JSON-MIN and CSV exports are not supported"
        )
    finder = _Images(images_dir, path.parent)
    out = {"tasks": 0, "labels": 0, "comparisons": 0, "duplicates": 0, "images": 0, "annotators": set()}
    for t in tasks:
        where = f"{path.name}: task {t.get('id', '?')}"
        data = t.get("data") or {}
        prompt = _prompt(data, where)
        pair_keys = next((k for k in PAIR_KEYS if k[0] in data and k[1] in data), None)
        if pair_keys:
            refs = [data[pair_keys[0]], data[pair_keys[1]]]
        else:
            key = next((k for k in IMAGE_KEYS if k in data), None)
            if key is None:
                raise LabelStudioError(f"{where}: no image; expected a data field {', '.join(IMAGE_KEYS)}")
            refs = [data[key]]
        gids = []
        for ref in refs:
            gid, created = _generation(store, finder.load(ref, where), prompt, data, model_id)
            gids.append(gid)
            out["images"] += created
        answers = []
        for a in t.get("annotations") or []:
            aw = f"{where}, annotation {a.get('id', '?')}"
            value = "skip" if a.get("was_cancelled") and not pair_keys else None
            value = value or _verdict(a.get("result"), bool(pair_keys), aw)
            if value is None:
                continue
            name, params = _annotator_name(a.get("completed_by", a.get("annotator", "unknown")))
            answers.append((a, value, name, params))
        with store.transaction():
            for a, value, name, params in answers:
                aid = store.ensure_annotator(name, "imported", params)
                out["annotators"].add(name)
                rid = f"ls:{t.get('id')}:{a.get('id')}"
                created_at = _iso(a.get("created_at"))
                try:
                    if pair_keys:
                        r = store.add_comparison(
                            gids[0],
                            gids[1],
                            aid,
                            value,
                            request_id=rid,
                            source="labelstudio",
                            created_at=created_at,
                        )
                    else:
                        r = store.add_label(
                            gids[0], aid, value, request_id=rid, source="labelstudio", created_at=created_at
                        )
                except Conflict:
                    out["duplicates"] += 1  # this annotator already answered this image (pair)
                    continue
                except LabelError as e:
                    raise LabelStudioError(f"{where}: {e}") from None
                key = "comparisons" if pair_keys else "labels"
                out["duplicates" if r["duplicate"] else key] += 1
        out["tasks"] += 1
    out["annotators"] = sorted(out["annotators"])
    return out


def _iso(s) -> str | None:
    import datetime as dt

    if not isinstance(s, str):
        return None
    try:
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _generation(store, image: np.ndarray, prompt: str, data: dict, model_id: str) -> tuple[int, bool]:
    """The generation holding this image for this prompt: an existing one, or a new import."""
    sha = hashlib.sha256(encode_png(image)).hexdigest()
    row = (
        store._conn()
        .execute(
            "SELECT g.id FROM generations g JOIN prompts p ON p.id = g.prompt_id WHERE p.prompt = ? "
            "AND g.image_sha256 = ? ORDER BY g.id LIMIT 1",
            (prompt, sha),
        )
        .fetchone()
    )
    if row:
        return row[0], False
    seed = data.get("seed") if isinstance(data.get("seed"), int) else 0
    settings = {"source": "labelstudio", "image_sha256": sha}
    model = data.get("model") if isinstance(data.get("model"), str) and data.get("model") else model_id
    return store.add_generation(image, prompt, model_id=model, seed=seed, settings=settings)
