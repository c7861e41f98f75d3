"""The labelling app's API and pages, through the real app (FastAPI's TestClient): login, the
labelling protocol, undo, pairs, admin pages, and every kind of bad request getting a clear 4xx."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from feedback_helpers import make_project
from t2ialign.feedback.app import create_app


@pytest.fixture
def project(tmp_path):
    store = make_project(tmp_path / "proj", n_prompts=4, per_prompt=4, k=2)
    tokens = {n: store.add_annotator(n) for n in ("alice", "bob")}
    admin = (tmp_path / "proj" / "admin.token").read_text().strip()
    yield store, tokens, admin
    store.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One project for the tests that change nothing in it."""
    path = tmp_path_factory.mktemp("shared") / "proj"
    store = make_project(path, n_prompts=2, per_prompt=4, k=2)
    tokens = {"alice": store.add_annotator("alice")}
    yield store, tokens, (path / "admin.token").read_text().strip()
    store.close()


def client(store, token=None) -> TestClient:
    c = TestClient(create_app(store.path))
    if token:
        c.headers["Authorization"] = f"Bearer {token}"
    return c


def test_login_pages_and_cookie(project):
    store, tokens, admin = project
    c = client(store)
    r = c.get("/label", headers={"accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    r = c.get("/login")
    assert r.status_code == 200 and 'name="token"' in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    r = c.post("/login", data={"token": "wrong"})
    assert r.status_code == 401 and "not valid" in r.text
    r = c.post("/login", data={"token": tokens["alice"]}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/label"
    assert (
        "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
    )
    page = c.get("/label")
    assert page.status_code == 200 and "alice" in page.text and "<kbd>G</kbd>" in page.text
    assert 'id="state"' in page.text and "/static/label.js" in page.text
    assert c.get("/static/label.js").status_code == 200 and c.get("/static/app.css").status_code == 200
    assert c.get("/pairs").status_code == 200
    r = c.get("/stats", headers={"accept": "text/html"})
    assert r.status_code == 403 and "admin token" in r.text
    r = c.post("/logout", follow_redirects=False)
    assert r.status_code == 303
    a = client(store)
    assert a.post("/login", data={"token": admin}, follow_redirects=False).headers["location"] == "/stats"
    r = a.get("/stats")
    assert r.status_code == 200 and "Agreement between annotators" in r.text and "alice" in r.text


def test_label_protocol_with_undo(project):
    store, tokens, _ = project
    c = client(store, tokens["alice"])
    s = c.get("/api/next").json()
    assert len(s["items"]) == 3 and s["prompt"] and s["progress"]["images"]["mine"] == 0
    assert s["items"][0]["src"].startswith("/images/")
    img = c.get(s["items"][0]["src"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    ids = [it["id"] for it in s["items"]]
    for gid, v in zip(ids, ["good", "bad", "skip"], strict=True):
        r = c.post("/api/labels", json={"generation_id": gid, "value": v, "request_id": f"req-{gid}"})
        assert r.status_code == 200 and not r.json()["duplicate"]
    assert c.get("/api/progress").json()["images"]["mine"] == 3
    # a retried request returns the first answer
    again = c.post(
        "/api/labels", json={"generation_id": ids[2], "value": "skip", "request_id": f"req-{ids[2]}"}
    )
    assert again.status_code == 200 and again.json()["duplicate"] and again.json()["id"] == r.json()["id"]
    # labelling it again without undo: 409
    r = c.post("/api/labels", json={"generation_id": ids[0], "value": "bad"})
    assert r.status_code == 409 and "undo" in r.json()["error"]
    u = c.post("/api/undo", json={"mode": "images"}).json()
    assert u["undone"]["generation_id"] == ids[2] and u["progress"]["images"]["mine"] == 2
    s2 = c.get("/api/next").json()
    assert s2["items"][0]["id"] == ids[2]  # the undone image comes back first
    rows = store.label_rows(annotator="alice")
    assert [(r["generation_id"], r["value"]) for r in rows] == [(ids[0], "good"), (ids[1], "bad")]


def test_pairs_api(project):
    store, tokens, _ = project
    c = client(store, tokens["bob"])
    s = c.get("/api/next?mode=pairs").json()
    left, right = (it["id"] for it in s["items"])
    r = c.post("/api/comparisons", json={"left": left, "right": right, "choice": "right", "request_id": "p1"})
    assert r.status_code == 200 and c.get("/api/progress").json()["pairs"]["mine"] == 1
    assert c.post("/api/undo", json={"mode": "pairs"}).json()["undone"]["choice"] == "right"
    assert c.post("/api/undo", json={"mode": "pairs"}).json()["undone"] is None
    r = c.post("/api/comparisons", json={"left": left, "right": 10**6, "choice": "tie"})
    assert r.status_code == 404
    assert c.get("/api/next?mode=sideways").status_code == 422


def test_the_k_limit_is_enforced_by_the_server(tmp_path):
    store = make_project(tmp_path / "p", n_prompts=1, per_prompt=1, k=1)
    ta, tb = store.add_annotator("a"), store.add_annotator("b")
    a, b = client(store, ta), client(store, tb)
    gid = a.get("/api/next").json()["items"][0]["id"]
    assert b.get("/api/next").json()["items"] == []  # leased to a: nothing for b
    assert b.post("/api/labels", json={"generation_id": gid, "value": "good"}).status_code == 409
    assert a.post("/api/labels", json={"generation_id": gid, "value": "good"}).status_code == 200
    assert b.get("/api/next").json().get("done")
    store.close()


@pytest.mark.parametrize(
    "method,url,kwargs,status,message",
    [
        ("get", "/api/next", {}, 401, "log in"),
        ("post", "/api/labels", {"json": {"generation_id": 1, "value": "good"}}, 401, "log in"),
        ("get", "/api/next", {"headers": {"Authorization": "Bearer not-a-token"}}, 401, "wrong"),
        ("get", "/api/next", {"headers": {"Authorization": "Bearer " + "x" * 5000}}, 401, "wrong"),
        ("get", "/api/stats", {"auth": "alice"}, 403, "admin"),
        ("get", "/api/next", {"auth": "admin"}, 403, "only annotators"),
        (
            "post",
            "/api/labels",
            {"auth": "alice", "json": {"generation_id": 99999, "value": "good"}},
            404,
            "no image",
        ),
        (
            "post",
            "/api/labels",
            {"auth": "alice", "json": {"generation_id": 10**30, "value": "good"}},
            422,
            "less",
        ),
        (
            "post",
            "/api/labels",
            {"auth": "alice", "json": {"generation_id": "1", "value": "good"}},
            422,
            "integer",
        ),
        (
            "post",
            "/api/labels",
            {"auth": "alice", "json": {"generation_id": 1, "value": "great"}},
            422,
            "value",
        ),
        (
            "post",
            "/api/labels",
            {"auth": "alice", "json": {"generation_id": 1}},
            422,
            "value: Field required",
        ),
        (
            "post",
            "/api/labels",
            {"auth": "alice", "json": {"generation_id": 1, "value": "good", "x": 1}},
            422,
            "x",
        ),
        ("post", "/api/labels", {"auth": "alice", "json": [1, 2]}, 422, "malformed"),
        (
            "post",
            "/api/labels",
            {"auth": "alice", "content": b"{nope", "ctype": "json"},
            422,
            "not valid JSON",
        ),
        ("post", "/api/labels", {"auth": "alice", "content": b"\xff\xfe", "ctype": "json"}, 422, "JSON"),
        (
            "post",
            "/api/labels",
            {"auth": "alice", "json": {"generation_id": 1, "value": "good", "request_id": "a b"}},
            400,
            "request_id",
        ),
        (
            "post",
            "/api/labels",
            {"auth": "alice", "content": b"x" * 70000, "ctype": "json"},
            413,
            "too large",
        ),
        ("post", "/login", {"content": b"token=" + b"x" * 70000, "ctype": "form"}, 413, "too large"),
        ("post", "/api/undo", {"auth": "alice", "json": {"mode": "all"}}, 422, "mode"),
        ("put", "/api/labels", {"auth": "alice"}, 405, "not allowed"),
        ("get", "/nowhere", {}, 404, "not found"),
        ("get", "/images/abc.png", {"auth": "alice"}, 404, "SHA-256"),
        ("get", "/images/" + "0" * 64 + ".png", {"auth": "alice"}, 404, "in this project"),
        ("get", "/images/..%2F..%2Ffeedback.sqlite", {"auth": "alice"}, 404, "no image"),
        ("get", "/images/%2e%2e/%2e%2e/admin.token", {"auth": "alice"}, 404, "no image"),
        ("get", "/images/..%5c..%5cfeedback.sqlite", {"auth": "alice"}, 404, "no image"),
        ("get", "/static/..%2F..%2Ffeedback%2Fstore.py", {}, 404, ""),
        ("get", "/static/../app.py", {}, 404, ""),
        ("get", "/images/" + "0" * 64 + ".png", {}, 401, "log in"),
    ],
)
def test_bad_requests_get_a_clear_4xx(shared, method, url, kwargs, status, message):
    store, tokens, admin = shared
    c = client(store)
    headers = dict(kwargs.get("headers", {}))
    auth = kwargs.get("auth")
    if auth:
        headers["Authorization"] = "Bearer " + (admin if auth == "admin" else tokens[auth])
    ctype = kwargs.get("ctype")
    if ctype:
        headers["Content-Type"] = {"json": "application/json", "form": "application/x-www-form-urlencoded"}[
            ctype
        ]
    extra = {k: kwargs[k] for k in ("json", "content") if k in kwargs}
    r = c.request(method.upper(), url, headers=headers, **extra)
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    if message:
        assert message in r.json()["error"]


def test_chunked_oversized_body_is_refused(shared):
    store, tokens, _ = shared
    c = client(store, tokens["alice"])

    def chunks():
        for _ in range(40):
            yield b"x" * 4096

    r = c.post("/api/labels", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["error"]


def test_stats_api(project):
    store, tokens, admin = project
    c = client(store, tokens["alice"])
    for it in c.get("/api/next").json()["items"]:
        c.post("/api/labels", json={"generation_id": it["id"], "value": "good"})
    s = client(store, admin).get("/api/stats").json()
    assert s["counts"]["labels"] == 3
    assert s["progress"]["images"]["project"] == 3
    alice = next(a for a in s["annotators"] if a["name"] == "alice")
    assert alice["good"] == 3 and alice["progress"]["images"]["mine"] == 3
    assert s["agreement"]["human"]["labels"]["kappa"] is None  # NaN -> null: nobody overlaps yet
