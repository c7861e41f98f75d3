"""The feedback database's schema, its version and the migrations between versions.

The schema version lives in SQLite's ``PRAGMA user_version``. ``MIGRATIONS[v]`` turns a database of
version ``v - 1`` into version ``v`` (version 0 is an empty file), so a project created by any
release opens in every later one. Before migrating an existing database, :func:`migrate` copies it to
``backups/feedback-v{old}-{time}.sqlite`` beside it (SQLite's online backup, so a WAL database is
copied whole); each step runs in one transaction, so a failed step leaves the old version intact.
A database newer than this code is refused with a clear message, never touched.

Rules for later releases: never drop or rewrite a table that holds labels; add columns with defaults,
add tables, add indexes; append a new function to ``MIGRATIONS`` and bump ``SCHEMA_VERSION``.

Tables (version 1):

- ``meta(key, value)``: project settings (``labels_per_image``, ``admin_token_sha256``, ``created_at``).
- ``prompts``: the prompt text (unique), its spec as JSON (NULL outside the world's grammar), task
  and split.
- ``images``: content-addressed image files, ``images/<sha[:2]>/<sha256>.png`` in the project folder.
- ``generations``: one image of one prompt by one model: model id, seed, sampler settings (canonical
  JSON); unique on (model id, prompt, seed, settings), so generating twice never duplicates.
- ``annotators``: humans (who log in with a token; only its SHA-256 is stored), simulated raters
  (with their parameters) and annotators imported from other tools (who cannot log in).
- ``labels``: per-image verdicts good / bad / skip. Never deleted: undo sets ``undone_at``. At most
  one active (not undone) label per image and annotator; ``request_id`` makes a retried submission
  idempotent.
- ``comparisons``: pairwise verdicts left / right / tie, with the same rules.
- ``assignments`` and ``pair_assignments``: which images (pairs) were shown to whom, with a lease;
  they implement "k different annotators per image, never the same image twice".

Version 2 adds ``prompts.metadata``: the prompt's metadata from its prompt file (a JSON object:
``group``, ``negatives``, anything else; NULL for none), for free-text prompts.
"""

from __future__ import annotations

import datetime as _dt
import sqlite3
from collections.abc import Callable
from pathlib import Path

SCHEMA_VERSION = 2


class SchemaError(ValueError):
    """A database this code cannot open (newer than it, or not a feedback database)."""


_V1 = """
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE prompts (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL UNIQUE,
    spec TEXT,
    task TEXT NOT NULL,
    split TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE images (
    sha256 TEXT PRIMARY KEY,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE generations (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    image_sha256 TEXT NOT NULL REFERENCES images(sha256),
    model_id TEXT NOT NULL,
    seed INTEGER NOT NULL,
    settings TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (model_id, prompt_id, seed, settings)
);
CREATE INDEX generations_prompt ON generations(prompt_id, id);
CREATE INDEX generations_image ON generations(image_sha256);
CREATE TABLE annotators (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('human', 'simulated', 'imported')),
    token_sha256 TEXT UNIQUE,
    params TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE labels (
    id INTEGER PRIMARY KEY,
    generation_id INTEGER NOT NULL REFERENCES generations(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    value TEXT NOT NULL CHECK (value IN ('good', 'bad', 'skip')),
    simulated INTEGER NOT NULL CHECK (simulated IN (0, 1)),
    source TEXT NOT NULL,
    request_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    undone_at TEXT,
    UNIQUE (annotator_id, request_id)
);
CREATE UNIQUE INDEX labels_one_active ON labels(generation_id, annotator_id) WHERE undone_at IS NULL;
CREATE INDEX labels_active_cover
    ON labels(generation_id, annotator_id, simulated, value) WHERE undone_at IS NULL;
CREATE INDEX labels_annotator ON labels(annotator_id, id);
CREATE INDEX labels_generation ON labels(generation_id, annotator_id);
CREATE TABLE comparisons (
    id INTEGER PRIMARY KEY,
    left_id INTEGER NOT NULL REFERENCES generations(id),
    right_id INTEGER NOT NULL REFERENCES generations(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie')),
    simulated INTEGER NOT NULL CHECK (simulated IN (0, 1)),
    source TEXT NOT NULL,
    request_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    undone_at TEXT,
    CHECK (left_id != right_id),
    UNIQUE (annotator_id, request_id)
);
CREATE UNIQUE INDEX comparisons_one_active
    ON comparisons(annotator_id, min(left_id, right_id), max(left_id, right_id)) WHERE undone_at IS NULL;
CREATE INDEX comparisons_pair ON comparisons(min(left_id, right_id), max(left_id, right_id));
CREATE INDEX comparisons_annotator ON comparisons(annotator_id, id);
CREATE INDEX comparisons_annotator_pair
    ON comparisons(annotator_id, min(left_id, right_id), max(left_id, right_id));
CREATE TABLE assignments (
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    generation_id INTEGER NOT NULL REFERENCES generations(id),
    assigned_at REAL NOT NULL,
    lease_until REAL NOT NULL,
    PRIMARY KEY (annotator_id, generation_id)
);
CREATE INDEX assignments_generation ON assignments(generation_id);
CREATE TABLE pair_assignments (
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    low_id INTEGER NOT NULL REFERENCES generations(id),
    high_id INTEGER NOT NULL REFERENCES generations(id),
    left_id INTEGER NOT NULL,
    assigned_at REAL NOT NULL,
    lease_until REAL NOT NULL,
    PRIMARY KEY (annotator_id, low_id, high_id),
    CHECK (low_id < high_id)
);
CREATE INDEX pair_assignments_pair ON pair_assignments(low_id, high_id);
"""


def _v1(conn: sqlite3.Connection) -> None:
    for stmt in _V1.split(";"):
        if stmt.strip():
            conn.execute(stmt)


def _v2(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE prompts ADD COLUMN metadata TEXT")


# MIGRATIONS[v] upgrades version v - 1 to v.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _v1, 2: _v2}


def _backup(conn: sqlite3.Connection, db_path: Path, version: int) -> Path:
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    out = db_path.parent / "backups" / f"feedback-v{version}-{stamp}.sqlite"
    out.parent.mkdir(exist_ok=True)
    dst = sqlite3.connect(out)
    try:
        conn.backup(dst)
    finally:
        dst.close()
    return out


def migrate(conn: sqlite3.Connection, db_path: Path, target: int | None = None) -> list[int]:
    """Bring the database to ``target`` (default: :data:`SCHEMA_VERSION`); returns the versions
    applied. ``conn`` must be in autocommit mode (``isolation_level=None``)."""
    target = SCHEMA_VERSION if target is None else target
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current > target:
        raise SchemaError(
            f"{db_path}: the feedback database has schema version {current}, newer than this "
            f"t2ialign understands ({target}); upgrade t2ialign to open it"
        )
    if current == 0:
        tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        if tables:
            raise SchemaError(f"{db_path}: an SQLite database that is not a t2ialign feedback project")
    elif current < target:
        _backup(conn, db_path, current)
    applied = []
    for v in range(current + 1, target + 1):
        if v not in MIGRATIONS:
            raise SchemaError(f"no migration to schema version {v}")
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute("PRAGMA user_version").fetchone()[0] >= v:  # another process got there first
            conn.execute("COMMIT")
            continue
        try:
            MIGRATIONS[v](conn)
            conn.execute(f"PRAGMA user_version = {int(v)}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        applied.append(v)
    return applied
