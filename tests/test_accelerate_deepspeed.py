"""DeepSpeed ZeRO under Accelerate, on 2 CPU processes (gloo): the trainers hand their AdamW to
DeepSpeed's engine (``Ranks.prepare_optimizer``) and drive it with ``Ranks.backward`` / ``Ranks.step``;
the weights reach those of the replicated (DDP) run, each rank checkpoints its optimiser partition
and a run resumes under the same launch, and what is not supported is refused with a clear error.

accelerate starts DeepSpeed on accelerator devices only, so ``benchmarks/accelerate_train.py
--deepspeed STAGE`` wraps its CPU accelerator in ``CPUDeepSpeedAccelerator`` (``DistributedType.DEEPSPEED``
with accelerate's ``DeepSpeedPlugin``); everything after that (``deepspeed.initialize``, the ZeRO
optimiser, its collectives) is the real path.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from t2ialign.algorithms.common import Ranks, load_trainer_state, read_log, save_trainer_state

pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")

from accelerate_helpers import accelerate_train, dumps, fake_accelerator, initial_params, launch  # noqa: E402

GRPO = ["--method", "grpo", "--prompts-per-iter", "1", "--group-size", "8", "--minibatch-size", "4"]


def close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_grpo_zero2_matches_ddp_and_resumes_under_the_same_launch(tmp_path):
    """2 iterations of Flow-GRPO (full fine-tuning, several backward passes per optimiser step) on
    2 ranks under ZeRO-2: the replicated run's weights, gradient norms and saved model; each rank
    wrote its optimiser partition; the same launch resumes for a third iteration and stays with the
    replicated run; one plain process is refused that checkpoint with a clear error."""
    ds, ddp = tmp_path / "ds", tmp_path / "ddp"
    launch(
        [*GRPO, "--iterations", "2", "--deepspeed", "2", "--out", str(ds), "--dump", str(tmp_path / "d_ds")]
    )
    launch([*GRPO, "--iterations", "2", "--out", str(ddp), "--dump", str(tmp_path / "d_ddp")])
    (z0, z1), (rows_z, _) = dumps(tmp_path / "d_ds")
    (d0, _), (rows_d, _) = dumps(tmp_path / "d_ddp")
    assert all(torch.equal(z0["params"][k], z1["params"][k]) for k in z0["params"])  # whole on each rank
    close(z0["params"], d0["params"], atol=1e-6)
    before = initial_params()
    assert any(not torch.equal(z0["params"][k], before[k]) for k in before)
    assert [r["grad_norm"] for r in rows_z] == pytest.approx([r["grad_norm"] for r in rows_d], rel=1e-5)
    assert all(math.isfinite(r["loss"]) for r in rows_z)
    close(load_file(ds / "model.safetensors"), load_file(ddp / "model.safetensors"), atol=1e-6)
    state = torch.load(ds / "trainer_state.pt", weights_only=False)
    assert state["optimizer"] == {"zero_partitions": 2}
    parts = [torch.load(ds / "zero_optimizer" / "step2" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [p["step"] for p in parts] == [2, 2]
    n = sum(p.numel() for p in before.values())  # each rank holds about half of the Adam state
    assert all(p["state"]["base_optimizer_state"]["state"][0]["exp_avg"].numel() <= n // 2 + 2 for p in parts)
    # one more iteration: the resumed ZeRO run stays with the replicated one
    launch(
        [*GRPO, "--iterations", "3", "--deepspeed", "2", "--out", str(ds), "--dump", str(tmp_path / "d_ds3")]
    )
    launch([*GRPO, "--iterations", "3", "--out", str(ddp), "--dump", str(tmp_path / "d_ddp3")])
    close(dumps(tmp_path / "d_ds3")[0][0]["params"], dumps(tmp_path / "d_ddp3")[0][0]["params"], atol=1e-5)
    assert [r["step"] for r in read_log(ds)] == [1, 2, 3]
    assert [p.name for p in (ds / "zero_optimizer").iterdir()] == ["step3"]  # older partitions pruned
    with pytest.raises(ValueError, match="DeepSpeed ZeRO with 2 processes.*same DeepSpeed launch"):
        accelerate_train.main([*GRPO, "--iterations", "4", "--no-accelerator", "--out", str(ds)])


def test_rwr_lora_ema_zero1_matches_ddp(tmp_path):
    """RWR with LoRA, EMA and the pre-training term under ZeRO-1 (partitioned optimiser state):
    the same log and saved (LoRA-merged) generator as the replicated run."""
    args = ["--method", "rwr", "--beta", "0.5", "--ema", "0.5", "--lora-rank", "4", "--batch-size", "4"]
    launch([*args, "--iterations", "2", "--deepspeed", "1", "--out", str(tmp_path / "ds")])
    launch([*args, "--iterations", "2", "--out", str(tmp_path / "ddp")])
    log_z, log_d = read_log(tmp_path / "ds"), read_log(tmp_path / "ddp")
    assert [r["loss"] for r in log_z] == pytest.approx([r["loss"] for r in log_d], rel=1e-5)
    ds_model = load_file(tmp_path / "ds" / "model.safetensors")
    close(ds_model, load_file(tmp_path / "ddp" / "model.safetensors"), atol=1e-6)


def deepspeed_accelerator(config: dict, mixed_precision: str = "no"):
    return fake_accelerator("DEEPSPEED", deepspeed_config=config, mixed_precision=mixed_precision)


def zero(stage: int = 2, **more) -> dict:
    return {"zero_optimization": {"stage": stage, "offload_optimizer": {"device": "none"}}, **more}


@pytest.mark.parametrize(
    ("config", "mixed", "message"),
    [
        (zero(3), "no", "stage 3 is not supported.*stage 1 or 2.*FSDP2"),
        (zero(0), "no", "stage 0 is not supported.*partitions nothing.*DDP config"),
        ({"zero_optimization": {"stage": 2, "elastic_checkpoint": True}}, "no", "elastic_checkpoint"),
        ({"zero_optimization": {"stage": 1, "overlap_comm": True}}, "no", "stage 1 with overlap_comm"),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
            "no",
            "offload_optimizer is not supported",
        ),
        (zero(2, bf16={"enabled": True}), "no", "mixed precision.*mixed_precision: 'no'.*dtype"),
        (zero(2), "bf16", "mixed precision.*mixed_precision: 'no'"),
        (zero(2, optimizer={"type": "Adam"}), "no", "'optimizer' section.*AdamW"),
    ],
)
def test_unsupported_deepspeed_settings_are_refused(config, mixed, message):
    with pytest.raises(ValueError, match=message):
        Ranks(deepspeed_accelerator(config, mixed))


def test_zero_settings_and_clip_mismatch():
    """'auto' entries are left to DeepSpeed; a clip value in the DeepSpeed config that differs from
    the trainer's is an error, not a silent choice."""
    cfg = zero(2, gradient_clipping="auto")
    cfg["zero_optimization"]["reduce_bucket_size"] = "auto"
    ranks = Ranks(deepspeed_accelerator(cfg))
    assert ranks.zero == {"zero_optimization": {"stage": 2}, "gradient_clipping": None}
    ranks = Ranks(deepspeed_accelerator(zero(2, gradient_clipping=0.5)))
    net = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="clips gradients at 0.5, the trainer at grad_clip=1.0"):
        ranks.prepare_optimizer(torch.optim.AdamW(net.parameters()), net, grad_clip=1.0)
    assert ranks.engine is None


