"""The feedback store: project folders, content-addressed images, generations, labels, undo,
idempotency, assignment, iteration for the reward model, schema versions and migrations."""

from __future__ import annotations

import sqlite3
import threading

import numpy as np
import pytest

from feedback_helpers import make_project, world_rows
from t2ialign.feedback import Conflict, FeedbackStore, LabelError, NotFound
from t2ialign.feedback import schema as schema_mod
from t2ialign.world import parse, render


@pytest.fixture
def store(tmp_path):
    s = make_project(tmp_path / "proj", n_prompts=6, per_prompt=4, k=2)
    yield s
    s.close()


def test_create_and_open(tmp_path):
    s = FeedbackStore.create(tmp_path / "p", labels_per_image=3)
    assert (tmp_path / "p" / "feedback.sqlite").exists()
    assert (tmp_path / "p" / "admin.token").stat().st_mode & 0o777 == 0o600
    assert s.check_admin((tmp_path / "p" / "admin.token").read_text().strip())
    assert not s.check_admin("wrong") and not s.check_admin(None)
    conn = sqlite3.connect(tmp_path / "p" / "feedback.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema_mod.SCHEMA_VERSION
    s.close()
    assert FeedbackStore.open(tmp_path / "p").labels_per_image == 3
    with pytest.raises(FileExistsError):
        FeedbackStore.create(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="no feedback project"):
        FeedbackStore.open(tmp_path / "nothing")
    with pytest.raises(ValueError, match="labels per image"):
        FeedbackStore.create(tmp_path / "q", labels_per_image=0)


def test_generations_are_content_addressed_and_never_duplicated(store):
    n = store.counts()["generations"]
    assert n == 24
    img = render(parse("two blue circles"), seed=3)
    gid, created = store.add_generation(img, "two blue circles", model_id="m", seed=3, settings={"steps": 20})
    assert created
    again = store.add_generation(img, "two blue circles", model_id="m", seed=3, settings={"steps": 20})
    assert again == (gid, False)
    # other settings: another generation, but the same image file
    gid2, created2 = store.add_generation(
        img, "two blue circles", model_id="m", seed=3, settings={"steps": 10}
    )
    assert created2 and gid2 != gid
    g = store.generation(gid)
    assert g["image_sha256"] == store.generation(gid2)["image_sha256"]
    assert store.image_path(g["image_sha256"]).name == g["image_sha256"] + ".png"
    assert np.array_equal(store.image(gid), img)
    assert (
        g["task"] == "combination"
        and g["split"] == "seen"
        and g["spec"] == parse("two blue circles").to_dict()
    )
    assert store.find_generation("m", "two blue circles", 3, {"steps": 20}) == gid
    assert store.find_generation("m", "two blue circles", 4, {"steps": 20}) is None
    with pytest.raises(KeyError, match="no generation"):
        store.generation(10**6)
    with pytest.raises(ValueError, match="RGB"):
        store.add_generation(np.zeros((8, 8), np.uint8), "a circle", model_id="m", seed=0)


def test_labels_undo_and_idempotency(store):
    tok = store.add_annotator("alice")
    alice = store.annotator_by_token(tok)
    assert alice["name"] == "alice" and store.annotator_by_token("nope") is None
    with pytest.raises(FileExistsError):
        store.add_annotator("alice")
    with pytest.raises(ValueError, match="annotator name"):
        store.add_annotator("../evil")
    r1 = store.add_label(1, alice["id"], "good", request_id="r1")
    assert r1 == {"id": r1["id"], "duplicate": False}
    assert store.add_label(1, alice["id"], "good", request_id="r1") == {"id": r1["id"], "duplicate": True}
    with pytest.raises(Conflict, match="already used"):
        store.add_label(2, alice["id"], "good", request_id="r1")
    with pytest.raises(Conflict, match="already has your label"):
        store.add_label(1, alice["id"], "bad")
    with pytest.raises(NotFound):
        store.add_label(999, alice["id"], "bad")
    with pytest.raises(LabelError, match="one of good, bad, skip"):
        store.add_label(2, alice["id"], "great")
    store.add_label(2, alice["id"], "bad")
    undone = store.undo_last_label(alice["id"])
    assert undone["generation_id"] == 2 and undone["value"] == "bad"
    store.add_label(2, alice["id"], "good")  # relabel after undo
    assert store.undo_last_label(alice["id"])["generation_id"] == 2
    assert store.undo_last_label(alice["id"])["generation_id"] == 1
    assert store.undo_last_label(alice["id"]) is None
    # nothing was deleted: every label is still there, marked undone
    rows = store._conn().execute("SELECT generation_id, value, undone_at FROM labels ORDER BY id").fetchall()
    assert [(r[0], r[1], r[2] is not None) for r in rows] == [
        (1, "good", True),
        (2, "bad", True),
        (2, "good", True),
    ]
    assert store.counts()["labels"] == 0


def test_assignment_gives_each_image_to_k_annotators_never_twice(store):
    ids = [store.annotator_by_token(store.add_annotator(n))["id"] for n in ("a", "b", "c")]
    seen = {a: [] for a in ids}
    while True:
        progressed = False
        for a in ids:
            batch = store.next_images(a, 3)
            if batch:
                progressed = True
                assert len({store.generation(g)["prompt"] for g in batch}) == 1  # one prompt per screen
            for g in batch:
                store.add_label(g, a, "good" if g % 2 else "bad", enforce_assignment=True)
                seen[a].append(g)
        if not progressed:
            break
    for a in ids:
        assert len(seen[a]) == len(set(seen[a]))  # never the same image twice
    per_image = {}
    for a in ids:
        for g in seen[a]:
            per_image[g] = per_image.get(g, 0) + 1
    assert set(per_image.values()) == {2} and len(per_image) == 24  # exactly k = 2 each
    p = store.progress(ids[0])
    assert p["images"]["project"] == p["images"]["project_total"] == 48
    # a label for an image not given to you is refused
    d = store.annotator_by_token(store.add_annotator("d"))["id"]
    with pytest.raises(Conflict, match="not given to you"):
        store.add_label(1, d, "good", enforce_assignment=True)
    assert store.next_images(d) == []


def test_skip_frees_the_slot_and_undo_brings_the_image_back(tmp_path):
    s = make_project(tmp_path / "p", n_prompts=1, per_prompt=1, k=1)
    a, b = (s.annotator_by_token(s.add_annotator(n))["id"] for n in ("a", "b"))
    assert s.next_images(a) == [1]
    assert s.next_images(b) == []  # leased to a
    s.add_label(1, a, "skip", enforce_assignment=True)
    assert s.next_images(b) == [1]  # a skip does not take the slot
    s.add_label(1, b, "good", enforce_assignment=True)
    assert s.next_images(a) == []
    s.undo_last_label(b)
    assert s.next_images(b) == [1]  # the undone image comes back to b
    s.close()


def test_pairs_assignment_and_comparisons(store):
    a = store.annotator_by_token(store.add_annotator("a"))["id"]
    left, right = store.next_pair(a)
    assert store.next_pair(a) == (left, right)  # unanswered: the same pair again
    assert store.generation(left)["prompt_id"] == store.generation(right)["prompt_id"]
    r = store.add_comparison(left, right, a, "left", request_id="c1", enforce_assignment=True)
    assert store.add_comparison(left, right, a, "left", request_id="c1")["duplicate"]
    with pytest.raises(Conflict):
        store.add_comparison(right, left, a, "tie")  # the same pair, either order
    with pytest.raises(LabelError, match="same prompt"):
        store.add_comparison(1, 5, a, "tie")
    with pytest.raises(LabelError, match="two different"):
        store.add_comparison(1, 1, a, "tie")
    nxt = store.next_pair(a)
    assert nxt is not None and set(nxt) != {left, right}
    assert store.undo_last_comparison(a)["id"] == r["id"]
    assert set(store.next_pair(a)) == {left, right}  # the undone pair comes back first
    n_pairs = 6 * 6  # six prompts, four images each: six pairs a prompt
    assert store.progress(a)["pairs"]["mine_total"] == n_pairs


def test_iteration_for_the_reward_model(store):
    h = store.annotator_by_token(store.add_annotator("h"))["id"]
    sim = store.ensure_annotator("sim-x", "simulated", {"noise": 0})
    store.add_label(1, h, "good")
    store.add_label(2, h, "bad")
    store.add_label(3, h, "skip")
    store.add_label(1, sim, "bad")
    store.add_comparison(1, 2, h, "right")
    store.add_comparison(1, 3, sim, "tie")
    recs = list(store.labelled_images())
    assert len(recs) == 3  # skips are not yielded
    image, prompt, spec, task, split, label, simulated, annotator = recs[0][:8]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert (prompt, label, simulated, annotator) == (store.generation(1)["prompt"], 1, False, "h")
    assert spec == store.generation(1)["spec"] and task == store.generation(1)["task"] and split == "seen"
    assert [r.label for r in store.labelled_images(simulated=False)] == [1, 0]
    assert [(r.annotator, r.simulated) for r in store.labelled_images(simulated=True)] == [("sim-x", True)]
    assert next(store.labelled_images(load_images=False)).image is None
    pairs = list(store.pairs())
    assert pairs[0].generation_w == 2 and pairs[0].generation_l == 1 and not pairs[0].tie
    assert np.array_equal(pairs[0].img_w, store.image(2))
    assert pairs[1].tie and pairs[1].simulated
    assert len(list(store.pairs(simulated=False))) == 1
    with pytest.raises(ValueError, match="other parameters|choose another name"):
        store.ensure_annotator("sim-x", "simulated", {"noise": 0.5})


def test_concurrent_writers_in_threads(store):
    """Many threads labelling at once through one store: nothing lost, nothing doubled."""
    ids = [store.annotator_by_token(store.add_annotator(f"t{i}"))["id"] for i in range(6)]
    store.set_labels_per_image(3)
    done = {a: [] for a in ids}
    errors = []

    def work(a):
        try:
            while batch := store.next_images(a, 3):
                for g in batch:
                    done[a].append(store.add_label(g, a, "good", enforce_assignment=True)["id"])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(a,)) for a in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    acked = [i for a in ids for i in done[a]]
    assert len(acked) == len(set(acked)) == 24 * 3 == store.counts()["labels"]


