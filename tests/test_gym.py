"""The 2-D gym: the closed form of the KL-regularised optimum, the world and its rewards, the backend
against the protocol, and one learning test per method (success rises from the base's to >= 0.9)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from t2ialign.cli.gym import METHOD_NAMES, make_config, run_gym
from t2ialign.cli.main import main
from t2ialign.gym import (
    GymBackend,
    GymWorld,
    PretrainConfig,
    SmoothReward,
    SuccessReward,
    images_to_points,
    load_gym_backend,
    points_to_images,
    pretrain,
    q_star,
    score_backend,
    score_points,
)
from t2ialign.gym.feedback import preference_pairs, weighted_samples
from t2ialign.gym.measure import entropy, q_star_grpo, sample_points

# ---- the exact answer ----------------------------------------------------------------------------


def test_q_star_hand_computed():
    # q0 = 0.5, beta = 1: e / (e + 1)
    assert q_star(0.5, 1.0) == pytest.approx(math.e / (math.e + 1))
    # q0 = 0.6, beta = 0.5: 0.6 e^2 / (0.6 e^2 + 0.4)
    assert q_star(0.6, 0.5) == pytest.approx(0.6 * math.e**2 / (0.6 * math.e**2 + 0.4))
    assert q_star(0.3, 0.0) == 1.0  # no KL: all mass on the success region
    assert q_star(0.3, 1e-3) == pytest.approx(1.0)  # no overflow at small beta
    assert q_star(0.3, 1e6) == pytest.approx(0.3, abs=1e-6)  # infinite KL weight: the base
    assert q_star(0.0, 0.5) == 0.0
    qs = [q_star(0.4, b) for b in (0.1, 0.3, 1.0, 3.0)]
    assert qs == sorted(qs, reverse=True)
    with pytest.raises(ValueError, match="probability"):
        q_star(1.5, 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        q_star(0.5, -1.0)


def test_q_star_is_the_tilted_reference():
    """p* = p_ref exp(r / beta) / Z on a discrete p_ref: its success mass is q*, and the weights
    inside the success region (and outside) are p_ref's."""
    g = torch.Generator().manual_seed(0)
    p_ref = torch.rand(50, generator=g).double()
    p_ref /= p_ref.sum()
    r = (torch.arange(50) % 3 == 0).double()
    for beta in (0.2, 0.7, 2.0):
        p = p_ref * torch.exp(r / beta)
        p /= p.sum()
        q0 = float(p_ref[r == 1].sum())
        assert float(p[r == 1].sum()) == pytest.approx(q_star(q0, beta), rel=1e-12)
        inside = r == 1
        assert torch.allclose(p[inside] / p[inside].sum(), p_ref[inside] / p_ref[inside].sum())


def test_q_star_of_normalised_advantages():
    """Flow-GRPO's std-normalised advantages rescale the KL coefficient: with a large adv_eps the
    fixed point is q* at beta * adv_eps * G / (G - 1); with the published 1e-4 it lies far above q*."""
    q0, G = 0.56, 16
    for beta in (0.02, 0.05, 0.1):
        assert q_star_grpo(q0, beta, G, adv_eps=10.0) == pytest.approx(
            q_star(q0, beta * 10.25 * G / (G - 1)), abs=0.004
        )
    assert q_star_grpo(q0, 1.0, G) > q_star(q0, 1.0) + 0.15
    assert q_star(q0, 1.0) < q_star_grpo(q0, 1.0, G) < 1.0
    with pytest.raises(ValueError, match="group_size"):
        q_star_grpo(q0, 1.0, 1)


def test_entropy_and_scores():
    assert float(entropy(torch.tensor([0.5, 0.5]))) == pytest.approx(math.log(2))
    assert float(entropy(torch.tensor([1.0, 0.0]))) == 0.0
    world = GymWorld()
    pts, cls, _ = world.sample(20000, torch.Generator().manual_seed(0))
    sc = score_points(world, pts, cls)
    # the true distribution: P(|e| < 3.5 sigma) = 1 - exp(-3.5^2 / 2) in 2-D; its mode weights
    assert sc.success == pytest.approx(1 - math.exp(-(3.5**2) / 2), abs=0.003)
    assert torch.allclose(
        torch.tensor(sc.mode_weights), torch.tensor(world.mode_weights).expand(4, 3), atol=0.03
    )
    assert sc.mode_entropy == pytest.approx(float(entropy(torch.tensor(world.mode_weights))), abs=0.02)


# ---- the world -----------------------------------------------------------------------------------


