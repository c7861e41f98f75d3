"""Simulated raters (the checker with noise and leniency) and the agreement statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from feedback_helpers import make_project
from t2ialign.feedback.simulate import SimulatedRater, judge, parse_bias, simulate, single_failure
from t2ialign.feedback.stats import agreement, cohen_kappa, fleiss_kappa, project_stats
from t2ialign.world import check, parse, render


def test_cohen_kappa_known_values():
    # 20 items: both yes 7, both no 8, yes/no 3, no/yes 2 -> p_o 0.75, p_e 0.5 -> kappa 0.5
    a = ["y"] * 7 + ["n"] * 8 + ["y"] * 3 + ["n"] * 2
    b = ["y"] * 7 + ["n"] * 8 + ["n"] * 3 + ["y"] * 2
    assert cohen_kappa(a, b) == pytest.approx(0.5)
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert math.isnan(cohen_kappa(["y", "y"], ["y", "y"]))  # chance agreement 1: undefined
    assert math.isnan(cohen_kappa([], []))
    with pytest.raises(ValueError):
        cohen_kappa(["y"], [])


def test_fleiss_kappa_textbook_example():
    # Fleiss (1971) as worked on Wikipedia: 10 items, 14 raters, 5 categories -> 0.210
    m = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    assert fleiss_kappa(m) == pytest.approx(0.2099, abs=1e-4)
    # with two raters, Fleiss' kappa is Scott's pi: close to Cohen's when the marginals agree
    assert fleiss_kappa([[2, 0], [0, 2], [1, 1], [2, 0]]) == pytest.approx(
        cohen_kappa("yyny", "ynny"), abs=0.1
    )


def test_agreement_switches_between_cohen_and_fleiss():
    two = {i: {"a": v, "b": v} for i, v in enumerate("gbgbgg")}
    assert agreement(two, ["g", "b"])["method"] == "cohen"
    three = {i: {"a": "g", "b": "g", "c": "b" if i % 2 else "g"} for i in range(6)}
    out = agreement(three, ["g", "b"])
    assert out["method"] == "fleiss" and out["n_items"] == 6 and len(out["pairs"]) == 3


def test_parse_bias():
    assert parse_bias(["count=0.2", "color=0.1,shape=1"]) == {"count": 0.2, "color": 0.1, "shape": 1.0}
    for bad in (["count"], ["size=0.1"], ["count=2"], ["count=x"]):
        with pytest.raises(ValueError, match="bias"):
            parse_bias(bad)


def test_oracle_noise_and_leniency_rates():
    good = render(parse("two red circles"), seed=0)
    three = render(parse("three red circles"), seed=0)  # fails on count only
    spec = parse("two red circles").to_dict()
    assert check(good, spec).correct and not check(three, spec).correct
    n = 600
    exact = SimulatedRater("oracle")
    assert all(exact.label(good, spec, i) == "good" for i in range(50))
    assert all(exact.label(three, spec, i) == "bad" for i in range(50))
    noisy = SimulatedRater("oracle", noise=0.1)
    flips = sum(noisy.label(good, spec, i) == "bad" for i in range(n)) / n
    assert 0.06 < flips < 0.14
    lenient = SimulatedRater("oracle", bias={"count": 0.3})
    forgiven = sum(lenient.label(three, spec, i) == "good" for i in range(n)) / n
    assert 0.24 < forgiven < 0.36
    assert all(lenient.label(good, spec, i) == "good" for i in range(50))
    other = SimulatedRater("oracle", bias={"color": 1.0})  # leniency on another attribute: no effect
    assert all(other.label(three, spec, i) == "bad" for i in range(50))
    # pairs: correct beats incorrect; equal verdicts tie; noise reverses a win
    assert exact.compare(good, three, spec, 0) == "left" and exact.compare(three, good, spec, 0) == "right"
    assert exact.compare(good, good, spec, 0) == "tie"
    answers = [noisy.compare(good, three, spec, i) for i in range(n)]
    assert 0.06 < answers.count("right") / n < 0.14 and "tie" not in answers
    ties = [noisy.compare(good, good, spec, i) for i in range(n)]
    assert 0.06 < (n - ties.count("tie")) / n < 0.14
    # the same key gives the same answer
    assert [noisy.label(good, spec, i) for i in range(100)] == [
        noisy.label(good, spec, i) for i in range(100)
    ]
    with pytest.raises(ValueError):
        SimulatedRater("psychic")
    with pytest.raises(ValueError):
        SimulatedRater("oracle", noise=1.5)


def test_judge_agrees_with_the_checker():
    """The simulator's copy of the checker's decision rules gives the checker's verdicts."""
    rng = np.random.default_rng(0)
    from t2ialign.world import TASKS, detect, perturbations, random_spec

    n = 0
    for i in range(64):
        spec = random_spec(rng, TASKS[i % len(TASKS)])
        alts = [spec] + [s for _, s in perturbations(spec)]
        shown = alts[int(rng.integers(len(alts)))]
        image = render(shown, seed=i)
        det = detect(image)
        for s in [spec] + [a for _, a in perturbations(spec)][:6]:
            assert judge(det, s) == check(image, s).correct, (spec, s)
            n += 1
    assert n > 300