def test_schema_migrations(tmp_path, monkeypatch):
    s = make_project(tmp_path / "p", n_prompts=1, per_prompt=2, k=1)
    a = s.annotator_by_token(s.add_annotator("a"))["id"]
    s.add_label(1, a, "good")
    s.close()

    def v2(conn):
        conn.execute("ALTER TABLE labels ADD COLUMN comment TEXT")

    current = schema_mod.SCHEMA_VERSION  # the next version is a test migration
    monkeypatch.setattr(schema_mod, "SCHEMA_VERSION", current + 1)
    monkeypatch.setitem(schema_mod.MIGRATIONS, current + 1, v2)
    s = FeedbackStore.open(tmp_path / "p")
    conn = s._conn()
    assert conn.execute("PRAGMA user_version").fetchone()[0] == current + 1
    assert [tuple(r) for r in conn.execute("SELECT value, comment FROM labels")] == [("good", None)]
    backups = list((tmp_path / "p" / "backups").glob(f"feedback-v{current}-*.sqlite"))
    assert len(backups) == 1  # the old database, copied before migrating
    assert sqlite3.connect(backups[0]).execute("SELECT count(*) FROM labels").fetchone()[0] == 1
    s.close()

    monkeypatch.setattr(schema_mod, "SCHEMA_VERSION", current)
    with pytest.raises(schema_mod.SchemaError, match="newer than this"):
        FeedbackStore.open(tmp_path / "p")

    other = tmp_path / "o"
    other.mkdir()
    sqlite3.connect(other / "feedback.sqlite").execute("CREATE TABLE x (y)")
    with pytest.raises(schema_mod.SchemaError, match="not a t2ialign feedback project"):
        FeedbackStore.open(other)


def test_failed_migration_leaves_the_old_version(tmp_path, monkeypatch):
    make_project(tmp_path / "p", n_prompts=1, per_prompt=1, k=1).close()

    def broken(conn):
        conn.execute("ALTER TABLE labels ADD COLUMN note TEXT")
        raise RuntimeError("boom")

    current = schema_mod.SCHEMA_VERSION
    monkeypatch.setattr(schema_mod, "SCHEMA_VERSION", current + 1)
    monkeypatch.setitem(schema_mod.MIGRATIONS, current + 1, broken)
    with pytest.raises(RuntimeError, match="boom"):
        FeedbackStore.open(tmp_path / "p")
    conn = sqlite3.connect(tmp_path / "p" / "feedback.sqlite")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == current
    assert "note" not in [r[1] for r in conn.execute("PRAGMA table_info(labels)")]


def test_world_rows_mix_good_and_bad():
    from t2ialign.world import check

    rows = world_rows(8, 4)
    verdicts = [check(r["image"], r["prompt"]).correct for r in rows]
    assert 0 < sum(verdicts) < len(verdicts)
