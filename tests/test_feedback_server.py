"""Reliability of the real server (``t2ialign label serve`` in a subprocess on 127.0.0.1): eight
concurrent annotator clients submit over 2,000 labels (none lost, none doubled, assignments
respected), and a server killed with SIGKILL mid-run loses no label it acknowledged."""

from __future__ import annotations

import math
import sqlite3
import threading
import time
import uuid
from collections import Counter

import numpy as np

from feedback_helpers import ApiClient, Server, make_project, running_server
from t2ialign.feedback import FeedbackStore
from t2ialign.world import suite

K = 4
N_CLIENTS = 8


def test_eight_concurrent_clients_2000_labels(tmp_path):
    per_prompt = 6  # images of n_prompts prompts, k = 4 labels each: just over 2,000 labels
    n_prompts = math.ceil(2000 / K / per_prompt)
    assert n_prompts <= len(suite("seen"))
    store = make_project(tmp_path / "proj", n_prompts=n_prompts, per_prompt=per_prompt, k=K)
    n_images = store.counts()["generations"]
    assert n_images * K >= 2000
    tokens = {f"ann{i}": store.add_annotator(f"ann{i}") for i in range(N_CLIENTS)}
    acked: dict[int, tuple[str, int, str]] = {}
    lock = threading.Lock()
    failures: list[str] = []
    retries = Counter()

    def work(name: str, token: str, seed: int):
        rng = np.random.default_rng(seed)
        c = ApiClient(server.port, token)
        try:
            while True:
                status, s = c.get("/api/next")
                if status != 200:
                    failures.append(f"{name} next: {status} {s}")
                    return
                if not s["items"]:
                    # nothing for this client now; another client's skip can still free an image for
                    # it, so it leaves only when every image has its k labels (a real annotator
                    # comes back later; leaving at once made the test depend on timing)
                    with lock:
                        done = Counter(g for _, g, v in acked.values() if v != "skip")
                    if (len(done) == n_images and set(done.values()) == {K}) or time.time() > deadline:
                        return
                    time.sleep(0.05)
                    continue
                for it in s["items"]:
                    value = str(rng.choice(["good", "bad", "skip"], p=[0.48, 0.48, 0.04]))
                    body = {"generation_id": it["id"], "value": value, "request_id": uuid.uuid4().hex}
                    status, out = c.post("/api/labels", body)
                    if status != 200:
                        failures.append(f"{name} label: {status} {out}")
                        return
                    if rng.random() < 0.03:  # a client retrying: same request id, same answer
                        status, again = c.post("/api/labels", body)
                        assert status == 200 and again["duplicate"] and again["id"] == out["id"]
                        retries[name] += 1
                    with lock:
                        assert out["id"] not in acked
                        acked[out["id"]] = (name, it["id"], value)
        finally:
            c.close()

    deadline = time.time() + 100
    with running_server(tmp_path / "proj", tmp_path / "server.log") as server:
        t0 = time.time()
        threads = [threading.Thread(target=work, args=(n, t, i)) for i, (n, t) in enumerate(tokens.items())]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        elapsed = time.time() - t0
    assert not failures, failures[:5]
    print(f"\n{len(acked)} labels from {N_CLIENTS} clients in {elapsed:.1f} s ({len(acked) / elapsed:.0f}/s)")
    assert len(acked) >= 2000

    # none lost, none doubled: the database holds exactly the acknowledged labels
    rows = store.label_rows()
    ann_name = {a["id"]: a["name"] for a in store.annotators()}
    assert {r["id"] for r in rows} == set(acked)
    for r in rows:
        assert acked[r["id"]] == (ann_name[r["annotator_id"]], r["generation_id"], r["value"])
    all_rows = store._conn().execute("SELECT count(*) FROM labels").fetchone()[0]
    assert all_rows == len(acked)  # the retries added nothing
    assert sum(retries.values()) > 0
    # assignments respected: every image has exactly k good/bad labels, nobody labelled one twice,
    # and every label was for an image given to its annotator
    per_image = Counter(r["generation_id"] for r in rows if r["value"] != "skip")
    assert set(per_image.values()) == {K} and len(per_image) == n_images
    assert max(Counter((r["annotator_id"], r["generation_id"]) for r in rows).values()) == 1
    assigned = {
        tuple(r) for r in store._conn().execute("SELECT annotator_id, generation_id FROM assignments")
    }
    assert all((r["annotator_id"], r["generation_id"]) in assigned for r in rows)
    store.close()


def test_sigkill_loses_no_acknowledged_label(tmp_path):
    store = make_project(tmp_path / "proj", n_prompts=40, per_prompt=4, k=2)
    tokens = {f"ann{i}": store.add_annotator(f"ann{i}") for i in range(4)}
    acked: dict[str, int] = {}  # request id -> label id
    unacked: dict[str, dict] = {}  # the request each client had in flight when the server died
    lock = threading.Lock()
    enough = threading.Event()

    def work(name: str, token: str, port: int):
        c = ApiClient(port, token)
        try:
            while True:
                try:
                    items = c.get("/api/next")[1]["items"]
                except OSError:
                    return
                if not items:
                    return
                for it in items:
                    body = {"generation_id": it["id"], "value": "good", "request_id": uuid.uuid4().hex}
                    try:
                        status, out = c.post("/api/labels", body)
                    except OSError:
                        unacked[name] = body
                        return
                    assert status == 200, out
                    with lock:
                        acked[body["request_id"]] = out["id"]
                        if len(acked) >= 150:
                            enough.set()
        finally:
            c.close()

    server = Server(tmp_path / "proj", tmp_path / "server.log")
    try:
        threads = [threading.Thread(target=work, args=(n, t, server.port)) for n, t in tokens.items()]
        for t in threads:
            t.start()
        assert enough.wait(60)
        server.kill()  # mid-run: the clients are still sending
        for t in threads:
            t.join(30)
    finally:
        server.stop()
    n_acked = len(acked)
    assert n_acked >= 150

    # a fresh reader sees every acknowledged label, active, and the database is sound
    conn = sqlite3.connect(tmp_path / "proj" / "feedback.sqlite")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = dict(conn.execute("SELECT request_id, id FROM labels WHERE undone_at IS NULL").fetchall())
    assert all(rows.get(rid) == lid for rid, lid in acked.items())
    conn.close()

    # the requests that got no answer are retried (as the page does): each is stored exactly once,
    # whether or not it had been committed before the kill
    s = FeedbackStore.open(tmp_path / "proj")
    for name, body in unacked.items():
        aid = s.annotator(name)["id"]
        s.add_label(
            body["generation_id"], aid, "good", request_id=body["request_id"], enforce_assignment=True
        )
    rows = s.label_rows()
    assert len(rows) == len({(r["annotator_id"], r["generation_id"]) for r in rows})
    assert {r["id"] for r in rows} >= set(acked.values())
    rids = Counter(r[0] for r in s._conn().execute("SELECT request_id FROM labels"))
    assert all(rids[body["request_id"]] == 1 for body in unacked.values())
    print(f"\n{n_acked} labels acknowledged before SIGKILL; {len(unacked)} requests in flight, retried")
    s.close()
    store.close()
