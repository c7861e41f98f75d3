"""FSDP2 under Accelerate, on 2 CPU processes (gloo): the trainers shard the denoiser with
``fully_shard`` and train it to the same weights as the replicated (DDP) path, checkpoints hold full
tensors that any process count resumes, with or without FSDP, and the saved model is the same.

accelerate routes FSDP to GPUs only, so ``benchmarks/accelerate_train.py --fsdp`` wraps its CPU
accelerator in ``CPUFSDPAccelerator`` (``DistributedType.FSDP`` with an FSDP2 plugin); everything
after that (``Ranks``, accelerate's ``fsdp2_prepare_model``, DTensor collectives) is the real path.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from t2ialign.algorithms.common import Ranks, _optimizer_keys, read_log

pytest.importorskip("accelerate")

from accelerate_helpers import accelerate_train, dumps, fake_accelerator, initial_params, launch  # noqa: E402


def close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_grpo_fsdp_matches_ddp_then_resumes_without_fsdp(tmp_path):
    """2 iterations of Flow-GRPO (full fine-tuning, FULL_SHARD) on 2 ranks, one group of 8 split
    4 + 4: the same gradients, weights and saved model as the replicated run; then one plain process
    resumes the FSDP checkpoint (optimiser state keyed by name, converted)."""
    args = ["--method", "grpo", "--prompts-per-iter", "1", "--group-size", "8", "--minibatch-size", "4"]
    launch(
        [*args, "--iterations", "2", "--fsdp", "full", "--out", str(tmp_path / "fsdp")]
        + ["--dump", str(tmp_path / "dump_fsdp")]
    )
    launch([*args, "--iterations", "2", "--out", str(tmp_path / "ddp"), "--dump", str(tmp_path / "dump_ddp")])
    (f0, f1), (rows_f, _) = dumps(tmp_path / "dump_fsdp")
    (d0, _), (rows_d, _) = dumps(tmp_path / "dump_ddp")
    assert all(torch.equal(f0["params"][k], f1["params"][k]) for k in f0["params"])  # gathered alike
    close(f0["grads"], d0["grads"], atol=1e-7)
    close(f0["params"], d0["params"])
    before = initial_params()
    assert any(not torch.equal(f0["params"][k], before[k]) for k in before)
    assert [r["loss"] for r in rows_f] == pytest.approx([r["loss"] for r in rows_d], rel=1e-4, abs=1e-9)
    close(
        load_file(tmp_path / "fsdp" / "model.safetensors"), load_file(tmp_path / "ddp" / "model.safetensors")
    )
    assert [r["step"] for r in read_log(tmp_path / "fsdp")] == [1, 2]  # the main rank alone logged
    # a changed process count and no FSDP: one plain process continues from step 2
    accelerate_train.main([*args, "--iterations", "3", "--no-accelerator", "--out", str(tmp_path / "fsdp")])
    assert [r["step"] for r in read_log(tmp_path / "fsdp")] == [1, 2, 3]


def test_rwr_lora_ema_resumed_under_fsdp_matches_ddp(tmp_path):
    """RWR with LoRA, EMA and the pre-training term. A replicated run's checkpoint (optimiser keyed
    by index, EMA as full tensors) resumes under FSDP (SHARD_GRAD_OP, ZeRO-2's sharding) for one more
    step and ends where the replicated run ends: same log, same saved (LoRA-merged) generator."""
    args = ["--method", "rwr", "--beta", "0.5", "--ema", "0.5", "--lora-rank", "4", "--batch-size", "4"]
    launch([*args, "--iterations", "2", "--out", str(tmp_path / "ddp")])
    shutil.copytree(tmp_path / "ddp", tmp_path / "fsdp")
    launch([*args, "--iterations", "3", "--out", str(tmp_path / "ddp")])
    launch([*args, "--iterations", "3", "--fsdp", "grad-op", "--out", str(tmp_path / "fsdp")])
    log_d, log_f = read_log(tmp_path / "ddp"), read_log(tmp_path / "fsdp")
    assert [r["step"] for r in log_f] == [1, 2, 3]
    assert log_f[2]["loss"] == pytest.approx(log_d[2]["loss"], rel=1e-5) and math.isfinite(log_f[2]["loss"])
    final_d = load_file(tmp_path / "ddp" / "model.safetensors")
    close(load_file(tmp_path / "fsdp" / "model.safetensors"), final_d)
    state = torch.load(tmp_path / "fsdp" / "trainer_state.pt", weights_only=False)
    assert all(isinstance(k, str) for k in state["optimizer"]["state"])  # FSDP's full state, by name
    assert all(type(e) is torch.Tensor for e in state["extra"]["ema"])  # gathered, not DTensor shards
    # the same parameters hold Adam state as in the replicated run (DCP gives every parameter one)
    names = list(state["trainable"])
    state_d = torch.load(tmp_path / "ddp" / "trainer_state.pt", weights_only=False)
    assert set(state["optimizer"]["state"]) == {names[i] for i in state_d["optimizer"]["state"]}
    assert len(state_d["optimizer"]["state"]) < len(names)  # some LoRA weight never had a gradient


def test_nft_fsdp_matches_ddp(tmp_path):
    """DiffusionNFT keeps an EMA "old" policy as a dict of DTensor shards and swaps it in to sample:
    2 iterations under FSDP equal the replicated run."""
    args = ["--method", "nft", "--prompts-per-iter", "1", "--group-size", "4", "--minibatch-size", "4"]
    args += ["--iterations", "2", "--beta", "0"]
    launch([*args, "--fsdp", "full", "--out", str(tmp_path / "fsdp"), "--dump", str(tmp_path / "dump_fsdp")])
    launch([*args, "--out", str(tmp_path / "ddp"), "--dump", str(tmp_path / "dump_ddp")])
    (f0, _), (rows_f, _) = dumps(tmp_path / "dump_fsdp")
    (d0, _), _ = dumps(tmp_path / "dump_ddp")
    close(f0["params"], d0["params"])
    assert all(math.isfinite(r["loss"]) for r in rows_f)
    ema = torch.load(tmp_path / "fsdp" / "trainer_state.pt", weights_only=False)["extra"]["ema"]
    ema_d = torch.load(tmp_path / "ddp" / "trainer_state.pt", weights_only=False)["extra"]["ema"]
    close(ema, ema_d)


def test_optimizer_state_keys_convert_both_ways():
    p = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.zeros(3))]
    opt = torch.optim.AdamW(p, lr=0.1)
    sum(q.sum() for q in p).backward()
    opt.step()
    by_index = opt.state_dict()
    names = ["a.weight", "b.bias"]
    by_name = _optimizer_keys(by_index, names, by_name=True)
    assert list(by_name["state"]) == names and by_name["param_groups"][0]["params"] == names
    back = _optimizer_keys(by_name, names, by_name=False)
    assert back["param_groups"] == by_index["param_groups"]
    assert all(torch.equal(back["state"][i]["exp_avg"], by_index["state"][i]["exp_avg"]) for i in (0, 1))
    assert _optimizer_keys(by_index, names, by_name=False) is by_index
    with pytest.raises(ValueError, match="lacks.*c.weight"):
        _optimizer_keys(
            {**by_name, "state": {"c.weight": {}}, "param_groups": [{"params": ["c.weight"]}]},
            names,
            by_name=False,
        )


def test_megatron_is_refused_with_a_clear_error():
    """Megatron-LM's engine is not supported; the error says what to use instead (DeepSpeed ZeRO
    is tested in test_accelerate_deepspeed.py)."""
    with pytest.raises(ValueError, match="MEGATRON_LM.*FSDP config.*deepspeed_zero2.yaml.*DDP config"):
        Ranks(fake_accelerator("MEGATRON_LM"))


def test_fsdp1_is_refused_and_fsdp2_accepted():
    with pytest.raises(ValueError, match="FSDP version 1.*fsdp_version: 2"):
        Ranks(fake_accelerator("FSDP", fsdp_plugin={"fsdp_version": 1}))
    ranks = Ranks(fake_accelerator("FSDP", fsdp_plugin={"fsdp_version": 2}))
    assert ranks.fsdp is not None and not ranks.sharded
    assert json.dumps(ranks.full({"x": [1.0]})) == '{"x": [1.0]}'  # plain values pass through


# ---- diffusers backends (tiny random pipelines, per-block FSDP units) -----------------------------


def test_sd3_lora_grpo_fsdp_matches_ddp_and_diffusers_loads_it(tmp_path, pipelines):
    """Flow-GRPO with LoRA on a tiny SD3 pipeline, FSDP2 with one unit per ``JointTransformerBlock``
    (TRANSFORMER_BASED_WRAP): the adapters train to the replicated run's weights, and the saved
    ``pytorch_lora_weights.safetensors`` loads into a plain diffusers pipeline and changes it."""
    import diffusers

    folder = pipelines("sd3")
    args = ["--method", "grpo", "--model", folder, "--lora-rank", "4", "--prompts-per-iter", "1"]
    args += ["--group-size", "4", "--minibatch-size", "2", "--iterations", "2", "--train-steps", "2"]
    launch(
        [*args, "--fsdp", "full", "--fsdp-wrap", "transformer", "--out", str(tmp_path / "fsdp")]
        + ["--dump", str(tmp_path / "dump_fsdp")]
    )
    launch([*args, "--out", str(tmp_path / "ddp"), "--dump", str(tmp_path / "dump_ddp")])
    (f0, _), _ = dumps(tmp_path / "dump_fsdp")
    (d0, _), _ = dumps(tmp_path / "dump_ddp")
    close(f0["params"], d0["params"])
    lora = "pytorch_lora_weights.safetensors"
    close(load_file(tmp_path / "fsdp" / lora), load_file(tmp_path / "ddp" / lora))
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(encoder_hidden_states=torch.randn(1, 5, 32), pooled_projections=torch.randn(1, 64))
    with torch.no_grad():
        before = pipe.transformer(x, timestep=torch.tensor([500.0]), **kw).sample
        pipe.load_lora_weights(str(tmp_path / "fsdp"))
        after = pipe.transformer(x, timestep=torch.tensor([500.0]), **kw).sample
    assert (after - before).abs().max() > 1e-7


def test_sd_full_ddpo_fsdp_saves_the_pipeline_of_the_ddp_run(tmp_path, pipelines):
    """DDPO with full fine-tuning of a tiny SD 1.5 UNet under FSDP2 (units per block): the saved
    pipeline (rebuilt from the gathered full state) holds the replicated run's UNet and loads back."""
    from t2ialign.backends.loader import load_backend

    folder = pipelines("sd")
    args = ["--method", "ddpo", "--model", folder, "--lora-rank", "0", "--batch-size", "4"]
    args += ["--iterations", "2", "--train-steps", "2"]
    launch([*args, "--fsdp", "full", "--fsdp-wrap", "transformer", "--out", str(tmp_path / "fsdp")])
    launch([*args, "--out", str(tmp_path / "ddp")])
    weights = "unet/diffusion_pytorch_model.safetensors"
    base = load_file(f"{folder}/{weights}")
    mine, theirs = load_file(tmp_path / "fsdp" / weights), load_file(tmp_path / "ddp" / weights)
    close(mine, theirs, atol=1e-4)  # two Adam steps; reduce-scatter sums in another order
    assert max(float((mine[k] - base[k]).abs().max()) for k in base) > 1e-3  # it trained
    be = load_backend(tmp_path / "fsdp", device="cpu")
    assert torch.equal(
        dict(be.denoiser().named_parameters())["conv_in.weight"].detach(), mine["conv_in.weight"]
    )