def test_world_prompts_and_labels():
    world = GymWorld()
    assert world.parse("class 2") == 2 and world.parse("") == world.n_classes
    for bad in ("class 4", "class", "a dog", "class -1"):
        with pytest.raises(ValueError, match="not a gym prompt"):
            world.parse(bad)
    g = torch.Generator().manual_seed(1)
    _, cls, mode = world.sample(40000, g)
    assert torch.equal(world.mode_class()[mode], cls)
    labels = world.web_labels(cls, g)
    assert float((labels != cls).float().mean()) == pytest.approx(world.label_noise, abs=0.01)
    # a wrong label is uniform over the other classes
    wrong = labels[(labels != cls) & (cls == 0)]
    assert torch.bincount(wrong, minlength=4)[1:].float().div(len(wrong)).sub(1 / 3).abs().max() < 0.02
    with pytest.raises(ValueError, match="overlap"):
        GymWorld(radius=1.0)
    with pytest.raises(ValueError, match="sum to 1"):
        GymWorld(mode_weights=(0.5, 0.3, 0.3))


def test_rewards():
    world = GymWorld()
    centres, mc = world.centres(), world.mode_class()
    images = points_to_images(centres)
    assert images.shape == (12, 2, 1, 1) and images.min() > 0 and images.max() < 1
    assert torch.allclose(images_to_points(images), centres, atol=1e-5)
    right = [world.prompt(c) for c in mc.tolist()]
    wrong = [world.prompt((c + 1) % 4) for c in mc.tolist()]
    r, info = SuccessReward(world)(images, right)
    assert r.tolist() == [1.0] * 12 and info["success"] == 1.0
    assert SuccessReward(world)(images, wrong)[0].tolist() == [0.0] * 12
    # the smooth variant: differentiable in the images, high on the right class, low on the wrong one
    x = images.clone().requires_grad_(True)
    rs, _ = SmoothReward(world)(x, right)
    assert (rs > 0.75).all() and (SmoothReward(world)(images, wrong)[0] < 0.2).all()
    # off-centre points: the gradient points towards the nearest centre of the class
    off = (centres * 1.1).requires_grad_(True)
    SmoothReward(world)(points_to_images(off), right)[0].sum().backward()
    assert ((off.grad * (centres - off.detach())).sum(1) > 0).all()


# ---- the base model and the backend -----------------------------------------------------------------


@pytest.fixture(scope="module")
def base() -> GymBackend:
    """The pre-trained base (seconds on one thread), shared by the tests: copy it before training."""
    world = GymWorld()
    return GymBackend(pretrain(world, PretrainConfig()), world)


def test_base_is_misaligned_in_a_known_way(base):
    sc = score_backend(base, 1024)
    # web labels put label_noise = 0.4 of each prompt's data in other classes' modes: q0 near 0.6
    assert 0.45 < sc.success < 0.65
    # inside the right modes the base keeps the data's weights (0.5, 0.3, 0.2)
    assert torch.allclose(
        torch.tensor(sc.mode_weights), torch.tensor(base.world.mode_weights).expand(4, 3), atol=0.07
    )


