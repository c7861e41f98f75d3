"""The feedback store: one labelling project in one folder.

Layout of a project folder ``P``::

    P/feedback.sqlite          the database (WAL mode, synchronous=FULL; tables in schema.py)
    P/images/ab/ab12....png    images, named by the SHA-256 of their PNG bytes (content-addressed)
    P/admin.token              the admin's login token, readable by the folder's owner only
    P/backups/                 copies of the database taken before each schema migration

Public API (the CLI, the app and the reward model use these; everything else is internal)::

    from t2ialign.feedback import FeedbackStore
    store = FeedbackStore.create("proj", labels_per_image=3)   # or FeedbackStore.open("proj")
    gid, created = store.add_generation(image, "two blue circles", model_id="m", seed=0,
                                        settings={"steps": 20, "guidance": 3.0})
    store.image(gid)                         # the generation's image, uint8 (H, W, 3)
    store.generation(gid)                    # a dict: prompt, spec, task, split, model_id, seed, ...
    for r in store.labelled_images(simulated=False):     # LabelRecord, one per active label
        r.image, r.prompt, r.spec, r.task, r.split, r.label, r.simulated, r.annotator
    for p in store.pairs():                               # PairRecord, one per active comparison
        p.img_w, p.img_l, p.tie, p.prompt, p.spec, p.task, p.split, p.simulated, p.annotator

``labelled_images`` yields good (``label`` 1) and bad (0) verdicts; skips are not yielded. An image
labelled by k annotators yields k records (aggregate them as you like). ``simulated=None`` mixes
human and simulated labels, ``False`` keeps humans only, ``True`` simulated raters only. ``spec`` is
``None`` for prompts outside the world's grammar (free text: task and split are then ``other``);
``store.prompt_metadata()`` and ``generation(gid)["metadata"]`` give each prompt's metadata
(``group``, ``negatives``, ... from its prompt file).

Guarantees: every write is one transaction, committed (and fsynced) before the call returns, so a
label that a call acknowledged survives a crash; nothing is ever deleted or overwritten (undo marks a
label undone; a prompt's metadata is replaced only when asked, ``replace_metadata``); many threads
and processes may use one project at once.

Labelling (annotators, labels, comparisons, assignment, undo, progress) is in ``labelling.py`` and
reading labels and pairs in ``records.py``, both mixed into :class:`FeedbackStore`. Also public, for
the other stages: ``generations()``, ``find_generation()``, ``add_generations()``, ``counts()``,
``load_image_file(sha256)``, ``label_rows()`` and ``comparison_rows()`` (dicts with every column).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import hmac
import io
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from t2ialign.feedback import schema
from t2ialign.feedback.labelling import LabellingMixin
from t2ialign.feedback.records import LabelRecord, PairRecord, RecordsMixin

DB_NAME = "feedback.sqlite"
ADMIN_TOKEN_FILE = "admin.token"
DEFAULT_LABELS_PER_IMAGE = 3


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def canonical_settings(settings: dict | None) -> str:
    """Settings as canonical JSON (sorted keys), the form that makes generations unique."""
    return json.dumps(settings or {}, sort_keys=True, separators=(",", ":"))


def encode_png(image) -> bytes:
    """Canonical PNG bytes of an RGB uint8 (H, W, 3) image."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"an image must be RGB of shape (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"an image must be uint8, got {arr.dtype}")
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FeedbackStore(LabellingMixin, RecordsMixin):
    """A feedback project (see the module docstring). Open with :meth:`open` or :meth:`create`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.db_path = self.path / DB_NAME
        self.images_dir = self.path / "images"
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()

    # ----------------------------------------------------------------- opening and creating

    @classmethod
    def open(cls, path: str | Path, create: bool = False) -> FeedbackStore:
        """Open the project in folder ``path`` (creating it when ``create`` and it does not exist),
        migrating its database to the current schema when it is older."""
        path = Path(path)
        if not (path / DB_NAME).exists():
            if create:
                return cls.create(path)
            raise FileNotFoundError(
                f"no feedback project at {path} (no {DB_NAME}); create one with "
                f"'t2ialign generate --project {path} ...' or 'FeedbackStore.create'"
            )
        store = cls(path)
        schema.migrate(store._conn(), store.db_path)
        return store

    @classmethod
    def create(cls, path: str | Path, labels_per_image: int = DEFAULT_LABELS_PER_IMAGE) -> FeedbackStore:
        """Create a new project in folder ``path`` (which may exist but must hold no project)."""
        path = Path(path)
        if (path / DB_NAME).exists():
            raise FileExistsError(f"{path} already holds a feedback project")
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a folder")
        _check_k(labels_per_image)
        path.mkdir(parents=True, exist_ok=True)
        (path / "images").mkdir(exist_ok=True)
        store = cls(path)
        conn = store._conn()
        conn.execute("PRAGMA journal_mode = WAL")
        schema.migrate(conn, store.db_path)
        admin = secrets.token_urlsafe(24)
        with store._write() as c:
            c.executemany(
                "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                [
                    ("created_at", now_iso()),
                    ("labels_per_image", str(labels_per_image)),
                    ("admin_token_sha256", token_hash(admin)),
                ],
            )
        token_file = path / ADMIN_TOKEN_FILE
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(admin + "\n")
        return store

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, isolation_level=None, timeout=60, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    @contextlib.contextmanager
    def _write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), serialised within this process.
        Nested calls in one thread join the outer transaction. ``durable=False`` (for leases, which
        are not user data) skips the fsync at commit; the next durable commit covers it (WAL)."""
        conn = self._conn()
        if getattr(self._local, "depth", 0):
            yield conn
            return
        with self._write_lock:
            self._local.depth = 1
            if not durable:
                conn.execute("PRAGMA synchronous = NORMAL")
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                self._local.depth = 0
                if not durable:
                    conn.execute("PRAGMA synchronous = FULL")

    def transaction(self):
        """Group many writes into one transaction (all or nothing, one fsync)::

        with store.transaction():
            for ...: store.add_label(...)
        """
        return self._write()

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several reads."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._conns_lock:
            for c in self._conns:
                with contextlib.suppress(sqlite3.Error):
                    c.close()
            self._conns.clear()
        self._local = threading.local()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- settings

    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    @property
    def labels_per_image(self) -> int:
        """k: how many different annotators label each image (and compare each pair)."""
        return int(self.meta("labels_per_image", str(DEFAULT_LABELS_PER_IMAGE)))

    def set_labels_per_image(self, k: int) -> None:
        _check_k(k)
        with self._write() as c:
            c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('labels_per_image', ?)", (str(k),))

    def check_admin(self, token: str | None) -> bool:
        """Whether ``token`` is the admin token."""
        want = self.meta("admin_token_sha256")
        return bool(token and want and hmac.compare_digest(token_hash(token), want))

    # ----------------------------------------------------------------- prompts and images

    def _prompt_id(
        self,
        c: sqlite3.Connection,
        prompt: str,
        spec=None,
        task=None,
        split=None,
        metadata: dict | None = None,
        replace_metadata: bool = False,
    ) -> int:
        meta = _metadata_json(prompt, metadata)
        row = c.execute("SELECT id, metadata FROM prompts WHERE prompt = ?", (prompt,)).fetchone()
        if row:
            if meta is not None and meta != row[1]:
                if row[1] is not None and not replace_metadata:
                    raise ValueError(
                        f"the prompt {prompt!r} has other metadata in {self.path} ({row[1]}) than "
                        f"given now ({meta}); replace it explicitly (generate --update-metadata) or "
                        "give the same metadata"
                    )
                c.execute("UPDATE prompts SET metadata = ? WHERE id = ?", (meta, row[0]))
            return row[0]
        spec_d, task, split = describe_prompt(prompt, spec, task, split)
        cur = c.execute(
            "INSERT INTO prompts (prompt, spec, task, split, created_at, metadata) VALUES (?, ?, ?, ?, ?, ?)",
            (prompt, json.dumps(spec_d) if spec_d is not None else None, task, split, now_iso(), meta),
        )
        return cur.lastrowid

    def add_prompt(
        self,
        prompt: str,
        spec: dict | None = None,
        task=None,
        split=None,
        metadata: dict | None = None,
        replace_metadata: bool = False,
    ) -> int:
        """The id of ``prompt``, adding it if new (spec, task and split derived when not given).
        ``metadata`` (a JSON object: ``group``, ``negatives``, ...) is stored with a new prompt, or
        with a known one that has none; other metadata than the stored is an error unless
        ``replace_metadata``."""
        with self._write() as c:
            return self._prompt_id(c, prompt, spec, task, split, metadata, replace_metadata)

    def prompt_metadata(self) -> dict[str, dict]:
        """Every prompt's metadata (an empty dict for none), by prompt text."""
        rows = self._conn().execute("SELECT prompt, metadata FROM prompts").fetchall()
        return {r[0]: json.loads(r[1]) if r[1] else {} for r in rows}

    def image_path(self, sha256: str) -> Path:
        return self.images_dir / sha256[:2] / f"{sha256}.png"

    def _put_files(self, pngs: dict[str, bytes]) -> None:
        """Write new image files (atomically, fsynced, several at once)."""
        todo = {sha: data for sha, data in pngs.items() if not self.image_path(sha).exists()}
        if not todo:
            return
        dirs = {self.image_path(sha).parent for sha in todo}
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)

        def write(item):
            sha, data = item
            final = self.image_path(sha)
            tmp = final.with_name(f".{sha}.{os.getpid()}.{threading.get_ident()}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)

        with ThreadPoolExecutor(8) as ex:
            list(ex.map(write, todo.items()))
        for d in dirs:
            _fsync_dir(d)

    def add_generations(self, rows: list[dict], replace_metadata: bool = False) -> list[tuple[int, bool]]:
        """Add many generations in one transaction; each row has ``image``, ``prompt``, ``model_id``,
        ``seed`` and optionally ``settings``, ``spec``, ``task``, ``split`` and ``metadata`` (the
        prompt's, see :meth:`add_prompt`). Returns (id, created) per row; a row whose (model id,
        prompt, seed, settings) exists returns the existing id."""
        pngs, prepared = {}, []
        for r in rows:
            for key in ("image", "prompt", "model_id", "seed"):
                if key not in r:
                    raise ValueError(f"a generation needs {key!r}")
            png = encode_png(r["image"])
            sha = hashlib.sha256(png).hexdigest()
            pngs[sha] = png
            h, w = np.asarray(r["image"]).shape[:2]
            prepared.append((r, sha, w, h, canonical_settings(r.get("settings"))))
        self._put_files(pngs)  # files first: a committed row never points to a missing file
        out = []
        with self._write() as c:
            for r, sha, w, h, settings in prepared:
                pid = self._prompt_id(
                    c,
                    r["prompt"],
                    r.get("spec"),
                    r.get("task"),
                    r.get("split"),
                    r.get("metadata"),
                    replace_metadata,
                )
                c.execute(
                    "INSERT OR IGNORE INTO images (sha256, width, height, created_at) VALUES (?, ?, ?, ?)",
                    (sha, w, h, now_iso()),
                )
                row = c.execute(
                    "SELECT id FROM generations WHERE model_id = ? AND prompt_id = ? AND seed = ? "
                    "AND settings = ?",
                    (r["model_id"], pid, int(r["seed"]), settings),
                ).fetchone()
                if row:
                    out.append((row[0], False))
                    continue
                cur = c.execute(
                    "INSERT INTO generations (prompt_id, image_sha256, model_id, seed, settings, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (pid, sha, r["model_id"], int(r["seed"]), settings, now_iso()),
                )
                out.append((cur.lastrowid, True))
        return out

    def add_generation(self, image, prompt: str, *, model_id: str, seed: int, settings=None, **kw):
        """Add one generation; returns (generation id, created)."""
        row = dict(image=image, prompt=prompt, model_id=model_id, seed=seed, settings=settings, **kw)
        return self.add_generations([row])[0]

    def find_generation(self, model_id: str, prompt: str, seed: int, settings: dict | None = None):
        """The id of the generation with these keys, or None."""
        row = (
            self._conn()
            .execute(
                "SELECT g.id FROM generations g JOIN prompts p ON p.id = g.prompt_id WHERE g.model_id = ? "
                "AND p.prompt = ? AND g.seed = ? AND g.settings = ?",
                (model_id, prompt, int(seed), canonical_settings(settings)),
            )
            .fetchone()
        )
        return row[0] if row else None

    _GEN_SQL = (
        "SELECT g.id, g.image_sha256, g.model_id, g.seed, g.settings, g.created_at, g.prompt_id, "
        "p.prompt, p.spec, p.task, p.split, p.metadata "
        "FROM generations g JOIN prompts p ON p.id = g.prompt_id"
    )

    @staticmethod
    def _gen_dict(row) -> dict:
        return {
            "id": row["id"],
            "image_sha256": row["image_sha256"],
            "model_id": row["model_id"],
            "seed": row["seed"],
            "settings": json.loads(row["settings"]),
            "created_at": row["created_at"],
            "prompt_id": row["prompt_id"],
            "prompt": row["prompt"],
            "spec": json.loads(row["spec"]) if row["spec"] else None,
            "task": row["task"],
            "split": row["split"],
            "metadata": json.loads(row["metadata"]) if row["metadata"] else {},
        }

    def generation(self, generation_id: int) -> dict:
        """A generation as a dict; KeyError names an unknown id."""
        row = self._conn().execute(self._GEN_SQL + " WHERE g.id = ?", (int(generation_id),)).fetchone()
        if row is None:
            raise KeyError(f"no generation with id {generation_id}")
        return self._gen_dict(row)

    def generations(self) -> Iterator[dict]:
        """Every generation, in id order."""
        for row in self._conn().execute(self._GEN_SQL + " ORDER BY g.id").fetchall():
            yield self._gen_dict(row)

    def load_image_file(self, sha256: str) -> np.ndarray:
        with Image.open(self.image_path(sha256)) as im:
            return np.asarray(im.convert("RGB"))

    def image(self, generation_id: int) -> np.ndarray:
        """The image of a generation, uint8 (H, W, 3)."""
        return self.load_image_file(self.generation(generation_id)["image_sha256"])

    def counts(self) -> dict:
        c = self._conn()
        q = {
            "prompts": "SELECT count(*) FROM prompts",
            "generations": "SELECT count(*) FROM generations",
            "images": "SELECT count(*) FROM images",
            "annotators": "SELECT count(*) FROM annotators",
            "labels": "SELECT count(*) FROM labels WHERE undone_at IS NULL",
            "comparisons": "SELECT count(*) FROM comparisons WHERE undone_at IS NULL",
        }
        return {k: c.execute(v).fetchone()[0] for k, v in q.items()}


def _check_k(k) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 100:
        raise ValueError(f"labels per image must be an integer from 1 to 100, got {k!r}")


def _metadata_json(prompt: str, metadata) -> str | None:
    """Canonical JSON of a prompt's metadata (None for none); malformed metadata is an error."""
    if metadata is None or metadata == {}:
        return None
    if not isinstance(metadata, dict):
        raise ValueError(f"the metadata of {prompt!r} must be a JSON object, got {type(metadata).__name__}")
    from t2ialign.prompts import RESERVED, check_metadata

    clash = [k for k in metadata if k in RESERVED]
    if clash:
        raise ValueError(f"the metadata of {prompt!r} may not hold {', '.join(clash)} (they are columns)")
    check_metadata(metadata, prompt)
    try:
        return json.dumps(metadata, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the metadata of {prompt!r} is not JSON ({e})") from None


def describe_prompt(prompt: str, spec=None, task=None, split=None) -> tuple[dict | None, str, str]:
    """(spec dict, task, split) of a prompt: from the world's grammar when it reads the prompt,
    else (None, 'other', 'other') unless given."""
    from t2ialign.world.grammar import PromptError, parse
    from t2ialign.world.spec import Spec, SpecError
    from t2ialign.world.suites import split_of

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("a prompt must be a non-empty string")
    try:
        s = Spec.from_dict(spec) if spec is not None else parse(prompt)
    except (PromptError, SpecError):
        if spec is not None:
            raise
        return None, task or "other", split or "other"
    return s.to_dict(), task or s.task, split or split_of(s)


__all__ = ["FeedbackStore", "LabelRecord", "PairRecord", "describe_prompt"]