def test_a_whole_optimizer_checkpoint_is_refused_under_deepspeed(tmp_path):
    """A checkpoint written without DeepSpeed (whole optimiser state) cannot seed ZeRO partitions:
    resuming it under DeepSpeed is a clear error."""
    backend = accelerate_train.tiny_backend()
    params = [p for p in backend.denoiser().parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params)
    save_trainer_state(tmp_path, 1, backend, opt)
    ranks = Ranks(deepspeed_accelerator(zero(2)))
    ranks.engine = object()  # as after prepare_optimizer
    with pytest.raises(ValueError, match="written without DeepSpeed.*launch that wrote it"):
        load_trainer_state(tmp_path, backend, opt, ranks)


def test_a_loss_without_gradient_still_takes_a_zero_backward_pass_under_deepspeed():
    """ZeRO-2 reduces after every backward pass, so under DeepSpeed a constant loss (a deterministic
    step) still runs one, of zeros, on the trainable parameters; without DeepSpeed it is skipped by
    the caller and a plain backward is plain."""
    net = torch.nn.Linear(2, 2)
    calls = []

    class Engine:
        module = net

        def backward(self, loss, scale_wrt_gas=True):
            calls.append(scale_wrt_gas)
            loss.backward()

    ranks = Ranks(deepspeed_accelerator(zero(2)))
    ranks.engine = Engine()
    ranks.backward(torch.tensor(3.0))  # no graph
    assert calls == [False]
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())
    plain = Ranks(None)
    loss = net(torch.ones(1, 2)).sum()
    plain.backward(loss)
    assert net.weight.grad.abs().sum() > 0