def test_backend_protocol(base, tmp_path):
    b = copy.deepcopy(base)
    assert b.prediction == "flow" and b.latent_shape == (2, 1, 1) and b.device == torch.device("cpu")
    prompts = ["class 0", "class 3", "class 1"]
    cond = b.encode(prompts)
    assert len(cond) == 3 and cond.index(torch.tensor([2])).labels.tolist() == [1]
    assert cond.repeat_interleave(2).labels.tolist() == [0, 0, 3, 3, 1, 1]
    assert cond.index(slice(0, 2)).labels.tolist() == [0, 3]
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn((3, 2, 1, 1), generator=g), torch.randn((3, 2, 1, 1), generator=g)
    s = torch.tensor([0.2, 0.5, 0.9])
    x_s = b.add_noise(x0, eps, s)
    out = b.predict(x_s, s, cond)
    assert out.shape == (3, 2, 1, 1)
    assert torch.equal(out, b.predict(x_s, s, cond))  # deterministic
    assert torch.allclose(b.predict(x_s, s, cond, guidance=1.0), out)
    v_u = b.predict(x_s, s, b.encode([""] * 3))
    assert torch.allclose(b.predict(x_s, s, cond, guidance=3.0), v_u + 3.0 * (out - v_u), atol=1e-5)
    # the exact velocity recovers x0
    assert torch.allclose(b.predict_x0(b.target(x0, eps, s), x_s, s), x0, atol=1e-6)
    grid = b.timesteps(10)
    assert grid.shape == (11,) and grid[0] == 1 and grid[-1] == 0
    assert b.ode_step(out, grid[3], grid[4], x_s).shape == x_s.shape
    x_next, lp, mean, std = b.stochastic_step(out, grid[3], grid[4], x_s, noise=eps)
    assert x_next.shape == x_s.shape and lp.shape == (3,) and torch.isfinite(lp).all()
    _, lp2, _, _ = b.stochastic_step(out, grid[3], grid[4], x_s, x_next=x_next)
    assert torch.allclose(lp, lp2)
    images = b.decode(x0)
    assert images.shape == (3, 2, 1, 1) and images.min() >= 0 and images.max() <= 1
    assert torch.allclose(b.encode_images(images), x0, atol=1e-5)
    with pytest.raises(ValueError, match="not a gym prompt"):
        b.encode(["a red circle"])

    # LoRA: only adapters train, the output is unchanged at first, reference() turns them off
    b.enable_lora(4, 8.0)
    assert b.lora_enabled
    names = [n for n, p in b.denoiser().named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert torch.allclose(b.predict(x_s, s, cond), out)
    with torch.no_grad():
        for p in b.trainable_parameters():
            p.add_(0.1)
    moved = b.predict(x_s, s, cond)
    assert not torch.allclose(moved, out)
    with b.reference():
        assert torch.allclose(b.predict(x_s, s, cond), out)
    with pytest.raises(RuntimeError, match="already"):
        b.enable_lora(4, 8.0)
    # save merges the adapters; the loaded model predicts what the live one does
    b.save(tmp_path / "m", card={"method": "test"})
    loaded = load_gym_backend(tmp_path / "m")
    assert not loaded.lora_enabled
    assert torch.allclose(loaded.predict(x_s, s, loaded.encode(prompts)), moved, atol=1e-5)
    assert json.loads((tmp_path / "m" / "card.json").read_text())["method"] == "test"

    # full fine-tuning: the reference is a snapshot of the weights before training
    f = copy.deepcopy(base)
    f.snapshot_reference()
    f.denoiser().requires_grad_(True)
    state = f.state_dict_trainable()
    with torch.no_grad():
        for p in f.trainable_parameters():
            p.mul_(0.5)
    with f.reference():
        assert torch.allclose(f.predict(x_s, s, cond), out)
    f.load_state_dict_trainable(state)
    assert torch.allclose(f.predict(x_s, s, cond), out)


def test_offline_feedback(base):
    w = weighted_samples(base, 64)
    assert w.images.shape == (256, 2, 1, 1) and set(w.weights.tolist()) <= {0.0, 1.0}
    pairs = preference_pairs(base, 64)
    world = base.world
    cls = world.classes(pairs.prompts)
    assert world.success(images_to_points(pairs.winners), cls).all()
    assert not world.success(images_to_points(pairs.losers), cls).any()
    # sampling is seeded: the same noise gives the same points
    c = torch.arange(4)
    assert torch.equal(sample_points(base, c, seed=3), sample_points(base, c, seed=3))


# ---- the CLI's pieces ------------------------------------------------------------------------------


def test_config_overrides_and_errors(base):
    from t2ialign.cli.gym import _methods

    cfg = make_config(_methods()["grpo"], ["beta=0.5", "group_size=8"], iterations=7, budget=None)
    assert (cfg.beta, cfg.group_size, cfg.iterations, cfg.guidance) == (0.5, 8, 7, 1.0)
    with pytest.raises(ValueError, match="no such field.*group_size"):
        make_config(_methods()["grpo"], ["bogus=1"], None, None)
    with pytest.raises(ValueError, match="unknown gym method"):
        run_gym("ppo", copy.deepcopy(base))


def test_cli_writes_the_summary(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["gym", "--method", "raft", "--pretrain-steps", "300", "--set", "rounds=2", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    for key in ("base_success", "final_success", "target_success", "seconds", "base_mode_entropy"):
        assert key in res
    assert res["target_success"] == 1.0 and res["steps"] == 2
    assert "cpu_s" in capsys.readouterr().out
    assert main(["gym", "--method", "grpo", "--set", "nope=1", "--pretrain-steps", "10"]) == 2
    assert "no such field" in capsys.readouterr().err


# ---- learning: every method, from the base's success to >= 0.9 -----------------------------------

# iterations (the config's count field) that take a few CPU seconds each at the gym's settings
ITERATIONS = {
    "rwr": 1000,
    "nft-labelled": 500,
    "ddpo": 170,
    "grpo": 150,
    "mixgrpo": 250,
    "nft": 500,
    "raft": 80,
    "refl": 300,
    "draft": 300,
    "dpo": 500,
}


def test_every_method_has_a_learning_test():
    assert set(ITERATIONS) == set(METHOD_NAMES)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_learns(method, base):
    res = run_gym(method, copy.deepcopy(base), iterations=ITERATIONS[method], final_per_class=512)
    assert res["base_success"] < 0.7
    assert res["final_success"] >= 0.9, (method, res["final_success"], res["curve"][-3:])