def test_leniency_names_the_single_wrong_attribute():
    spec = parse("a red circle on a black background")
    from t2ialign.world import detect

    cases = {
        "a blue circle on a black background": {"color"},
        "a red square on a black background": {"shape"},
        "a red circle on a white background": {"background"},
        "two red circles on a black background": {"count"},
        "a red circle on a black background": set(),
        "two blue squares on a white background": set(),  # several attributes wrong
    }
    for shown, want in cases.items():
        assert single_failure(detect(render(parse(shown), seed=1)), spec) == want, shown


def test_simulate_project_is_incremental_and_marked(tmp_path):
    store = make_project(tmp_path / "p", n_prompts=10, per_prompt=4, k=2)
    out = simulate(store, SimulatedRater("oracle", noise=0.0), pairs_per_prompt=3)
    assert out == {"annotator": "sim-oracle", "labels": 40, "comparisons": 30, "no_spec": 0}
    again = simulate(store, SimulatedRater("oracle", noise=0.0), pairs_per_prompt=3)
    assert again["labels"] == 0 and again["comparisons"] == 0
    recs = list(store.labelled_images(simulated=True))
    assert len(recs) == 40 and all(r.simulated and r.annotator == "sim-oracle" for r in recs)
    assert all(r.label == int(check(r.image, r.spec).correct) for r in recs)  # noise 0: the checker
    assert list(store.labelled_images(simulated=False)) == []
    for p in store.pairs():
        cw, cl = check(p.img_w, p.spec).correct, check(p.img_l, p.spec).correct
        assert (cw == cl) if p.tie else (cw and not cl)
    with pytest.raises(ValueError, match="another name"):
        simulate(store, SimulatedRater("oracle", noise=0.2))
    noisy = simulate(store, SimulatedRater("oracle", noise=0.2, seed=1), name="sim-noisy", pairs=False)
    assert noisy["labels"] == 40 and noisy["comparisons"] == 0
    # simulated labels take no human slot
    assert store.progress(None)["images"]["project"] == 0
    s = project_stats(store)
    ag = s["agreement"]["simulated"]["labels"]
    assert ag["method"] == "cohen" and ag["n_items"] == 40 and 0.2 < ag["kappa"] < 1.0
    rater = {a["name"]: a for a in s["annotators"]}
    assert rater["sim-oracle"]["checker_agree"] == 1.0
    assert rater["sim-noisy"]["checker_agree"] < 1.0
    rates = s["good_rate"]["simulated"]
    assert set(rates) <= {"single_object", "counting", "colors", "background", "combination", "two_object"}
    store.close()


def test_random_rater_is_near_zero_kappa(tmp_path):
    store = make_project(tmp_path / "p", n_prompts=16, per_prompt=4, k=2)
    simulate(store, SimulatedRater("oracle"), pairs=False)
    simulate(store, SimulatedRater("random", seed=3), pairs=False)
    ag = project_stats(store, with_checker=False)["agreement"]["simulated"]["labels"]
    assert abs(ag["kappa"]) < 0.35
    assert np.isfinite(ag["fleiss_kappa"])
    store.close()
