"""Reward-weighted likelihood fine-tuning: the loss, smoke runs (full and LoRA) and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from model_helpers import record_prompts
from t2ialign.algorithms.common import read_log
from t2ialign.algorithms.rwr import RWRConfig, WeightedSamples, rwr_loss, train_rwr
from t2ialign.backends import ShapesBackend
from t2ialign.models import build_generator, load_generator
from t2ialign.models.pretrain import world_batch
from t2ialign.pipeline import weights_from, world_pretrain_source


def test_rwr_loss_hand_computed():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    pre = torch.tensor([0.5, 1.5])
    # weights 0/1: the plain mean over the kept samples (2 and 4 -> 3), plus beta * mean(pre) = 0.5 * 1
    w = torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert rwr_loss(losses, w, pre, beta=0.5).item() == pytest.approx(3.0 + 0.5)
    # beta 0 removes the pre-training term
    assert rwr_loss(losses, w, pre, beta=0.0).item() == pytest.approx(3.0)
    # raw scores: sum(w L) / sum(w) = (0.2*1 + 0.8*3) / 1.0
    w2 = torch.tensor([0.2, 0.0, 0.8, 0.0])
    assert rwr_loss(losses, w2, None, beta=1.0).item() == pytest.approx(2.6)
    # all weights zero: no signal, and no NaN
    assert rwr_loss(losses, torch.zeros(4), None, beta=0.0).item() == 0.0


def test_guided_denoising_loss_is_the_loss_of_the_guided_output():
    """With guidance w the loss is || v_u + w (v_c - v_u) - (eps - x0) ||^2, and its gradient reaches
    the network through both branches."""
    from t2ialign.backends import denoising_loss

    b = _tiny_backend()
    x0, prompts, _ = world_batch(3, 0, 4)
    x0 = b.encode_images(x0)
    g = torch.Generator().manual_seed(0)
    eps, s = torch.randn(x0.shape, generator=g), torch.rand(4, generator=g)
    cond, null = b.encode(prompts), b.encode([""] * 4)
    x_s = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        v_c, v_u = b.predict(x_s, s, cond), b.predict(x_s, s, null)
        expected = (v_u + 3.0 * (v_c - v_u) - (eps - x0)).pow(2).flatten(1).mean(1)
        plain = (v_c - (eps - x0)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(denoising_loss(b, x0, cond, eps, s, guidance=3.0).detach(), expected)
    torch.testing.assert_close(denoising_loss(b, x0, cond, eps, s).detach(), plain)
    with pytest.raises(ValueError, match="sample_guidance"):
        RWRConfig(sample_guidance=0)


def test_weights_from_modes():
    labels = torch.tensor([1.0, 0.0])
    rewards = torch.tensor([0.7, 1.3])
    assert weights_from("label", labels, None).tolist() == [1.0, 0.0]
    assert weights_from("reward", None, rewards).tolist() == pytest.approx([0.7, 1.0])
    assert weights_from("filter", None, rewards, threshold=0.8).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="unknown weight mode"):
        weights_from("bogus", labels, rewards)


def test_config_validation():
    with pytest.raises(ValueError, match="beta"):
        RWRConfig(beta=-1)
    with pytest.raises(ValueError, match="pseudo_fraction"):
        RWRConfig(pseudo_fraction=2)
    with pytest.raises(ValueError, match="cond_dropout"):
        RWRConfig(cond_dropout=1.0)
    with pytest.raises(ValueError, match="non-negative"):
        WeightedSamples(torch.zeros(1, 3, 32, 32), ["a circle"], torch.tensor([-1.0]))


def _tiny_backend(seed=0):
    g = build_generator("tiny", seed=seed)
    torch.manual_seed(seed)
    with torch.no_grad():  # the output conv is zero-initialised: give upstream layers a gradient
        g.unet.conv_out.weight.normal_(0, 0.05)
    return ShapesBackend(g)


def _data(n=8):
    x, prompts, _ = world_batch(3, 0, n)
    return WeightedSamples(x, prompts, torch.tensor([1.0, 0.0] * (n // 2)))


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_rwr_smoke(tmp_path, lora_rank):
    backend = _tiny_backend()
    before = {k: v.clone() for k, v in backend.gen.unet.state_dict().items()}
    cfg = RWRConfig(
        steps=2, batch_size=4, pretrain_batch_size=4, lora_rank=lora_rank, lr=1e-3, checkpoint_every=1
    )
    rows = train_rwr(backend, cfg, _data(), tmp_path, pretrain_source=world_pretrain_source(), progress=False)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    tuned = load_generator(tmp_path)  # loads as a plain generator, LoRA merged
    changed = [k for k, v in tuned.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no parameter changed"
    if lora_rank:
        assert all(k.split(".")[-2] in ("conv1", "conv2", "emb", "out_proj") for k in changed)
    assert (tmp_path / "log.jsonl").exists()


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_rwr_cond_dropout_nulls_that_share_of_the_model_samples_prompts(tmp_path, rate):
    backend = _tiny_backend()
    seen = record_prompts(backend)
    cfg = RWRConfig(steps=20, batch_size=8, beta=0.0, cond_dropout=rate, checkpoint_every=100, ema=0.0)
    train_rwr(backend, cfg, _data(), tmp_path, progress=False)
    prompts = [p for batch in seen[:20] for p in batch]
    assert len(prompts) == 160
    share = sum(p == "" for p in prompts) / len(prompts)
    assert share == 0.0 if rate == 0 else 0.38 < share < 0.62, share
    assert all(p == "" or p in _data().prompts for p in prompts)


def test_rwr_needs_pretrain_data_when_beta_positive(tmp_path):
    with pytest.raises(ValueError, match="pretrain_source"):
        train_rwr(_tiny_backend(), RWRConfig(steps=1, beta=1.0), _data(), tmp_path, progress=False)


def test_rwr_stops_on_a_non_finite_loss_and_saves_nothing(tmp_path):
    """A NaN in the data makes the loss NaN: training stops at that step with a clear error, and
    neither a checkpoint nor a model holding NaN weights is written."""
    data = _data()
    data.images[:] = float("nan")
    cfg = RWRConfig(steps=3, batch_size=4, pretrain_batch_size=0, beta=0.0, checkpoint_every=1)
    with pytest.raises(
        FloatingPointError, match=r"non-finite loss at step 1 \(loss=nan.*keeps its last checkpoint"
    ):
        train_rwr(_tiny_backend(), cfg, data, tmp_path, progress=False)
    assert not (tmp_path / "trainer_state.pt").exists() and not (tmp_path / "model.safetensors").exists()
    assert read_log(tmp_path) == []


def test_rwr_resume_matches_uninterrupted(tmp_path):
    def run(out, steps):
        b = _tiny_backend()
        cfg = RWRConfig(steps=steps, batch_size=4, pretrain_batch_size=4, lr=1e-3, checkpoint_every=2)
        train_rwr(b, cfg, _data(), out, pretrain_source=world_pretrain_source(), progress=False)
        return load_generator(out).unet.state_dict()

    full = run(tmp_path / "full", 4)
    run(tmp_path / "split", 2)  # stops after a checkpoint at step 2 ...
    resumed = run(tmp_path / "split", 4)  # ... and continues to step 4
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-4, atol=2e-5)


SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from t2ialign.algorithms.rwr import RWRConfig, WeightedSamples, train_rwr
    from t2ialign.backends import ShapesBackend
    from t2ialign.models import build_generator
    from t2ialign.models.pretrain import world_batch
    from t2ialign.pipeline import world_pretrain_source
    g = build_generator("tiny", seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        g.unet.conv_out.weight.normal_(0, 0.05)
    x, p, _ = world_batch(3, 0, 8)
    data = WeightedSamples(x, p, torch.tensor([1.0, 0.0] * 4))
    cfg = RWRConfig(steps=int(sys.argv[2]), batch_size=4, pretrain_batch_size=4, lr=1e-3, checkpoint_every=1)
    src = world_pretrain_source()
    train_rwr(ShapesBackend(g), cfg, data, sys.argv[1], pretrain_source=src, progress=False)
    """
)


def test_rwr_resume_after_sigkill(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(out), "400"], env=env)
    state = out / "trainer_state.pt"
    deadline = time.time() + 60
    while not state.exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists(), "no checkpoint was written before the kill"
    step = torch.load(state, weights_only=False)["step"]
    assert 1 <= step < 400
    # resume to a few steps past the kill point, then compare with an uninterrupted run
    target = step + 2
    subprocess.run([sys.executable, str(script), str(out), str(target)], env=env, check=True)
    subprocess.run([sys.executable, str(script), str(tmp_path / "clean"), str(target)], env=env, check=True)
    a = load_generator(out).unet.state_dict()
    b = load_generator(tmp_path / "clean").unet.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5)
