"""Annotators, labels, comparisons, assignment, undo and progress: the labelling half of the store.

Mixed into :class:`~t2ialign.feedback.store.FeedbackStore`; every method is one transaction.

**Assignment.** Each image goes to ``k`` different human annotators (``labels_per_image``, set per
project) and each pair of images of one prompt is compared by ``k`` of them. An annotator asks for
work with :meth:`next_images` (up to three images of one prompt, the paper's protocol) or
:meth:`next_pair`; the images are leased to them (``LEASE_S``, 30 minutes). An image's slots are its
active good/bad human labels plus other annotators' unexpired, unanswered leases; a *skip* frees
the slot, so a skipped image goes to someone else. An annotator is never given an image (pair) they
were given or labelled before, except their own unanswered ones, which come back first (after an
undo, say). With ``enforce_assignment`` (the app), a label is accepted only for an image leased to
that annotator and only while the image has fewer than k labels: the check and the insert are one
transaction, so concurrent annotators cannot over-fill an image. Simulated and imported labels do
not take slots.

**Undo** marks the annotator's latest active label (comparison) undone; nothing is deleted. The image
becomes an unanswered assignment again and comes back on the next request.

**Idempotency.** Every label carries a ``request_id`` (the app's client makes one per keypress); a
retried request with the same id returns the first answer instead of adding a label.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
import uuid

LEASE_S = 30 * 60
VALUES = ("good", "bad", "skip")
CHOICES = ("left", "right", "tie")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:@+-]{1,128}$")


class LabelError(ValueError):
    """A labelling request that cannot be honoured; ``status`` is the HTTP status the app returns."""

    status = 400


class NotFound(LabelError):
    status = 404


class Conflict(LabelError):
    status = 409


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"annotator name {name!r} must be 1 to 64 letters, digits or . _ @ + - "
            "(starting with a letter or digit)"
        )
    return name


def _request_id(request_id: str | None) -> str:
    if request_id is None:
        return uuid.uuid4().hex
    if not isinstance(request_id, str) or not _REQUEST_ID.match(request_id):
        raise LabelError("request_id must be 1 to 128 letters, digits or . _ : @ + -")
    return request_id


# An image's used slots: active good/bad human labels, plus unanswered unexpired leases of others.
_LOAD = """(
  (SELECT count(*) FROM labels l WHERE l.generation_id = g.id AND l.undone_at IS NULL
     AND l.simulated = 0 AND l.value != 'skip')
  + (SELECT count(*) FROM assignments s2 WHERE s2.generation_id = g.id AND s2.annotator_id != :a
     AND s2.lease_until > :now AND NOT EXISTS (SELECT 1 FROM labels l2 WHERE l2.generation_id = g.id
     AND l2.annotator_id = s2.annotator_id AND l2.undone_at IS NULL)))"""

_PAIR_LOAD = """(
  (SELECT count(*) FROM comparisons c WHERE min(c.left_id, c.right_id) = :lo
     AND max(c.left_id, c.right_id) = :hi AND c.undone_at IS NULL AND c.simulated = 0)
  + (SELECT count(*) FROM pair_assignments p2 WHERE p2.low_id = :lo AND p2.high_id = :hi
     AND p2.annotator_id != :a AND p2.lease_until > :now AND NOT EXISTS (SELECT 1 FROM comparisons c2
     WHERE c2.annotator_id = p2.annotator_id AND min(c2.left_id, c2.right_id) = :lo
     AND max(c2.left_id, c2.right_id) = :hi AND c2.undone_at IS NULL)))"""


class LabellingMixin:
    """See the module docstring. Needs ``_write``, ``_conn``, ``labels_per_image`` from the store."""

    # ----------------------------------------------------------------- annotators

    def add_annotator(self, name: str, kind: str = "human", params: dict | None = None) -> str | None:
        """Add an annotator; returns a human's login token (shown once: only its hash is kept)."""
        from t2ialign.feedback.store import now_iso, token_hash

        check_name(name)
        if kind not in ("human", "simulated", "imported"):
            raise ValueError(f"annotator kind must be human, simulated or imported, got {kind!r}")
        token = secrets.token_urlsafe(18) if kind == "human" else None
        with self._write() as c:
            if c.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone():
                raise FileExistsError(f"annotator {name!r} exists (give a new token with --rotate-token)")
            c.execute(
                "INSERT INTO annotators (name, kind, token_sha256, params, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (name, kind, token_hash(token) if token else None, json.dumps(params or {}), now_iso()),
            )
        return token

    def rotate_token(self, name: str) -> str:
        """A new login token for a human annotator (the old one stops working)."""
        from t2ialign.feedback.store import token_hash

        token = secrets.token_urlsafe(18)
        with self._write() as c:
            row = c.execute("SELECT kind FROM annotators WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise ValueError(f"no annotator named {name!r}")
            if row[0] != "human":
                raise ValueError(f"annotator {name!r} is {row[0]}, not human: it cannot log in")
            c.execute("UPDATE annotators SET token_sha256 = ? WHERE name = ?", (token_hash(token), name))
        return token

    def ensure_annotator(self, name: str, kind: str, params: dict | None = None) -> int:
        """The id of a simulated or imported annotator, adding it if new. An existing one must have
        the same kind and parameters (a rater with other settings needs another name)."""
        check_name(name)
        params = params or {}
        row = self.annotator(name)
        if row is None:
            try:
                self.add_annotator(name, kind, params)
            except FileExistsError:
                pass  # added meanwhile by another process
            row = self.annotator(name)
        if row["kind"] != kind or row["params"] != json.loads(json.dumps(params)):
            raise ValueError(
                f"annotator {name!r} exists as a {row['kind']} annotator with parameters {row['params']}; "
                f"choose another name (--name) for {kind} parameters {params}"
            )
        return row["id"]

    @staticmethod
    def _annotator_dict(row) -> dict:
        return {
            "id": row["id"],
            "name": row["name"],
            "kind": row["kind"],
            "params": json.loads(row["params"] or "{}"),
            "created_at": row["created_at"],
        }

    def annotator(self, name: str) -> dict | None:
        row = self._conn().execute("SELECT * FROM annotators WHERE name = ?", (name,)).fetchone()
        return self._annotator_dict(row) if row else None

    def annotator_by_token(self, token: str | None) -> dict | None:
        """The human annotator whose login token this is, or None."""
        from t2ialign.feedback.store import token_hash

        if not token or not isinstance(token, str) or len(token) > 200:
            return None
        row = (
            self._conn()
            .execute(
                "SELECT * FROM annotators WHERE token_sha256 = ? AND kind = 'human'", (token_hash(token),)
            )
            .fetchone()
        )
        return self._annotator_dict(row) if row else None

    def annotators(self) -> list[dict]:
        rows = self._conn().execute("SELECT * FROM annotators ORDER BY id").fetchall()
        return [self._annotator_dict(r) for r in rows]

    # ----------------------------------------------------------------- labels

    def _annotator_row(self, c, annotator_id: int):
        row = c.execute("SELECT id, kind FROM annotators WHERE id = ?", (int(annotator_id),)).fetchone()
        if row is None:
            raise NotFound(f"no annotator with id {annotator_id}")
        return row

    def add_label(
        self,
        generation_id: int,
        annotator_id: int,
        value: str,
        *,
        request_id: str | None = None,
        source: str = "api",
        enforce_assignment: bool = False,
        created_at: str | None = None,
    ) -> dict:
        """Record a label; returns ``{"id", "duplicate"}`` (duplicate: a retried request_id)."""
        from t2ialign.feedback.store import now_iso

        if value not in VALUES:
            raise LabelError(f"a label is one of {', '.join(VALUES)}, got {value!r}")
        rid = _request_id(request_id)
        gid = int(generation_id)
        with self._write() as c:
            ann = self._annotator_row(c, annotator_id)
            prev = c.execute(
                "SELECT id, generation_id, value FROM labels WHERE annotator_id = ? AND request_id = ?",
                (ann["id"], rid),
            ).fetchone()
            if prev is not None:
                if prev["generation_id"] != gid or prev["value"] != value:
                    raise Conflict(f"request_id {rid!r} was already used for another label")
                return {"id": prev["id"], "duplicate": True}
            if c.execute("SELECT 1 FROM generations WHERE id = ?", (gid,)).fetchone() is None:
                raise NotFound(f"no image with id {gid}")
            if c.execute(
                "SELECT 1 FROM labels WHERE generation_id = ? AND annotator_id = ? AND undone_at IS NULL",
                (gid, ann["id"]),
            ).fetchone():
                raise Conflict(f"image {gid} already has your label (undo it first to change it)")
            if enforce_assignment:
                if not c.execute(
                    "SELECT 1 FROM assignments WHERE annotator_id = ? AND generation_id = ?", (ann["id"], gid)
                ).fetchone():
                    raise Conflict(f"image {gid} was not given to you; ask for the next images")
                if value != "skip":
                    n = c.execute(
                        "SELECT count(*) FROM labels WHERE generation_id = ? AND undone_at IS NULL "
                        "AND simulated = 0 AND value != 'skip'",
                        (gid,),
                    ).fetchone()[0]
                    if n >= self._k(c):
                        raise Conflict(f"image {gid} already has all its labels; ask for the next images")
            cur = c.execute(
                "INSERT INTO labels (generation_id, annotator_id, value, simulated, source, request_id, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    gid,
                    ann["id"],
                    value,
                    int(ann["kind"] == "simulated"),
                    source,
                    rid,
                    created_at or now_iso(),
                ),
            )
            return {"id": cur.lastrowid, "duplicate": False}

    def undo_last_label(self, annotator_id: int) -> dict | None:
        """Mark the annotator's latest active label undone; returns it, or None if none is left."""
        from t2ialign.feedback.store import now_iso

        with self._write() as c:
            row = c.execute(
                "SELECT id, generation_id, value FROM labels WHERE annotator_id = ? AND undone_at IS NULL "
                "ORDER BY id DESC LIMIT 1",
                (int(annotator_id),),
            ).fetchone()
            if row is None:
                return None
            c.execute("UPDATE labels SET undone_at = ? WHERE id = ?", (now_iso(), row["id"]))
            return {"id": row["id"], "generation_id": row["generation_id"], "value": row["value"]}

    def add_comparison(
        self,
        left_id: int,
        right_id: int,
        annotator_id: int,
        choice: str,
        *,
        request_id: str | None = None,
        source: str = "api",
        enforce_assignment: bool = False,
        created_at: str | None = None,
    ) -> dict:
        """Record a pairwise verdict (left / right / tie); returns ``{"id", "duplicate"}``."""
        from t2ialign.feedback.store import now_iso

        if choice not in CHOICES:
            raise LabelError(f"a comparison is one of {', '.join(CHOICES)}, got {choice!r}")
        rid = _request_id(request_id)
        left, right = int(left_id), int(right_id)
        if left == right:
            raise LabelError("a comparison needs two different images")
        lo, hi = min(left, right), max(left, right)
        with self._write() as c:
            ann = self._annotator_row(c, annotator_id)
            prev = c.execute(
                "SELECT id, left_id, right_id, choice FROM comparisons "
                "WHERE annotator_id = ? AND request_id = ?",
                (ann["id"], rid),
            ).fetchone()
            if prev is not None:
                if (prev["left_id"], prev["right_id"], prev["choice"]) != (left, right, choice):
                    raise Conflict(f"request_id {rid!r} was already used for another comparison")
                return {"id": prev["id"], "duplicate": True}
            gens = c.execute("SELECT id, prompt_id FROM generations WHERE id IN (?, ?)", (lo, hi)).fetchall()
            if len(gens) != 2:
                missing = sorted({lo, hi} - {g["id"] for g in gens})
                raise NotFound(f"no image with id {missing[0]}")
            if gens[0]["prompt_id"] != gens[1]["prompt_id"]:
                raise LabelError("a comparison is between two images of the same prompt")
            if c.execute(
                "SELECT 1 FROM comparisons WHERE annotator_id = ? AND min(left_id, right_id) = ? "
                "AND max(left_id, right_id) = ? AND undone_at IS NULL",
                (ann["id"], lo, hi),
            ).fetchone():
                raise Conflict(f"you already compared images {lo} and {hi} (undo it first to change it)")
            if enforce_assignment:
                if not c.execute(
                    "SELECT 1 FROM pair_assignments WHERE annotator_id = ? AND low_id = ? AND high_id = ?",
                    (ann["id"], lo, hi),
                ).fetchone():
                    raise Conflict(f"images {lo} and {hi} were not given to you; ask for the next pair")
                n = c.execute(
                    "SELECT count(*) FROM comparisons WHERE min(left_id, right_id) = ? "
                    "AND max(left_id, right_id) = ? AND undone_at IS NULL AND simulated = 0",
                    (lo, hi),
                ).fetchone()[0]
                if n >= self._k(c):
                    raise Conflict(f"images {lo} and {hi} already have all their comparisons")
            cur = c.execute(
                "INSERT INTO comparisons (left_id, right_id, annotator_id, choice, simulated, source, "
                "request_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    left,
                    right,
                    ann["id"],
                    choice,
                    int(ann["kind"] == "simulated"),
                    source,
                    rid,
                    created_at or now_iso(),
                ),
            )
            return {"id": cur.lastrowid, "duplicate": False}

    def undo_last_comparison(self, annotator_id: int) -> dict | None:
        """Mark the annotator's latest active comparison undone; returns it, or None."""
        from t2ialign.feedback.store import now_iso

        with self._write() as c:
            row = c.execute(
                "SELECT id, left_id, right_id, choice FROM comparisons WHERE annotator_id = ? "
                "AND undone_at IS NULL ORDER BY id DESC LIMIT 1",
                (int(annotator_id),),
            ).fetchone()
            if row is None:
                return None
            c.execute("UPDATE comparisons SET undone_at = ? WHERE id = ?", (now_iso(), row["id"]))
            return dict(row)

    # ----------------------------------------------------------------- assignment

    def _k(self, c) -> int:
        row = c.execute("SELECT value FROM meta WHERE key = 'labels_per_image'").fetchone()
        return int(row[0]) if row else 3

    def next_images(self, annotator_id: int, n: int = 3, lease_s: float = LEASE_S) -> list[int]:
        """Up to ``n`` generation ids of one prompt for this annotator to label (leased to them);
        [] when nothing is left for them."""
        now = time.time()
        a = int(annotator_id)
        with self._write(durable=False) as c:
            k = self._k(c)
            args = {"a": a, "now": now, "k": k}
            open_rows = c.execute(
                "SELECT g.id, g.prompt_id FROM assignments s JOIN generations g ON g.id = s.generation_id "
                "WHERE s.annotator_id = :a AND NOT EXISTS (SELECT 1 FROM labels l "
                "WHERE l.generation_id = g.id "
                f"AND l.annotator_id = :a AND l.undone_at IS NULL) AND {_LOAD} < :k "
                "ORDER BY s.assigned_at, g.id",
                args,
            ).fetchall()
            if open_rows:
                prompt = open_rows[0]["prompt_id"]
                batch = [r["id"] for r in open_rows if r["prompt_id"] == prompt][:n]
            else:
                first = c.execute(self._candidates_sql(""), {**args, "n": 1}).fetchone()
                if first is None:
                    return []
                prompt, batch = first["prompt_id"], []
            if len(batch) < n:
                more = c.execute(
                    self._candidates_sql("AND g.prompt_id = :p"), {**args, "p": prompt, "n": n - len(batch)}
                ).fetchall()
                batch += [r["id"] for r in more]
            c.executemany(
                "INSERT INTO assignments (annotator_id, generation_id, assigned_at, lease_until) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (annotator_id, generation_id) DO UPDATE SET "
                "lease_until = excluded.lease_until",
                [(a, g, now, now + lease_s) for g in batch],
            )
            return batch

    @staticmethod
    def _candidates_sql(extra: str) -> str:
        return (
            "SELECT g.id, g.prompt_id FROM generations g WHERE NOT EXISTS (SELECT 1 FROM assignments s "
            "WHERE s.annotator_id = :a AND s.generation_id = g.id) AND NOT EXISTS (SELECT 1 FROM labels l "
            f"WHERE l.generation_id = g.id AND l.annotator_id = :a) {extra} AND {_LOAD} < :k "
            "ORDER BY g.prompt_id, g.id LIMIT :n"
        )

    def next_pair(self, annotator_id: int, lease_s: float = LEASE_S) -> tuple[int, int] | None:
        """(left id, right id): two images of one prompt for this annotator to compare, or None.
        Which image is shown on the left is a fixed coin flip per annotator and pair."""
        now = time.time()
        a = int(annotator_id)
        with self._write(durable=False) as c:
            k = self._k(c)
            open_rows = c.execute(
                "SELECT low_id, high_id, left_id FROM pair_assignments pa WHERE annotator_id = ? "
                "AND NOT EXISTS (SELECT 1 FROM comparisons c WHERE c.annotator_id = pa.annotator_id "
                "AND min(c.left_id, c.right_id) = pa.low_id AND max(c.left_id, c.right_id) = pa.high_id "
                "AND c.undone_at IS NULL) ORDER BY assigned_at, low_id, high_id",
                (a,),
            ).fetchall()
            for r in open_rows:
                args = {"a": a, "now": now, "lo": r["low_id"], "hi": r["high_id"]}
                if c.execute(f"SELECT {_PAIR_LOAD}", args).fetchone()[0] < k:
                    c.execute(
                        "UPDATE pair_assignments SET lease_until = ? WHERE annotator_id = ? AND low_id = ? "
                        "AND high_id = ?",
                        (now + lease_s, a, r["low_id"], r["high_id"]),
                    )
                    right = r["high_id"] if r["left_id"] == r["low_id"] else r["low_id"]
                    return r["left_id"], right
            cand = c.execute(
                "SELECT g1.id AS lo, g2.id AS hi FROM generations g1 JOIN generations g2 "
                "ON g2.prompt_id = g1.prompt_id AND g2.id > g1.id WHERE NOT EXISTS (SELECT 1 FROM "
                "pair_assignments pa WHERE pa.annotator_id = :a AND pa.low_id = g1.id "
                "AND pa.high_id = g2.id) "
                "AND NOT EXISTS (SELECT 1 FROM comparisons c WHERE c.annotator_id = :a "
                "AND min(c.left_id, c.right_id) = g1.id AND max(c.left_id, c.right_id) = g2.id) "
                "AND " + _PAIR_LOAD.replace(":lo", "g1.id").replace(":hi", "g2.id") + " < :k "
                "ORDER BY g1.prompt_id, g1.id, g2.id LIMIT 1",
                {"a": a, "now": now, "k": k},
            ).fetchone()
            if cand is None:
                return None
            lo, hi = cand["lo"], cand["hi"]
            flip = hashlib.sha256(f"{a}:{lo}:{hi}".encode()).digest()[0] & 1
            left, right = (hi, lo) if flip else (lo, hi)
            c.execute(
                "INSERT INTO pair_assignments (annotator_id, low_id, high_id, left_id, assigned_at, "
                "lease_until) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (a, lo, hi, left, now, now + lease_s),
            )
            return left, right

    def progress(self, annotator_id: int | None = None) -> dict:
        """Labels (comparisons) done by the annotator and what is left for them, and the project's
        filled slots out of (images x k) and (pairs x k)."""
        a = -1 if annotator_id is None else int(annotator_id)
        with self._read() as c:
            k = self._k(c)
            n_gen = c.execute("SELECT count(*) FROM generations").fetchone()[0]
            n_pairs = c.execute(
                "SELECT coalesce(sum(n * (n - 1) / 2), 0) FROM (SELECT count(*) AS n FROM generations "
                "GROUP BY prompt_id)"
            ).fetchone()[0]
            img = c.execute(
                "SELECT coalesce(sum(min(load, :k)), 0), coalesce(sum(mine), 0), "
                "coalesce(sum(load >= :k AND mine = 0), 0) FROM (SELECT generation_id, "
                "sum(simulated = 0 AND value != 'skip') AS load, max(annotator_id = :a) AS mine "
                "FROM labels INDEXED BY labels_active_cover WHERE undone_at IS NULL GROUP BY generation_id)",
                {"k": k, "a": a},
            ).fetchone()
            pair = c.execute(
                "SELECT coalesce(sum(min(load, :k)), 0), coalesce(sum(mine), 0), "
                "coalesce(sum(load >= :k AND mine = 0), 0) FROM (SELECT sum(simulated = 0) AS load, "
                "max(annotator_id = :a) AS mine FROM comparisons WHERE undone_at IS NULL "
                "GROUP BY min(left_id, right_id), max(left_id, right_id))",
                {"k": k, "a": a},
            ).fetchone()
        return {
            "labels_per_image": k,
            "images": {
                "mine": img[1],
                "mine_total": n_gen - img[2],
                "project": img[0],
                "project_total": n_gen * k,
            },
            "pairs": {
                "mine": pair[1],
                "mine_total": n_pairs - pair[2],
                "project": pair[0],
                "project_total": n_pairs * k,
            },
        }
