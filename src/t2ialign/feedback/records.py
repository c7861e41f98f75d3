"""Reading labels and pairs back: the records the reward model trains on, and the full rows.

Mixed into :class:`~t2ialign.feedback.store.FeedbackStore`. Only active (not undone) labels and
comparisons are read. ``simulated``: None both kinds, False humans only, True simulated raters only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np


class LabelRecord(NamedTuple):
    """One active good/bad label of one image by one annotator."""

    image: np.ndarray | None  # uint8 (H, W, 3); None when iterated with load_images=False
    prompt: str
    spec: dict | None
    task: str
    split: str
    label: int  # 1 good, 0 bad
    simulated: bool
    annotator: str
    generation_id: int
    created_at: str


class PairRecord(NamedTuple):
    """One active pairwise comparison. With ``tie``, ``img_w``/``img_l`` are just left/right."""

    img_w: np.ndarray | None
    img_l: np.ndarray | None
    tie: bool
    prompt: str
    spec: dict | None
    task: str
    split: str
    simulated: bool
    annotator: str
    generation_w: int
    generation_l: int
    created_at: str


class RecordsMixin:
    """See the module docstring. Needs ``_conn`` and ``load_image_file`` from the store."""

    def _images_cache(self, load: bool):
        cache: dict[str, np.ndarray] = {}

        def get(sha):
            if not load:
                return None
            if sha not in cache:
                if len(cache) > 4096:
                    cache.clear()
                cache[sha] = self.load_image_file(sha)
            return cache[sha]

        return get

    def labelled_images(
        self, simulated: bool | None = None, annotator: str | None = None, load_images: bool = True
    ) -> Iterator[LabelRecord]:
        """Every active good/bad label (see the module docstring), in label order."""
        rows = self.label_rows(simulated=simulated, annotator=annotator, include_skip=False)
        img = self._images_cache(load_images)
        for r in rows:
            yield LabelRecord(
                image=img(r["image_sha256"]),
                prompt=r["prompt"],
                spec=r["spec"],
                task=r["task"],
                split=r["split"],
                label=1 if r["value"] == "good" else 0,
                simulated=r["simulated"],
                annotator=r["annotator"],
                generation_id=r["generation_id"],
                created_at=r["created_at"],
            )

    def pairs(
        self, simulated: bool | None = None, annotator: str | None = None, load_images: bool = True
    ) -> Iterator[PairRecord]:
        """Every active pairwise comparison as (winner, loser) or a tie, in comparison order."""
        img = self._images_cache(load_images)
        for r in self.comparison_rows(simulated=simulated, annotator=annotator):
            w, l = ("left", "right") if r["choice"] != "right" else ("right", "left")
            yield PairRecord(
                img_w=img(r[f"{w}_sha256"]),
                img_l=img(r[f"{l}_sha256"]),
                tie=r["choice"] == "tie",
                prompt=r["prompt"],
                spec=r["spec"],
                task=r["task"],
                split=r["split"],
                simulated=r["simulated"],
                annotator=r["annotator"],
                generation_w=r[f"{w}_id"],
                generation_l=r[f"{l}_id"],
                created_at=r["created_at"],
            )

    @staticmethod
    def _filters(simulated, annotator, alias: str) -> tuple[str, list]:
        where, args = [f"{alias}.undone_at IS NULL"], []
        if simulated is not None:
            where.append(f"{alias}.simulated = ?")
            args.append(int(bool(simulated)))
        if annotator is not None:
            where.append("a.name = ?")
            args.append(annotator)
        return " AND ".join(where), args

    def label_rows(self, simulated=None, annotator=None, include_skip: bool = True) -> list[dict]:
        """Active labels joined with their generation, prompt and annotator, as dicts."""
        where, args = self._filters(simulated, annotator, "l")
        if not include_skip:
            where += " AND l.value != 'skip'"
        rows = (
            self._conn()
            .execute(
                "SELECT l.id, l.generation_id, l.value, l.simulated, l.source, l.created_at, "
                "a.name AS annotator, "
                "a.id AS annotator_id, g.image_sha256, g.model_id, g.seed, g.settings, p.prompt, p.spec, "
                "p.task, p.split FROM labels l JOIN annotators a ON a.id = l.annotator_id "
                "JOIN generations g ON g.id = l.generation_id JOIN prompts p ON p.id = g.prompt_id "
                f"WHERE {where} ORDER BY l.id",
                args,
            )
            .fetchall()
        )
        out = []
        for r in rows:
            d = dict(r)
            d["simulated"] = bool(d["simulated"])
            d["spec"] = json.loads(d["spec"]) if d["spec"] else None
            d["settings"] = json.loads(d["settings"])
            out.append(d)
        return out

    def comparison_rows(self, simulated=None, annotator=None) -> list[dict]:
        """Active comparisons joined with both generations, the prompt and the annotator."""
        where, args = self._filters(simulated, annotator, "c")
        rows = (
            self._conn()
            .execute(
                "SELECT c.id, c.left_id, c.right_id, c.choice, c.simulated, c.source, c.created_at, "
                "a.name AS annotator, a.id AS annotator_id, gl.image_sha256 AS left_sha256, "
                "gr.image_sha256 AS right_sha256, gl.model_id AS left_model, gr.model_id AS right_model, "
                "p.prompt, p.spec, p.task, p.split FROM comparisons c "
                "JOIN annotators a ON a.id = c.annotator_id JOIN generations gl ON gl.id = c.left_id "
                "JOIN generations gr ON gr.id = c.right_id JOIN prompts p ON p.id = gl.prompt_id "
                f"WHERE {where} ORDER BY c.id",
                args,
            )
            .fetchall()
        )
        out = []
        for r in rows:
            d = dict(r)
            d["simulated"] = bool(d["simulated"])
            d["spec"] = json.loads(d["spec"]) if d["spec"] else None
            out.append(d)
        return out
