"""The labelling app's HTTP API fuzzed with schemathesis against the app's own OpenAPI schema.

The schema comes from ``app.openapi()`` (the app serves no schema or docs route), and requests go
to the app in-process (ASGI transport). For each operation, schemathesis generates valid requests
and, where the operation has parameters or a body, invalid ones (wrong types, values, bodies);
half the time a real generation id, image name or token is put in, so the labelling paths are
reached too. Each request is sent four times: with an annotator's token, the admin token, none, and junk.
No answer may be a 5xx, and a refused request (4xx) must leave the database and the project folder
as they were: every row of every table is compared before and after each refused call.

Bounded for CI: ``T2IALIGN_FUZZ_EXAMPLES`` examples per operation (default 25), derandomized so that
CI sends the same requests every time; set the variable to fuzz longer with fresh random inputs.
"""

from __future__ import annotations

import collections
import os
import sqlite3
import types
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode

from feedback_helpers import world_rows
from t2ialign.feedback import FeedbackStore
from t2ialign.feedback.app import create_app

EXAMPLES = int(os.environ.get("T2IALIGN_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize="T2IALIGN_FUZZ_EXAMPLES" not in os.environ,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the work tree
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)

# Every operation of the schema (a test checks that the list is complete): one test each.
OPERATIONS = [
    ("GET", "/"),
    ("GET", "/login"),
    ("POST", "/login"),
    ("POST", "/logout"),
    ("GET", "/label"),
    ("GET", "/pairs"),
    ("GET", "/stats"),
    ("GET", "/images/{name}"),
    ("GET", "/api/health"),
    ("GET", "/api/next"),
    ("GET", "/api/progress"),
    ("POST", "/api/labels"),
    ("POST", "/api/comparisons"),
    ("POST", "/api/undo"),
    ("GET", "/api/stats"),
]


def snapshot(project: Path) -> dict:
    """Every row of every table (in one read transaction) and the project's files, other than the
    database's own (its WAL and shared-memory files change on reads too)."""
    conn = sqlite3.connect(f"file:{project / 'feedback.sqlite'}?mode=ro", uri=True)
    try:
        conn.execute("BEGIN")
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows = {t: conn.execute(f'SELECT * FROM "{t}" ORDER BY rowid').fetchall() for t in tables}
    finally:
        conn.close()
    files = sorted(
        (str(p.relative_to(project)), p.stat().st_size)
        for p in project.rglob("*")
        if p.is_file() and not p.name.startswith("feedback.sqlite")
    )
    return {"tables": rows, "files": files}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A free-text project (a short and a long prompt, images of 512x512, 512x384 and 32x32, one
    label an image) with a prompt of the shapes world too; an annotator with images and a pair
    already given to her (so that some labels succeed and later ones conflict); the app's schema."""
    path = tmp_path_factory.mktemp("fuzz") / "proj"
    store = FeedbackStore.create(path, labels_per_image=1)
    rng = np.random.default_rng(0)
    prompts = ["a photo of a cat wearing a red hat", "an astronaut riding a horse on the moon, " * 3]
    for prompt in prompts:
        for seed, shape in enumerate([(512, 512, 3), (384, 512, 3), (32, 32, 3)]):
            store.add_generation(rng.integers(0, 255, shape, dtype=np.uint8), prompt, model_id="m", seed=seed)
    store.add_generations(world_rows(n_prompts=1, per_prompt=2))  # and a prompt of the shapes world
    token = store.add_annotator("alice")
    store.add_annotator("bob")
    alice = store.annotator("alice")["id"]
    store.next_images(alice, 3)
    store.next_pair(alice)
    gids = [g["id"] for g in store.generations()]
    names = [f"{sha}.png" for (sha,) in store._conn().execute("SELECT sha256 FROM images")]
    store.close()

    app = create_app(path)
    schema = schemathesis.openapi.from_dict(app.openapi())
    schema.app = app  # requests go to the app in-process, through the ASGI transport
    admin = (path / "admin.token").read_text().strip()
    yield types.SimpleNamespace(
        path=path,
        schema=schema,
        tokens={"annotator": token, "admin": admin, "none": None},
        known={"generation_id": gids, "left": gids, "right": gids, "token": [token, admin], "name": names},
    )
    app.state.store.close()


def steered(strategy, known: dict):
    """Half the time, a known value where the case has that body field or path parameter: random
    ids and names rarely hit the project's few, and then labelling (200, 409) goes untested."""

    @st.composite
    def draw_case(draw):
        case = draw(strategy)
        if isinstance(case.body, dict):
            for key in ("generation_id", "left", "right", "token"):
                if key in case.body and draw(st.booleans()):
                    case.body = {**case.body, key: draw(st.sampled_from(known[key]))}
        if "name" in (case.path_parameters or {}) and draw(st.booleans()):
            case.path_parameters = {**case.path_parameters, "name": draw(st.sampled_from(known["name"]))}
        # a fourth caller: any latin-1 text as the token, in the header and the cookie
        junk = draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=40))
        return case, junk

    return draw_case()


def test_the_fuzzed_operations_are_all_of_the_schema(project):
    ops = {(op.ok().method.upper(), op.ok().path) for op in project.schema.get_all_operations()}
    assert ops == set(OPERATIONS)
    assert "/openapi.json" not in ops and "/docs" not in ops  # the app serves no schema itself


@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_5xx_and_refused_requests_write_nothing(project, method, path):
    op = project.schema[path][method]
    strategy = op.as_strategy(GenerationMode.POSITIVE)
    if op.definition.raw.get("parameters") or op.definition.raw.get("requestBody"):
        strategy |= op.as_strategy(GenerationMode.NEGATIVE)  # invalid values, types, bodies
    strategy = steered(strategy, project.known)
    seen = collections.Counter()

    @FUZZ
    @given(drawn=strategy)
    def check(drawn):
        case, junk = drawn
        callers = [(who, {"Authorization": f"Bearer {t}"} if t else {}) for who, t in project.tokens.items()]
        callers.append(("junk", {"Authorization": f"Bearer {junk}", "Cookie": f"t2ialign_token={junk}"}))
        for who, headers in callers:
            before = snapshot(project.path)
            response = case.call(headers=headers, allow_redirects=False)
            status = response.status_code
            seen[status] += 1
            what = f"{case.method} {case.formatted_path} as {who}: {status} {response.content[:300]!r}"
            assert status < 500, what
            if 400 <= status < 500:
                after = snapshot(project.path)
                assert after["files"] == before["files"], f"a refused request wrote files: {what}"
                changed = [t for t in before["tables"] if before["tables"][t] != after["tables"][t]]
                assert not changed, f"a refused request changed tables {changed}: {what}"

    check()
    print(f"{method} {path}: {dict(sorted(seen.items()))}")  # shown with -s
