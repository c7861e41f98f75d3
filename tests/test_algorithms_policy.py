"""Policy-gradient trainers: Flow-GRPO, MixGRPO and DDPO (losses, DDIM math, smoke runs and resume)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from t2ialign.algorithms.common import read_log, rollout, seeded, step_log_prob
from t2ialign.algorithms.ddpo import DDPOConfig, PerPromptStatTracker, reinforce_loss, train_ddpo
from t2ialign.algorithms.grpo import (
    GRPOConfig,
    group_advantages,
    kl_penalty,
    ppo_clip_loss,
    scalar_info,
    train_grpo,
)
from t2ialign.algorithms.mixgrpo import MixGRPOConfig, train_mixgrpo, window_start
from t2ialign.backends import ShapesBackend
from t2ialign.models import build_generator, load_generator
from t2ialign.sampling.ddim import ddim_deterministic_step, ddim_sigma, ddim_step, x0_from_eps

ROWS = [{"prompt": "a red circle", "task": "colors"}, {"prompt": "two blue squares", "task": "counting"}]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model is fastest on one thread, and the test machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- losses --------------------------------------------------------------------------------------


def test_ppo_clip_loss_hand_computed_both_signs():
    clip = 0.2
    old = torch.zeros(1)
    up, down = torch.log(torch.tensor([1.5])), torch.log(torch.tensor([0.5]))
    pos, neg = torch.ones(1), -torch.ones(1)
    # r = 1.5: A > 0 takes the clipped -1.2 (no credit beyond 1 + eps); A < 0 the unclipped 1.5
    assert ppo_clip_loss(up, old, pos, clip).item() == pytest.approx(-1.2)
    assert ppo_clip_loss(up, old, neg, clip).item() == pytest.approx(1.5)
    # r = 0.5: A > 0 takes the unclipped -0.5; A < 0 the clipped 0.8
    assert ppo_clip_loss(down, old, pos, clip).item() == pytest.approx(-0.5)
    assert ppo_clip_loss(down, old, neg, clip).item() == pytest.approx(0.8)
    # the mean over a batch of the four cases
    lp = torch.cat([up, up, down, down])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert ppo_clip_loss(lp, torch.zeros(4), adv, clip).item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4)
    # gradients: zero where the clipped branch is taken, -A r / N elsewhere
    lp = lp.clone().requires_grad_(True)
    ppo_clip_loss(lp, torch.zeros(4), adv, clip).backward()
    assert lp.grad.tolist() == pytest.approx([0.0, 1.5 / 4, -0.5 / 4, 0.0])
    # at r = 1 the loss is -mean(A) and its gradient is the policy gradient -A / N
    lp1 = torch.zeros(2, requires_grad=True)
    a = torch.tensor([2.0, -0.5])
    loss = ppo_clip_loss(lp1, torch.zeros(2), a, 1e-4)
    loss.backward()
    assert loss.item() == pytest.approx(-0.75)
    assert lp1.grad.tolist() == pytest.approx([-1.0, 0.25])


def test_reinforce_loss():
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    adv = torch.tensor([1.0, -3.0])
    loss = reinforce_loss(lp, adv)
    loss.backward()
    assert loss.item() == pytest.approx(-(1.0 * -1.0 + -3.0 * -2.0) / 2)
    assert lp.grad.tolist() == pytest.approx([-0.5, 1.5])


def test_kl_penalty_closed_form():
    g = torch.Generator().manual_seed(0)
    mp, mq = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    std = torch.tensor(0.3)
    want = torch.distributions.kl_divergence(
        torch.distributions.Normal(mp, std), torch.distributions.Normal(mq, std)
    )
    assert kl_penalty(mp, mq, std).item() == pytest.approx(want.mean().item(), rel=1e-5)
    assert kl_penalty(mp, mq, std).item() == pytest.approx(
        ((mp - mq) ** 2 / (2 * 0.09)).mean().item(), rel=1e-5
    )
    assert kl_penalty(mp, mp, std).item() == 0.0


def test_group_advantages():
    g = torch.Generator().manual_seed(1)
    r = torch.cat([torch.rand(4, generator=g), torch.full((4,), 0.7), torch.tensor([0.0, 1.0, 1.0, 1.0])])
    a = group_advantages(r, 4)
    assert torch.isfinite(a).all()
    for grp in a.reshape(3, 4):
        assert grp.mean().abs().item() < 1e-6
    assert a[4:8].tolist() == [0.0, 0.0, 0.0, 0.0]  # equal rewards: 0, not NaN
    # hand-computed: (0, 1, 1, 1) has mean 0.75 and population std sqrt(3)/4
    s = math.sqrt(3) / 4
    assert a[8:].tolist() == pytest.approx([-0.75 / (s + 1e-4)] + [0.25 / (s + 1e-4)] * 3)
    assert group_advantages(r, 4, eps=0.0)[:4].std(unbiased=False).item() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="groups"):
        group_advantages(torch.zeros(6), 4)


def test_per_prompt_stat_tracker():
    t = PerPromptStatTracker(buffer_size=4, min_count=3)
    # below min_count: the batch's statistics (mean 2, population std sqrt(2/3))
    a = t.update(["x", "x", "y"], torch.tensor([1.0, 2.0, 3.0]))
    s = math.sqrt(2 / 3)
    assert a.tolist() == pytest.approx([-1 / (s + 1e-6), 0.0, 1 / (s + 1e-6)], rel=1e-5)
    # "x" now has 3 rewards (1, 2, 5): its own statistics; "y" still has too few
    a = t.update(["x", "y"], torch.tensor([5.0, 0.0]))
    bx = torch.tensor([1.0, 2.0, 5.0])
    assert a[0].item() == pytest.approx(((5 - bx.mean()) / (bx.std(unbiased=False) + 1e-6)).item(), rel=1e-5)
    assert a[1].item() == pytest.approx(-1.0, rel=1e-5)  # batch (5, 0): mean 2.5, std 2.5
    t.update(["x", "x"], torch.tensor([7.0, 9.0]))
    assert list(t.stats["x"]) == [2.0, 5.0, 7.0, 9.0]  # the buffer keeps the last 4
    t2 = PerPromptStatTracker(buffer_size=4, min_count=3)
    t2.load_state_dict(json.loads(json.dumps(t.state_dict())))
    assert t2.update(["x"], torch.tensor([1.0])).tolist() == t.update(["x"], torch.tensor([1.0])).tolist()


def test_window_start_slides_and_rolls_back():
    seq = [window_start(it, steps=6, window_size=3, shift_every=2) for it in range(12)]
    assert seq == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 1, 1]
    assert [window_start(it, 6, 3, 1, stride=2) for it in range(4)] == [0, 2, 0, 2]
    assert [window_start(it, 6, 3, 1, roll_back=False) for it in range(6)] == [0, 1, 2, 3, 3, 3]


def test_scalar_info_keeps_numbers_only():
    info = {
        "n": 3,
        "acc": torch.tensor([1.0, 0.0]),
        "ok": [True],
        "why": "text",
        "hit": torch.tensor([True, True]),
    }
    assert scalar_info(info) == {"reward_n": 3.0, "reward_acc": 0.5, "reward_hit": 1.0}


def test_config_validation():
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="timestep_fraction"):
        GRPOConfig(timestep_fraction=0.0)
    with pytest.raises(ValueError, match="window_size"):
        MixGRPOConfig(train_steps=4, window_size=5)
    with pytest.raises(ValueError, match="variant"):
        DDPOConfig(variant="ppo")
    with pytest.raises(ValueError, match="on-policy"):
        DDPOConfig(variant="sf", inner_epochs=2)
    with pytest.raises(ValueError, match="min_count"):
        DDPOConfig(buffer_size=8, min_count=16)
    assert MixGRPOConfig().beta == 0.0 and GRPOConfig().beta == 0.04


# ---- DDIM ----------------------------------------------------------------------------------------


def _ddim_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    eps, x = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    return eps, x, torch.randn(2, 3, 4, 4, generator=g)


def test_ddim_eta1_log_prob_against_normal():
    eps, x, noise = _ddim_case()
    ab_t, ab_prev = 0.3, 0.6
    x_prev, lp, mean, std = ddim_step(eps, ab_t, ab_prev, x, eta=1.0, noise=noise)
    # the formulas, written out
    x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
    sigma = math.sqrt((1 - ab_prev) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_prev)
    assert torch.allclose(mean, math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sigma**2) * eps, atol=1e-6)
    assert float(std) == pytest.approx(sigma)
    # eta = 1 is the DDPM posterior: sigma^2 = (1 - ab_prev) / (1 - ab_t) * beta_t, beta_t = 1 - ab_t/ab_prev
    assert float(ddim_sigma(ab_t, ab_prev, 1.0)) ** 2 == pytest.approx(
        (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
    )
    assert torch.allclose(x_prev, mean + sigma * noise, atol=1e-6)
    want = torch.distributions.Normal(mean, torch.tensor(sigma)).log_prob(x_prev).flatten(1).mean(1)
    assert torch.allclose(lp, want, atol=1e-5)
    # re-evaluating the stored x_prev gives the same log-probability; per-sample alphas broadcast
    _, lp2, _, _ = ddim_step(
        eps, torch.tensor([ab_t, ab_t]), torch.tensor([ab_prev, ab_prev]), x, 1.0, x_prev=x_prev
    )
    assert torch.allclose(lp2, lp, atol=1e-5)


def test_ddim_eta0_is_deterministic_ddim():
    eps, x, noise = _ddim_case(1)
    ab_t, ab_prev = 0.2, 0.7
    x_prev, lp, mean, std = ddim_step(eps, ab_t, ab_prev, x, eta=0.0, noise=noise)
    det = ddim_deterministic_step(eps, ab_t, ab_prev, x)
    assert torch.allclose(x_prev, det, atol=1e-6) and torch.allclose(mean, det, atol=1e-6)
    assert float(std) == 0.0 and lp.tolist() == [0.0, 0.0]
    x0 = x0_from_eps(eps, x, ab_t)
    assert torch.allclose(det, math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps, atol=1e-6)
    # the last step to ab_prev = 1 returns x0_hat with any eta, and a zero log-prob
    x_last, lp_last, _, _ = ddim_step(eps, ab_t, 1.0, x, eta=1.0, noise=noise)
    assert torch.allclose(x_last, x0, atol=1e-5) and lp_last.tolist() == [0.0, 0.0]


def test_ddim_step_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    sch.set_timesteps(10)
    t = int(sch.timesteps[3])
    prev_t = t - sch.config.num_train_timesteps // sch.num_inference_steps
    ab_t, ab_prev = sch.alphas_cumprod[t], sch.alphas_cumprod[prev_t]
    eps, x, noise = _ddim_case(2)
    for eta in (0.0, 1.0):
        want = sch.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        got, _, _, _ = ddim_step(eps, ab_t, ab_prev, x, eta=eta, noise=noise)
        assert torch.allclose(got, want, atol=1e-4), eta


# ---- rollouts ------------------------------------------------------------------------------------


def _tiny_backend(seed: int = 0) -> ShapesBackend:
    g = build_generator("tiny", seed=seed)
    torch.manual_seed(seed)
    with torch.no_grad():  # zero-initialised convs (output, residual) would block the gradients
        for p in g.unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return ShapesBackend(g)


def _red(images, prompts, metadata):
    assert len(metadata) == len(prompts) and all("prompt" in m for m in metadata)
    return images[:, 0].mean((1, 2)), {"n": len(prompts)}


def test_recomputed_log_probs_match_the_rollout():
    """At the start of an update the PPO ratio is 1: a step re-evaluated on a minibatch gives the
    log-probability the rollout recorded."""
    b = _tiny_backend()
    cond = b.encode([r["prompt"] for r in ROWS] * 2)
    g = seeded(0, 0)
    x1 = torch.randn(4, *b.latent_shape, generator=g)
    traj = rollout(b, cond, x1, 3, guidance=2.0, generator=g)
    idx = torch.tensor([3, 0])
    with torch.no_grad():
        for k in range(3):
            lp, _, _ = step_log_prob(b, traj, k, cond.index(idx), 2.0, idx)
            assert torch.allclose(lp, traj.log_probs[k, idx], atol=1e-5)


# ---- smoke runs and resume -----------------------------------------------------------------------


class Crash(RuntimeError):
    pass


def _crash_after(n: int):
    calls = [0]

    def fn(images, prompts, metadata):
        calls[0] += 1
        if calls[0] > n:
            raise Crash("interrupted")
        return _red(images, prompts, metadata)

    return fn


TINY = dict(iterations=2, train_steps=3, lr=1e-3, checkpoint_every=1, guidance=2.0, lora_rank=0)
CASES = {
    "grpo": (
        train_grpo,
        GRPOConfig(prompts_per_iter=2, group_size=2, minibatch_size=3, inner_epochs=2, **TINY),
    ),
    "grpo-lora": (
        train_grpo,
        GRPOConfig(prompts_per_iter=2, group_size=2, minibatch_size=4, **{**TINY, "lora_rank": 2}),
    ),
    "mixgrpo": (
        train_mixgrpo,
        MixGRPOConfig(
            prompts_per_iter=2,
            group_size=2,
            minibatch_size=4,
            beta=0.1,
            window_size=2,
            window_shift_every=1,
            **{**TINY, "lora_rank": 2},
        ),
    ),
    "ddpo-is": (train_ddpo, DDPOConfig(batch_size=4, minibatch_size=2, buffer_size=4, min_count=2, **TINY)),
    "ddpo-sf": (
        train_ddpo,
        DDPOConfig(batch_size=4, minibatch_size=4, variant="sf", timestep_fraction=0.5, **TINY),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_smoke_and_resume(case, tmp_path):
    train, cfg = CASES[case]
    before = {k: v.clone() for k, v in _tiny_backend().gen.unet.state_dict().items()}

    full = _tiny_backend()
    rows = train(full, _red, ROWS, cfg, tmp_path / "full", progress=False)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(math.isfinite(v) for v in r.values()), r
        assert {"reward_mean", "reward_std", "loss", "clip_frac", "approx_kl"} <= set(r)
    assert ("kl" in rows[0]) == (getattr(cfg, "beta", 0.0) > 0)
    trained = full.state_dict_trainable()
    after = full.merged_generator().unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"

    # interrupted after the first iteration's checkpoint, then resumed on a fresh base model
    with pytest.raises(Crash):
        train(_tiny_backend(), _crash_after(1), ROWS, cfg, tmp_path / "resumed", progress=False)
    resumed = _tiny_backend()
    rows2 = train(resumed, _red, ROWS, cfg, tmp_path / "resumed", progress=False)
    assert [r["step"] for r in rows2] == [2]
    for k, v in resumed.state_dict_trainable().items():
        assert torch.equal(v, trained[k]), k
    log_full, log_resumed = read_log(tmp_path / "full"), read_log(tmp_path / "resumed")
    assert [r["step"] for r in log_resumed] == [1, 2]
    assert [r["reward_mean"] for r in log_resumed] == [r["reward_mean"] for r in log_full]

    # the final model is a generator folder that the loaders read, with the method on its card
    card = json.loads((tmp_path / "full" / "card.json").read_text())
    method = case.split("-")[0]
    assert card["method"] == method and card[f"{method}_config"]["iterations"] == 2
    reloaded = load_generator(tmp_path / "full")
    for k, v in reloaded.unet.state_dict().items():
        assert torch.equal(v, after[k]), k


def test_grpo_refuses_another_methods_run(tmp_path):
    train_ddpo(
        _tiny_backend(),
        _red,
        ROWS,
        DDPOConfig(batch_size=2, minibatch_size=2, iterations=1, train_steps=2),
        tmp_path,
        progress=False,
    )
    with pytest.raises(ValueError, match="ddpo"):
        train_grpo(
            _tiny_backend(),
            _red,
            ROWS,
            GRPOConfig(iterations=2, group_size=2, train_steps=2),
            tmp_path,
            progress=False,
        )


def test_a_non_finite_reward_is_a_clear_error(tmp_path):
    def half_nan(images, prompts, metadata):
        r = images[:, 0].mean((1, 2))
        r[0] = float("nan")
        return r, {}

    with pytest.raises(ValueError, match="non-finite rewards for 1 images, e.g. 'two blue squares'"):
        train_grpo(
            _tiny_backend(),
            half_nan,
            ROWS,
            GRPOConfig(iterations=1, group_size=2, train_steps=2),
            tmp_path,
            progress=False,
        )


class EpsilonBackend(ShapesBackend):
    """The tiny UNet read as an epsilon-prediction model on a DDPM schedule (1000 steps, linear
    betas): the stochastic step is DDIM with eta = 1, as a diffusers SD backend's."""

    prediction = "epsilon"

    def __init__(self, generator):
        super().__init__(generator)
        self.alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)

    def _ab(self, s) -> float:
        s = float(s)
        return 1.0 if s <= 0 else float(self.alpha_bar[round(s * 999)])

    def ode_step(self, out, s, s_next, x):
        return ddim_deterministic_step(out, self._ab(s), self._ab(s_next), x)

    def stochastic_step(self, out, s, s_next, x, noise=None, x_next=None):
        return ddim_step(out, self._ab(s), self._ab(s_next), x, 1.0, noise=noise, x_prev=x_next)


def test_ddpo_on_an_epsilon_backend(tmp_path):
    base = _tiny_backend()
    b = EpsilonBackend(base.gen)
    before = [p.detach().clone() for p in b.gen.unet.parameters()]
    cfg = DDPOConfig(
        batch_size=4, minibatch_size=2, iterations=2, train_steps=3, lr=1e-3, guidance=1.0, lora_rank=0
    )
    rows = train_ddpo(b, _red, ROWS, cfg, tmp_path, progress=False)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert any(not torch.equal(p0, p) for p0, p in zip(before, b.gen.unet.parameters(), strict=True))
