"""Export a feedback project: Parquet files, a Hugging Face ``datasets`` dataset, and a dataset card.

Output folder ``OUT``::

    OUT/README.md               the dataset card (YAML header: one config per file, so that
                                ``datasets.load_dataset("OUT", "labels")`` works, locally or on the Hub)
    OUT/data/labels.parquet     one row per active good/bad label (skips are not exported)
    OUT/data/pairs.parquet      one row per active comparison
    OUT/data/pickapic.parquet   the comparisons in Pick-a-Pic's schema
    OUT/hf/labels, hf/pairs, hf/pickapic   ``Dataset.save_to_disk`` copies (``datasets.load_from_disk``)

Images are PNG bytes. In ``labels`` and ``pairs`` they are Hugging Face ``Image`` columns (a struct of
``bytes`` and ``path``; the Parquet files carry the ``datasets`` feature metadata, so they decode to
PIL images). ``pickapic`` follows Pick-a-Pic v1: ``caption``, ``jpg_0``, ``jpg_1`` (binary image bytes;
here lossless PNG, not JPEG, because the 32x32 world's colours decide what is correct), ``label_0``,
``label_1`` (1/0 for a win, 0.5/0.5 for a tie), ``model_0``, ``model_1``, ``user_id`` (annotator id),
``ranking_id`` (comparison id), ``created_at``, plus ``image_0_uid``, ``image_1_uid`` (SHA-256),
``best_image_uid`` (empty for a tie), ``has_label``, ``are_different`` and ``num_example_per_prompt``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _value(dtype: str) -> dict:
    return {"dtype": dtype, "_type": "Value"}


def _features(schema: pa.Schema) -> dict:
    """The ``datasets`` feature dict of a table whose image columns are ``_IMAGE`` structs."""
    names = {
        pa.string(): "string",
        pa.int64(): "int64",
        pa.int8(): "int8",
        pa.float64(): "float64",
        pa.bool_(): "bool",
        pa.binary(): "binary",
    }
    out = {}
    for f in schema:
        if f.type == _IMAGE:
            out[f.name] = {"_type": "Image"}
        elif f.type == pa.timestamp("ms", tz="UTC"):
            out[f.name] = _value("timestamp[ms, tz=UTC]")
        else:
            out[f.name] = _value(names[f.type])
    return out


def _write(table: pa.Table, path: Path) -> None:
    meta = {b"huggingface": json.dumps({"info": {"features": _features(table.schema)}}).encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def _time(s: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


def build_tables(store, simulated: bool | None = None) -> dict[str, pa.Table]:
    """The three export tables (labels, pairs, pickapic) as pyarrow tables."""
    png_cache: dict[str, bytes] = {}

    def png(sha: str) -> bytes:
        if sha not in png_cache:
            png_cache[sha] = store.image_path(sha).read_bytes()
        return png_cache[sha]

    metadata = store.prompt_metadata()

    def meta(prompt: str) -> str | None:
        m = metadata.get(prompt)
        return json.dumps(m, sort_keys=True) if m else None

    labels = store.label_rows(simulated=simulated, include_skip=False)
    label_cols = {
        "image": pa.array(
            [{"bytes": png(r["image_sha256"]), "path": f"{r['image_sha256']}.png"} for r in labels], _IMAGE
        ),
        "image_sha256": pa.array([r["image_sha256"] for r in labels], pa.string()),
        "generation_id": pa.array([r["generation_id"] for r in labels], pa.int64()),
        "prompt": pa.array([r["prompt"] for r in labels], pa.string()),
        "spec": pa.array([json.dumps(r["spec"]) if r["spec"] else None for r in labels], pa.string()),
        "task": pa.array([r["task"] for r in labels], pa.string()),
        "split": pa.array([r["split"] for r in labels], pa.string()),
        "metadata": pa.array([meta(r["prompt"]) for r in labels], pa.string()),
        "model_id": pa.array([r["model_id"] for r in labels], pa.string()),
        "seed": pa.array([r["seed"] for r in labels], pa.int64()),
        "settings": pa.array([json.dumps(r["settings"], sort_keys=True) for r in labels], pa.string()),
        "label": pa.array([1 if r["value"] == "good" else 0 for r in labels], pa.int8()),
        "annotator": pa.array([r["annotator"] for r in labels], pa.string()),
        "simulated": pa.array([r["simulated"] for r in labels], pa.bool_()),
        "label_id": pa.array([r["id"] for r in labels], pa.int64()),
        "created_at": pa.array([_time(r["created_at"]) for r in labels], pa.timestamp("ms", tz="UTC")),
    }

    comps = store.comparison_rows(simulated=simulated)
    gens = {}
    for r in comps:
        for side in ("left", "right"):
            gid = r[f"{side}_id"]
            if gid not in gens:
                gens[gid] = store.generation(gid)

    def img(gid):
        sha = gens[gid]["image_sha256"]
        return {"bytes": png(sha), "path": f"{sha}.png"}

    pair_cols = {
        "image_left": pa.array([img(r["left_id"]) for r in comps], _IMAGE),
        "image_right": pa.array([img(r["right_id"]) for r in comps], _IMAGE),
        "generation_left": pa.array([r["left_id"] for r in comps], pa.int64()),
        "generation_right": pa.array([r["right_id"] for r in comps], pa.int64()),
        "choice": pa.array([r["choice"] for r in comps], pa.string()),
        "prompt": pa.array([r["prompt"] for r in comps], pa.string()),
        "spec": pa.array([json.dumps(r["spec"]) if r["spec"] else None for r in comps], pa.string()),
        "task": pa.array([r["task"] for r in comps], pa.string()),
        "split": pa.array([r["split"] for r in comps], pa.string()),
        "metadata": pa.array([meta(r["prompt"]) for r in comps], pa.string()),
        "model_left": pa.array([r["left_model"] for r in comps], pa.string()),
        "model_right": pa.array([r["right_model"] for r in comps], pa.string()),
        "annotator": pa.array([r["annotator"] for r in comps], pa.string()),
        "simulated": pa.array([r["simulated"] for r in comps], pa.bool_()),
        "comparison_id": pa.array([r["id"] for r in comps], pa.int64()),
        "created_at": pa.array([_time(r["created_at"]) for r in comps], pa.timestamp("ms", tz="UTC")),
    }

    per_prompt = Counter(r["prompt"] for r in comps)
    win = {"left": (1.0, 0.0), "right": (0.0, 1.0), "tie": (0.5, 0.5)}
    best = {"left": "left_sha256", "right": "right_sha256"}
    pickapic_cols = {
        "are_different": pa.array([r["left_sha256"] != r["right_sha256"] for r in comps], pa.bool_()),
        "best_image_uid": pa.array([r[best[r["choice"]]] if r["choice"] in best else "" for r in comps]),
        "caption": pa.array([r["prompt"] for r in comps], pa.string()),
        "created_at": pa.array([_time(r["created_at"]) for r in comps], pa.timestamp("ms", tz="UTC")),
        "has_label": pa.array([True] * len(comps), pa.bool_()),
        "image_0_uid": pa.array([r["left_sha256"] for r in comps], pa.string()),
        "image_1_uid": pa.array([r["right_sha256"] for r in comps], pa.string()),
        "jpg_0": pa.array([png(r["left_sha256"]) for r in comps], pa.binary()),
        "jpg_1": pa.array([png(r["right_sha256"]) for r in comps], pa.binary()),
        "label_0": pa.array([win[r["choice"]][0] for r in comps], pa.float64()),
        "label_1": pa.array([win[r["choice"]][1] for r in comps], pa.float64()),
        "model_0": pa.array([r["left_model"] for r in comps], pa.string()),
        "model_1": pa.array([r["right_model"] for r in comps], pa.string()),
        "ranking_id": pa.array([r["id"] for r in comps], pa.int64()),
        "user_id": pa.array([r["annotator_id"] for r in comps], pa.int64()),
        "num_example_per_prompt": pa.array([per_prompt[r["prompt"]] for r in comps], pa.int64()),
    }
    return {
        "labels": pa.table(label_cols),
        "pairs": pa.table(pair_cols),
        "pickapic": pa.table(pickapic_cols),
    }


def export(store, out: str | Path, formats: str = "all", simulated: bool | None = None) -> dict:
    """Write the export (see the module docstring). ``formats``: all, parquet (the Parquet files and
    the card) or hf (the ``save_to_disk`` copies and the card). ``simulated``: None all labels,
    False humans only, True simulated raters only. Returns counts and the files written."""
    if formats not in ("all", "parquet", "hf"):
        raise ValueError(f"format must be all, parquet or hf, got {formats!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    tables = build_tables(store, simulated=simulated)
    files = {}
    if formats in ("all", "parquet"):
        (out / "data").mkdir(parents=True, exist_ok=True)
        for name, t in tables.items():
            path = out / "data" / f"{name}.parquet"
            _write(t, path)
            files[f"{name}.parquet"] = str(path)
    if formats in ("all", "hf"):
        import datasets

        for name, t in tables.items():
            feats = datasets.Features.from_dict(_features(t.schema))
            ds = datasets.Dataset.from_dict(t.to_pydict(), features=feats)
            path = out / "hf" / name
            ds.save_to_disk(str(path))
            files[f"hf/{name}"] = str(path)
    out.mkdir(parents=True, exist_ok=True)
    card = out / "README.md"
    card.write_text(dataset_card(store, tables, simulated, formats))
    files["card"] = str(card)
    return {"labels": tables["labels"].num_rows, "pairs": tables["pairs"].num_rows, "files": files}


def _f(x, spec=".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def dataset_card(store, tables: dict[str, pa.Table], simulated: bool | None, formats: str) -> str:
    """A Hugging Face dataset card (README.md) describing this export."""
    from t2ialign import __version__
    from t2ialign.feedback.stats import project_stats

    s = project_stats(store, with_checker=False)
    which = {None: "human and simulated", False: "human only", True: "simulated only"}[simulated]
    labels = tables["labels"].to_pydict()
    n_sim = sum(labels["simulated"])
    raters = [a for a in store.annotators() if a["kind"] == "simulated"]
    configs = ""
    if formats in ("all", "parquet"):
        configs = "configs:\n" + "".join(
            f"- config_name: {n}\n  data_files: data/{n}.parquet\n" for n in ("labels", "pairs", "pickapic")
        )
    tasks = Counter(zip(labels["task"], labels["label"], strict=True))
    task_rows = "\n".join(
        f"| {t} | {tasks[(t, 1)] + tasks[(t, 0)]} | {_f(tasks[(t, 1)] / (tasks[(t, 1)] + tasks[(t, 0)]))} |"
        for t in sorted({t for t, _ in tasks})
    )
    agree = []
    for group, ag in s["agreement"].items():
        for what, a in ag.items():
            if a["n_items"]:
                method = "Cohen's" if a["method"] == "cohen" else "Fleiss'"
                agree.append(f"| {group} | {what} | {method} | {_f(a['kappa'])} | {a['n_items']} |")
    rater_lines = "\n".join(f"- `{a['name']}`: {json.dumps(a['params'])}" for a in raters) or "- none"
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""---
license: other
pretty_name: {Path(store.path).resolve().name} feedback
task_categories:
- text-to-image
tags:
- human-feedback
- reward-modeling
- t2ialign
size_categories:
- n<1K
{configs}---

# Feedback on text-to-image generations: `{Path(store.path).resolve().name}`

Per-image labels (good / bad) and pairwise comparisons of generated images (prompts of the t2ialign
shapes world, or free text), collected as in Lee et al. 2023, *Aligning Text-to-Image Models using
Human Feedback* (stage 1). Exported by t2ialign {__version__} on {now}; labels: **{which}**.

| | |
|---|---|
| labelled images (rows of `labels`) | {tables["labels"].num_rows} ({n_sim} simulated) |
| comparisons (rows of `pairs`, `pickapic`) | {tables["pairs"].num_rows} |
| images in the project | {s["counts"]["generations"]} of {s["counts"]["prompts"]} prompts |
| annotators per image (k) | {s["labels_per_image"]} |

## Configs and fields

- `labels`: `image` (PNG), `image_sha256`, `generation_id`, `prompt`, `spec` (JSON: what the prompt
  asks for in the shapes world; empty for free text), `task`, `split` (seen / unseen; `other` for
  free text), `metadata` (JSON: the prompt's metadata from its prompt file, e.g. `group`,
  `negatives`; empty for none), `model_id`, `seed`, `settings` (JSON sampler settings),
  `label` (1 good, 0 bad), `annotator`, `simulated`, `label_id`, `created_at`. An image labelled by k
  annotators has k rows; skipped images are left out.
- `pairs`: `image_left`, `image_right`, `generation_left`, `generation_right`, `choice` (left / right /
  tie), `prompt`, `spec`, `task`, `split`, `metadata`, `model_left`, `model_right`, `annotator`, `simulated`,
  `comparison_id`, `created_at`.
- `pickapic`: the same comparisons in the Pick-a-Pic v1 schema (`caption`, `jpg_0`, `jpg_1`,
  `label_0`, `label_1`, `model_0`, `model_1`, `user_id`, `ranking_id`, `created_at`, ...). `jpg_*`
  hold PNG bytes (lossless: JPEG would change the colours that decide correctness in the shapes world).

```python
import datasets
labels = datasets.load_dataset("path/to/this/folder", "labels", split="train")
labels = datasets.load_from_disk("path/to/this/folder/hf/labels")  # the same, from the Arrow copy
```

## Labels per task

| task | labels | good rate |
|---|---|---|
{task_rows}

## Agreement

| who | what | kappa | value | items |
|---|---|---|---|---|
{chr(10).join(agree) or "| - | - | - | - | - |"}

## Simulated raters

Simulated labels come from the ShapesEval checker with a flip probability (`noise`) and
per-attribute leniency (`bias`); they are marked `simulated = true`.

{rater_lines}
"""
