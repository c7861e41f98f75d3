"""A real browser (headless Chromium, Debian's package, driven by Playwright) logs in, labels images
with the keyboard, undoes one, switches to pairwise mode, compares two pairs; the database must hold
exactly what was typed. A second test labels a project of free-text prompts and SD-sized images
(512x512, 512x384) with the mouse. Skips only when /usr/bin/chromium is absent (.ci/run installs it)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from feedback_helpers import make_project, running_server
from t2ialign.feedback import FeedbackStore

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


def launch(p, tmp_path):
    return p.chromium.launch_persistent_context(
        str(tmp_path / "chromium-profile"),  # a fresh --user-data-dir
        executable_path=CHROMIUM,
        headless=True,
        args=ARGS,
        viewport={"width": 1280, "height": 900},
    )


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
        ctx = launch(p, tmp_path)
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


def gradient(height: int, width: int, colour: tuple[int, int, int]) -> np.ndarray:
    """A smooth image (small PNGs, quick to write) of one colour fading across."""
    ramp = np.linspace(0.2, 1.0, width)[None, :, None] * np.linspace(1.0, 0.6, height)[:, None, None]
    return (ramp * np.array(colour)).astype(np.uint8)


SHOWN = """() => [...document.querySelectorAll('#cards .card img')].map(i => ({
    id: +i.closest('.card').dataset.id, w: i.naturalWidth, h: i.naturalHeight, title: i.title,
    box: [i.getBoundingClientRect().width, i.getBoundingClientRect().height],
    px: i.classList.contains('px'), rendering: getComputedStyle(i).imageRendering,
    fit: getComputedStyle(i).objectFit}))"""
LOADED = (
    "() => [...document.querySelectorAll('#cards .card img')].every(i => i.complete && i.naturalWidth > 0)"
)


def test_browser_labels_free_text_prompts_and_512px_images(tmp_path):
    """Free-text prompts (a short one and one over 80 characters, with HTML in it) and SD 1.5's
    512 px images, square and 4:3: the page shows each prompt as written and each image at its
    size (scaled down smoothly into the card, not pixelated); clicks on Good and Bad label them."""
    from playwright import sync_api

    short = "a photo of a cat wearing a red hat"
    long = (
        "an oil painting of a lighthouse on a cliff at dusk, waves crashing on the rocks below, "
        "gulls in a stormy sky & warm <b>light</b> in its windows"
    )
    store = FeedbackStore.create(tmp_path / "proj", labels_per_image=1)
    gids = {}
    for prompt, colour in ((short, (220, 40, 40)), (long, (40, 90, 220))):
        for seed, (h, w) in enumerate([(512, 512), (384, 512)]):
            gid, _ = store.add_generation(gradient(h, w, colour), prompt, model_id="sd15", seed=seed)
            gids[prompt, (w, h)] = gid
    token = store.add_annotator("alice")
    errors: list[str] = []
    with (
        running_server(tmp_path / "proj", tmp_path / "server.log") as server,
        sync_api.sync_playwright() as p,
    ):
        ctx = launch(p, tmp_path)
        try:
            page = ctx.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/login")
            page.fill("#token", token)
            page.keyboard.press("Enter")
            page.wait_for_url("**/label")
            screens = []
            for prompt, clicks in ((short, ("good", "bad")), (long, ("bad", "good"))):
                page.wait_for_function(
                    "(p) => document.querySelector('#prompt').textContent === p", arg=f"“{prompt}”"
                )
                page.wait_for_function(LOADED)
                screens.append(
                    dict(
                        prompt=page.text_content("#prompt"),
                        long=page.get_attribute("#prompt", "class"),
                        shown=page.evaluate(SHOWN),
                    )
                )
                cards = page.locator("#cards .card")
                for i, value in enumerate(clicks):
                    before = len(store.label_rows(annotator="alice"))
                    cards.nth(i).locator(f"button.{value}").click()
                    wait_for(lambda n=before: len(store.label_rows(annotator="alice")) == n + 1)
                if prompt == short:
                    page.screenshot(path=str(tmp_path / "free-text.png"))
            page.wait_for_selector("#done:not([hidden])")  # nothing left for her
        finally:
            ctx.close()
    assert not errors, errors

    for screen, prompt in zip(screens, (short, long), strict=True):
        assert screen["prompt"] == f"“{prompt}”"  # the text as written: the <b> is not markup
        assert ("long" in screen["long"].split()) == (len(prompt) > 80)
        shown = screen["shown"]
        assert sorted((s["w"], s["h"]) for s in shown) == [(512, 384), (512, 512)]
        for s in shown:
            assert s["id"] == gids[prompt, (s["w"], s["h"])]
            assert s["title"] == f"{s['w']} x {s['h']} px"
            assert s["box"] == [256, 256] and not s["px"] and s["rendering"] == "auto"  # scaled down smoothly
            assert s["fit"] == "contain"  # the aspect ratio kept: 512x384 is letterboxed, not stretched
    by_id = {r["generation_id"]: r["value"] for r in store.label_rows(annotator="alice")}
    first, second = ([s["id"] for s in screen["shown"]] for screen in screens)
    assert by_id == {first[0]: "good", first[1]: "bad", second[0]: "bad", second[1]: "good"}
    assert {store.generation(g)["prompt"] for g in by_id} == {short, long}
    assert all(r["source"] == "app" for r in store.label_rows(annotator="alice"))
    assert Path(tmp_path / "free-text.png").stat().st_size > 10_000
    store.close()
