"""A real browser (headless Chromium, Debian's package, driven by Playwright) logs in, labels images
with the keyboard, undoes one, switches to pairwise mode, compares two pairs; the database must hold
exactly what was typed. Skips only when /usr/bin/chromium is absent (.ci/run installs it)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from feedback_helpers import make_project, running_server

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} is absent: install Debian's chromium (apt-get install chromium) for the browser test",
)


def wait_for(pred, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        out = pred()
        if out:
            return out
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the database")


def test_browser_labels_with_the_keyboard_undo_and_pairs(tmp_path):
    from playwright import sync_api  # the test extra: a missing Playwright fails, it does not skip

    store = make_project(tmp_path / "proj", n_prompts=4, per_prompt=4, k=1)
    token = store.add_annotator("alice")
    alice = store.annotator("alice")["id"]
    errors: list[str] = []
    with (
        running_server(tmp_path / "proj", tmp_path / "server.log") as server,
        sync_api.sync_playwright() as p,
    ):
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh --user-data-dir
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = ctx.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/label")
            assert page.url.endswith("/login")
            page.fill("#token", token)
            page.keyboard.press("Enter")
            page.wait_for_url("**/label")
            cards = page.locator("#cards .card")
            assert cards.count() == 3
            first = [int(cards.nth(i).get_attribute("data-id")) for i in range(3)]

            page.keyboard.press("g")  # image 1: good
            page.keyboard.press("b")  # image 2: bad
            wait_for(lambda: len(store.label_rows(annotator="alice")) == 2)
            page.keyboard.press("z")  # undo image 2
            wait_for(lambda: len(store.label_rows(annotator="alice")) == 1)
            page.wait_for_selector("#cards .card:nth-child(2).current:not(.v-bad)")  # back on image 2
            page.keyboard.press("2")  # image 2: bad again
            page.keyboard.press("s")  # image 3: skip -> the next screen loads
            shown = "[...document.querySelectorAll('#cards .card')].map(c => +c.dataset.id).join()"
            page.wait_for_function(f"(ids) => {shown} !== ids", arg=",".join(map(str, first)))
            second = int(page.locator("#cards .card").first.get_attribute("data-id"))
            page.keyboard.press("g")
            wait_for(lambda: len(store.label_rows(annotator="alice")) == 4)
            page.wait_for_function("() => document.querySelector('#num-mine').textContent.startsWith('4 of')")
            page.screenshot(path=str(tmp_path / "label.png"))

            page.keyboard.press("p")  # to pairwise mode
            page.wait_for_url("**/pairs")
            pair1 = [int(c.get_attribute("data-id")) for c in page.locator("#cards .card").all()]
            assert len(pair1) == 2
            page.keyboard.press("ArrowLeft")  # left is better
            wait_for(lambda: len(store.comparison_rows(annotator="alice")) == 1)
            page.wait_for_function(f"(ids) => {shown} !== ids", arg=",".join(map(str, pair1)))
            pair2 = [int(c.get_attribute("data-id")) for c in page.locator("#cards .card").all()]
            page.keyboard.press("t")  # a tie
            wait_for(lambda: len(store.comparison_rows(annotator="alice")) == 2)
            page.screenshot(path=str(tmp_path / "pairs.png"))
        finally:
            ctx.close()
    assert not errors, errors

    rows = store.label_rows(annotator="alice")
    assert [(r["generation_id"], r["value"]) for r in rows] == [
        (first[0], "good"),
        (first[1], "bad"),
        (first[2], "skip"),
        (second, "good"),
    ]
    assert all(r["source"] == "app" and not r["simulated"] for r in rows)
    undone = store._conn().execute(
        "SELECT generation_id, value FROM labels WHERE annotator_id = ? AND undone_at IS NOT NULL", (alice,)
    )
    assert [tuple(u) for u in undone] == [(first[1], "bad")]  # the undone label is kept, marked undone
    comps = store.comparison_rows(annotator="alice")
    assert [(c["left_id"], c["right_id"], c["choice"]) for c in comps] == [(*pair1, "left"), (*pair2, "tie")]
    assert Path(tmp_path / "label.png").stat().st_size > 10_000
    store.close()
