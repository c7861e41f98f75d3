"""DiffusionNFT, RAFT, ReFL / DRaFT and Diffusion-DPO: losses against closed forms, 2-iteration smoke runs
on the tiny preset, and a resume check (CPU, seeded)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model_helpers import record_prompts
from t2ialign.algorithms.dpo import DPOConfig, PairSamples, dpo_loss, train_dpo
from t2ialign.algorithms.nft import NFTConfig, ema_decay, nft_loss, nft_optimality, train_nft
from t2ialign.algorithms.raft import RAFTConfig, raft_select, train_raft
from t2ialign.algorithms.refl import (
    DRaFTConfig,
    ReFLConfig,
    draft_images,
    refl_images,
    refl_phi,
    train_draft,
    train_refl,
)
from t2ialign.backends import ShapesBackend
from t2ialign.models import build_generator
from t2ialign.models.pretrain import world_batch

PROMPTS = [{"prompt": p} for p in ("a red circle", "two blue squares", "a green triangle")]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model is far faster on one thread, and CI machines are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_backend(seed: int = 0) -> ShapesBackend:
    """The tiny preset with its zero-initialised output convolution perturbed (otherwise every
    parameter upstream of it, LoRA adapters included, gets a zero gradient at init)."""
    gen = build_generator("tiny", seed=seed)
    with torch.no_grad():
        gen.unet.conv_out.weight.copy_(
            torch.randn(gen.unet.conv_out.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.1
        )
    return ShapesBackend(gen)


def red_reward(images, prompts, metadata):
    """A differentiable toy reward: the mean of the red channel."""
    assert len(metadata) == len(prompts) == images.shape[0]
    return images[:, 0].mean((1, 2)), {"n": len(prompts)}


def pretrain_source(step, batch_size):
    images, prompts, _ = world_batch(0, step, batch_size)
    return images, prompts


def snapshot(backend) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backend.gen.unet.state_dict().items()}


def max_change(backend, before) -> float:
    """The largest weight change of the denoiser (LoRA adapters merged)."""
    after = backend.merged_generator().unet.state_dict()
    return max((after[k] - v).abs().max().item() for k, v in before.items())


# ---- DiffusionNFT -----------------------------------------------------------------------------


def _nft_case(seed=0, shape=(4, 3, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    v_theta, v_old, v = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    r = torch.rand(shape[0], generator=g, dtype=torch.float64)
    return v_theta, v_old, v, r


def test_nft_loss_closed_form():
    """With a = v_old - v and d = v_theta - v_old:
    L = ||a||^2 + 2 beta (2r - 1) <a, d> + beta^2 ||d||^2 (all means over dimensions)."""
    v_theta, v_old, v, r = _nft_case()
    a, d = v_old - v, v_theta - v_old
    for beta in (0.1, 0.5, 1.0, 2.0):
        want = (
            a.pow(2).flatten(1).mean(1)
            + 2 * beta * (2 * r - 1) * (a * d).flatten(1).mean(1)
            + beta**2 * d.pow(2).flatten(1).mean(1)
        )
        torch.testing.assert_close(nft_loss(v_theta, v_old, v, r, beta), want)


def test_nft_loss_beta_to_zero():
    """beta -> 0: L -> r ||v_old - v||^2 + (1 - r) ||v_old - v||^2 = ||v_old - v||^2, with no gradient
    to v_theta; the first-order term is 2 beta (2r - 1) <v_old - v, v_theta - v_old>."""
    v_theta, v_old, v, r = _nft_case(1)
    v_theta.requires_grad_(True)
    at_zero = nft_loss(v_theta, v_old, v, r, 0.0)
    torch.testing.assert_close(at_zero, (v_old - v).pow(2).flatten(1).mean(1))
    at_zero.sum().backward()
    assert v_theta.grad.abs().max() == 0
    first_order = 2 * (2 * r - 1) * ((v_old - v) * (v_theta.detach() - v_old)).flatten(1).mean(1)
    for beta in (1e-3, 1e-5):
        slope = (nft_loss(v_theta.detach(), v_old, v, r, beta) - at_zero.detach()) / beta
        torch.testing.assert_close(slope, first_order, atol=10 * beta, rtol=0)


def test_nft_loss_gradient_is_advantage_weighted_flow_matching():
    """At v_theta = v_old, d(L / beta)/dv_theta = 2 (2r - 1) (v_old - v) / D for any beta: good samples
    (r > 1/2) pull v_theta towards v, bad ones push it away."""
    _, v_old, v, r = _nft_case(2)
    D = v[0].numel()
    for beta in (0.01, 1.0):
        v_theta = v_old.clone().requires_grad_(True)
        (nft_loss(v_theta, v_old, v, r, beta).sum() / beta).backward()
        want = 2 * (2 * r - 1).reshape(-1, 1, 1, 1) * (v_old - v) / D
        torch.testing.assert_close(v_theta.grad, want)


def test_nft_loss_endpoints():
    """beta = 1: r = 1 is the plain flow-matching loss of v_theta, r = 0 that of 2 v_old - v_theta."""
    v_theta, v_old, v, _ = _nft_case(3)
    ones, zeros = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    torch.testing.assert_close(
        nft_loss(v_theta, v_old, v, ones, 1.0), (v_theta - v).pow(2).flatten(1).mean(1)
    )
    torch.testing.assert_close(
        nft_loss(v_theta, v_old, v, zeros, 1.0), (2 * v_old - v_theta - v).pow(2).flatten(1).mean(1)
    )


def test_nft_loss_x0_adaptive_matches_the_x0_space_form():
    """The reference code's form: x0_hat = x_s - s v_hat,
    loss = mean((x0_hat - x0)^2) / sg(mean|x0_hat - x0|)."""
    g = torch.Generator().manual_seed(4)
    x0, eps, v_theta, v_old = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(4))
    s = torch.rand(3, generator=g, dtype=torch.float64)
    r = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    sb = s.reshape(-1, 1, 1, 1)
    x_s, v = (1 - sb) * x0 + sb * eps, eps - x0
    beta = 0.7

    def part(v_hat):
        err = (x_s - sb * v_hat - x0).flatten(1)
        return (err.pow(2) / err.abs().mean(1, keepdim=True)).mean(1)

    want = r * part((1 - beta) * v_old + beta * v_theta) + (1 - r) * part((1 + beta) * v_old - beta * v_theta)
    torch.testing.assert_close(nft_loss(v_theta, v_old, v, r, beta, s=s, weighting="x0_adaptive"), want)
    with pytest.raises(ValueError, match="needs the noise levels"):
        nft_loss(v_theta, v_old, v, r, beta, weighting="x0_adaptive")


def test_nft_optimality_hand_case():
    # group 1: [1, 0, 0, 0]: mean 1/4, std sqrt(3)/4; group 2: all equal
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3, 0.3])
    r, adv = nft_optimality(rewards, 4, adv_clip=5.0)
    std = math.sqrt(3) / 4
    want_adv = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4)
    torch.testing.assert_close(adv[:4], want_adv)
    torch.testing.assert_close(r[:4], 0.5 + 0.5 * want_adv / 5)
    assert torch.equal(r[4:], torch.full((4,), 0.5)) and torch.equal(adv[4:], torch.zeros(4))
    assert abs(float(adv[:4].sum())) < 1e-5  # zero mean within a group
    r, adv = nft_optimality(rewards, 4, adv_clip=1.0)  # clipping: r in [0, 1]
    assert r[0] == 1.0 and adv[0] == 1.0 and 0 <= float(r.min())


def test_nft_optimality_global_std_and_errors():
    rewards = torch.tensor([1.0, 0.0, 2.0, 2.0])
    _, adv = nft_optimality(rewards, 2, adv_clip=10.0, normaliser="global_std")
    std = rewards.std(correction=0)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.0, 0.0]) / (std + 1e-4))
    with pytest.raises(ValueError, match="groups"):
        nft_optimality(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="normaliser"):
        nft_optimality(torch.zeros(4), 2, normaliser="max")


def test_ema_decay_ramp():
    assert ema_decay(0, 0.01, 0.5) == 0.0
    assert ema_decay(10, 0.01, 0.5) == pytest.approx(0.1)
    assert ema_decay(1000, 0.01, 0.5) == 0.5


def test_nft_config_validation():
    with pytest.raises(ValueError, match="group_size"):
        NFTConfig(group_size=1)
    with pytest.raises(ValueError, match="beta"):
        NFTConfig(beta=0.0)
    with pytest.raises(ValueError, match="sampler"):
        NFTConfig(sampler="dpm")


# ---- RAFT ----------------------------------------------------------------------------------------


def test_raft_select():
    rewards = torch.tensor([0.1, 0.9, 0.9, 0.0, 0.0, 0.0, 0.2, 0.5, 0.4])
    assert raft_select(rewards, 3).tolist() == [1, 3, 7]  # ties: the first
    assert raft_select(rewards, 3, min_reward=0.5).tolist() == [1, 7]
    assert raft_select(rewards, 3, min_reward=1.0).tolist() == []


# ---- ReFL / DRaFT --------------------------------------------------------------------------------


def test_refl_phi():
    R = torch.tensor([0.5, 1.9, 2.0, 3.0], requires_grad=True)
    loss = refl_phi(R, "relu", margin=2.0)
    torch.testing.assert_close(loss, torch.tensor([1.5, 0.1, 0.0, 0.0]), atol=1e-6, rtol=0)
    loss.sum().backward()
    torch.testing.assert_close(R.grad, torch.tensor([-1.0, -1.0, 0.0, 0.0]))
    torch.testing.assert_close(refl_phi(R.detach(), "neg"), -R.detach())
    with pytest.raises(ValueError):
        refl_phi(R, "exp")


class _Recorder:
    """Wraps a backend and records whether each network call had gradient enabled."""

    def __init__(self, backend):
        self.b, self.calls = backend, []

    def predict(self, *a, **k):
        self.calls.append(torch.is_grad_enabled())
        return self.b.predict(*a, **k)

    def __getattr__(self, name):
        return getattr(self.b, name)


@pytest.mark.parametrize("k", [1, 3])
def test_draft_gradient_only_through_last_k_steps(k):
    rec = _Recorder(tiny_backend())
    cond = rec.encode(["a red circle"] * 2)
    x1 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images = draft_images(rec, cond, x1, rec.timesteps(5), k, guidance=1.0)
    assert rec.calls == [False] * (5 - k) + [True] * k and images.requires_grad
    rec.calls.clear()
    images = refl_images(rec, cond, x1, rec.timesteps(5), 3, guidance=1.0)
    assert rec.calls == [False] * 3 + [True] and images.requires_grad


def test_refl_step_at_last_grid_point_equals_euler_step():
    """x0_hat from the last grid point is exactly the final Euler step of the chain."""
    b = tiny_backend()
    cond = b.encode(["a red circle"] * 2)
    x1 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    grid = b.timesteps(4)
    with torch.no_grad():
        torch.testing.assert_close(
            refl_images(b, cond, x1, grid, 3, 1.0), draft_images(b, cond, x1, grid, 1, 1.0)
        )


def test_refl_needs_a_differentiable_reward(tmp_path):
    def no_grad_reward(images, prompts, metadata):
        return images.detach()[:, 0].mean((1, 2)), {}

    cfg = ReFLConfig(iterations=1, batch_size=2, sample_steps=3, late_steps=2, pretrain_weight=0.0)
    with pytest.raises(ValueError, match="differentiable"):
        train_refl(tiny_backend(), no_grad_reward, PROMPTS, cfg, tmp_path, progress=False)
    with pytest.raises(ValueError, match="pretrain_source"):
        train_refl(
            tiny_backend(), red_reward, PROMPTS, ReFLConfig(iterations=1), tmp_path / "b", progress=False
        )
    with pytest.raises(ValueError, match="lv_samples"):
        DRaFTConfig(k=2, lv_samples=2)


# ---- Diffusion-DPO -------------------------------------------------------------------------------


def test_dpo_loss_at_zero_is_log2():
    e = torch.rand(5)
    torch.testing.assert_close(dpo_loss(e, e, e, e, 5000.0), torch.full((5,), math.log(2)))
    a, b = torch.rand(5), torch.rand(5)  # model = reference: d = 0 whatever the errors
    torch.testing.assert_close(dpo_loss(a, b, a, b, 123.0), torch.full((5,), math.log(2)))


def test_dpo_loss_hand_case():
    err_w = torch.tensor([0.1], requires_grad=True)
    # d = (0.1 - 0.2) - (0.3 - 0.3) = -0.1; -log sigmoid(-10/2 * -0.1) = log(1 + exp(-0.5))
    loss = dpo_loss(err_w, torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([0.3]), beta=10.0)
    torch.testing.assert_close(loss, torch.tensor([math.log1p(math.exp(-0.5))]))
    loss.backward()  # lowering the winner's error lowers the loss: dL/derr_w = beta/2 * sigmoid(-0.5)
    torch.testing.assert_close(err_w.grad, torch.tensor([5.0 / (1 + math.exp(0.5))]))


def test_pair_samples_validation():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="prompts"):
        PairSamples(x, x, ["a"])
    with pytest.raises(ValueError, match="same shape"):
        PairSamples(x, x[:1], ["a", "b"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PairSamples(x * 2, x, ["a", "b"])


# ---- smoke runs: 2 iterations each, loss finite, parameters changed, model saved --------------


def _check_run(backend, before, rows, out, method, n=2):
    assert len(rows) == n and [r["step"] for r in rows] == list(range(1, n + 1))
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert max_change(backend, before) > 0
    card = json.loads((out / "card.json").read_text())
    assert card["method"] == method and (out / "model.safetensors").exists()
    assert len((out / "log.jsonl").read_text().splitlines()) == n


def test_nft_smoke_full_and_lora(tmp_path):
    cfg = NFTConfig(
        iterations=2, prompts_per_iter=2, group_size=3, sample_steps=3, train_batch_size=4, kl_weight=0.1
    )
    b = tiny_backend()
    before = snapshot(b)
    rows = train_nft(b, red_reward, PROMPTS, cfg, tmp_path / "full", progress=False)
    _check_run(b, before, rows, tmp_path / "full", "nft")
    assert rows[0]["reward/n"] == 6 and 0 <= rows[0]["r_mean"] <= 1
    b = tiny_backend()
    before = snapshot(b)
    cfg = NFTConfig(
        iterations=2,
        prompts_per_iter=2,
        group_size=2,
        sample_steps=2,
        sampler="sde",
        guidance=2.0,
        lora_rank=2,
        lr=1e-2,
        pretrain_weight=0.5,
        pretrain_batch_size=2,
    )
    rows = train_nft(
        b, red_reward, PROMPTS, cfg, tmp_path / "lora", progress=False, pretrain_source=pretrain_source
    )
    assert all(math.isfinite(r["loss"]) and r["pre_loss"] > 0 for r in rows)
    assert max_change(b, before) > 0  # the LoRA adapters moved


def test_raft_smoke(tmp_path):
    b = tiny_backend()
    before = snapshot(b)
    cfg = RAFTConfig(
        rounds=2,
        prompts_per_round=2,
        samples_per_prompt=3,
        sample_steps=3,
        guidance=1.0,
        steps_per_round=2,
        batch_size=2,
    )
    rows = train_raft(b, red_reward, PROMPTS, cfg, tmp_path, progress=False)
    _check_run(b, before, rows, tmp_path, "raft")
    assert all(r["kept"] == 2 and r["kept_reward_mean"] >= r["reward_mean"] for r in rows)


def test_refl_smoke(tmp_path):
    b = tiny_backend()
    before = snapshot(b)
    cfg = ReFLConfig(
        iterations=2, batch_size=2, sample_steps=4, late_steps=2, guidance=1.0, pretrain_batch_size=2, lr=1e-3
    )
    rows = train_refl(b, red_reward, PROMPTS, cfg, tmp_path, progress=False, pretrain_source=pretrain_source)
    _check_run(b, before, rows, tmp_path, "refl")
    assert all(r["stop_step"] in (2.0, 3.0) and r["pre_loss"] > 0 and r["grad_norm"] > 0 for r in rows)


@pytest.mark.parametrize("k,lv", [(2, 0), (1, 2)])
def test_draft_smoke(tmp_path, k, lv):
    b = tiny_backend()
    before = snapshot(b)
    cfg = DRaFTConfig(
        iterations=2,
        batch_size=2,
        sample_steps=3,
        k=k,
        lv_samples=lv,
        guidance=1.0,
        pretrain_weight=0.0,
        lr=1e-3,
    )
    rows = train_draft(b, red_reward, PROMPTS, cfg, tmp_path, progress=False)
    _check_run(b, before, rows, tmp_path, "draft")
    assert rows[0]["reward/n"] == 2 * max(lv, 1)


def test_dpo_smoke(tmp_path):
    b = tiny_backend()
    before = snapshot(b)
    g = torch.Generator().manual_seed(0)
    pairs = PairSamples(
        torch.rand(4, 3, 32, 32, generator=g),
        torch.rand(4, 3, 32, 32, generator=g),
        ["a red circle", "a blue square", "two circles", "a green triangle"],
    )
    rows = train_dpo(b, pairs, DPOConfig(steps=2, batch_size=3, lr=1e-3), tmp_path, progress=False)
    _check_run(b, before, rows, tmp_path, "dpo")
    # the model starts as its reference: d = 0 (up to the attention kernels' rounding), loss = log 2
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert abs(rows[0]["d_mean"]) < 1e-6 and abs(rows[1]["d_mean"]) > abs(rows[0]["d_mean"])


# ---- resume --------------------------------------------------------------------------------------


def test_nft_resume_matches_uninterrupted_run(tmp_path):
    """2 + 2 iterations (resumed from the checkpoint, EMA copy included) = 4 iterations straight."""

    def cfg(n):
        return NFTConfig(
            iterations=n,
            prompts_per_iter=2,
            group_size=2,
            sample_steps=2,
            train_batch_size=4,
            checkpoint_every=2,
            ema_rate=0.3,
            ema_max=0.9,
        )

    straight = tiny_backend()
    rows_straight = train_nft(straight, red_reward, PROMPTS, cfg(4), tmp_path / "a", progress=False)
    resumed = tiny_backend()
    train_nft(resumed, red_reward, PROMPTS, cfg(2), tmp_path / "b", progress=False)
    resumed = tiny_backend()  # a fresh process: same base model, state from the checkpoint
    rows_resumed = train_nft(resumed, red_reward, PROMPTS, cfg(4), tmp_path / "b", progress=False)
    assert [r["step"] for r in rows_resumed] == [3, 4]
    for a, b in zip(rows_straight[2:], rows_resumed, strict=True):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    assert max_change(resumed, snapshot(straight)) < 1e-5
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_nft_cond_dropout_trains_that_share_under_the_null_prompt(tmp_path, rate):
    """Sampling sees every prompt; with cond_dropout the training pass sees about that share of ""."""
    b = tiny_backend()
    calls = record_prompts(b)
    cfg = NFTConfig(
        iterations=6,
        prompts_per_iter=2,
        group_size=4,
        sample_steps=2,
        train_batch_size=8,
        cond_dropout=rate,
        checkpoint_every=100,
    )
    rows = train_nft(b, red_reward, PROMPTS, cfg, tmp_path, progress=False)
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) for r in rows)
    full = [c for c in calls if len(c) == 8]  # one encode of the iteration's 8 prompts, then the training one
    sampled, trained = full[0::2] if rate else full, full[1::2] if rate else []
    assert all("" not in c for c in sampled) and len(sampled) == 6
    nulls = [p == "" for c in trained for p in c]
    assert (not nulls) if rate == 0 else 0.3 < sum(nulls) / len(nulls) < 0.7
    with pytest.raises(ValueError, match="cond_dropout"):
        NFTConfig(cond_dropout=1.0)
