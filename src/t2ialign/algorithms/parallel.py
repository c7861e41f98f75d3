"""Data parallelism over Hugging Face Accelerate's processes: DDP arithmetic, or FSDP2 sharding.

Every trainer takes an optional ``accelerate.Accelerator`` and sees it only through :class:`Ranks`.
Two modes, picked by the accelerator's ``distributed_type``:

- replicated weights (``MULTI_GPU``, ``MULTI_CPU``, ...): each rank holds the whole denoiser and the
  trainers average the gradients with :meth:`Ranks.sync_grads` (DDP's arithmetic);
- ``FSDP`` (``fsdp_version: 2``): :meth:`Ranks.shard_denoiser` shards the trainable denoiser in place
  with PyTorch's ``fully_shard`` (through accelerate's ``fsdp2_prepare_model``, so the config's
  ``fsdp_reshard_after_forward``, wrap policy, mixed precision and CPU offload apply; the last two
  are untested). Its parameters, gradients and optimiser state become ``DTensor`` shards; FSDP
  reduce-scatters the gradients in the backward pass, so :meth:`Ranks.sync_grads` has nothing left
  to do. With
  ``fsdp_reshard_after_forward: false`` (``configs/accelerate/fsdp_zero2.yaml``) the parameters stay
  gathered between forward and backward: the gradients and optimiser state are sharded, as in
  DeepSpeed ZeRO stage 2. Checkpoints and the saved model hold full (unsharded) tensors, so a run
  resumes with another number of processes.

- ``DEEPSPEED`` with ZeRO stage 1 or 2 (``configs/accelerate/deepspeed_zero2.yaml``):
  :meth:`Ranks.prepare_optimizer` hands the denoiser and the trainer's AdamW to
  ``deepspeed.initialize``; the ZeRO optimiser partitions the optimiser state (and, stage 2, the
  gradients) over ranks. The trainers drive it through :meth:`Ranks.backward` and :meth:`Ranks.step`
  (``engine.backward`` without its accumulation scaling, then ``engine.step``, which reduces,
  clips with the trainer's ``grad_clip`` and steps), with DeepSpeed's caller-owned gradient
  accumulation (``managed_gradient_accumulation: false``): any number of backward passes, then one
  step, as the online methods need. The weights stay whole on every rank. Checkpoints keep each
  rank's optimiser partition, so they resume under DeepSpeed with the same number of processes.
  Stage 3, offload, and DeepSpeed's own fp16/bf16 are refused (the backends run their own autocast
  with float32 trainable weights). The config's ``gradient_accumulation_steps`` is the trainers'
  own accumulation (see :mod:`t2ialign.algorithms.run`), not DeepSpeed's.

Megatron-LM accelerators are refused.
"""

from __future__ import annotations

import torch

from t2ialign.backends.base import resharded

REFUSED = ("MEGATRON_LM",)
"""Accelerate's distributed types that :class:`Ranks` refuses."""
ZERO_DIR = "zero_optimizer"
"""The folder of a checkpoint that holds each DeepSpeed rank's optimiser partition."""


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without torch.distributed
        return False
    return isinstance(t, DTensor)


class Ranks:
    """The data-parallel view of an optional ``accelerate.Accelerator``: which shard of a global batch
    this process owns, collectives over ranks, who writes logs and checkpoints, and (under FSDP) the
    sharding of the denoiser.

    With replicated weights, gradients are averaged by :meth:`sync_grads` (one flat ``all_reduce``
    of the trainable gradients over ``torch.distributed``) rather than by wrapping the denoiser with
    ``accelerator.prepare``: the backends call their denoiser themselves, swap it for the frozen
    reference, inject LoRA into it and save it by parameter name, all of which a DDP wrapper would
    break. The averaging is DDP's arithmetic (mean of the per-rank gradients) without its overlap of
    communication and backward. FSDP2 shards the module in place and keeps its class and parameter
    names, so the backends keep working on it (see the module docstring).

    With no accelerator, or one of a single process, every method is the identity (or a no-op), so
    single-process training is unchanged.
    """

    def __init__(self, accelerator=None):
        kind = str(getattr(getattr(accelerator, "distributed_type", None), "value", "NO"))
        if kind in REFUSED:
            raise ValueError(
                f"this accelerator is set up for {kind}, which the t2ialign trainers do not support. "
                "Launch with an FSDP config (configs/accelerate/fsdp.yaml), DeepSpeed ZeRO-2 "
                "(deepspeed_zero2.yaml) or a DDP config (configs/accelerate/ddp_multi_gpu.yaml, "
                "multi_node.yaml) instead."
            )
        self.fsdp = None  # accelerate's FullyShardedDataParallelPlugin under FSDP
        if kind == "FSDP":
            plugin = accelerator.state.fsdp_plugin
            version = int(getattr(plugin, "fsdp_version", 1) or 1)
            if version != 2:
                raise ValueError(
                    f"this accelerator is set up for FSDP version {version}; the t2ialign trainers use "
                    "FSDP2 (per-parameter sharding, which keeps parameter names and LoRA working). Set "
                    "fsdp_version: 2 in the accelerate config (see configs/accelerate/fsdp.yaml)."
                )
            if getattr(plugin, "activation_checkpointing", False):
                raise ValueError(
                    "fsdp_activation_checkpointing is not applied by the t2ialign trainers (accelerate's "
                    "FSDP2 preparation ignores it): set it to false and use the diffusers backend's "
                    "gradient_checkpointing=True instead."
                )
            self.fsdp = plugin
        # the ZeRO settings under DeepSpeed (checked here, before any collective), and its engine
        self.zero = _zero_settings(accelerator) if kind == "DEEPSPEED" else None
        self.engine = None
        self.grad_clip = None  # under DeepSpeed, the trainer's (set by prepare_optimizer)
        self.acc = accelerator
        self.rank = int(accelerator.process_index) if accelerator is not None else 0
        self.world = int(accelerator.num_processes) if accelerator is not None else 1
        # collectives run on the accelerator's device (NCCL takes no CPU tensors)
        self.device = accelerator.device if accelerator is not None else torch.device("cpu")
        self.module: torch.nn.Module | None = None  # the sharded denoiser, after shard_denoiser

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.acc is None or bool(self.acc.is_main_process)

    @property
    def sharded(self) -> bool:
        """Whether :meth:`shard_denoiser` has sharded a denoiser (FSDP)."""
        return self.module is not None

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of ``n`` (which must split evenly)."""
        if n % self.world:
            raise ValueError(f"a global batch of {n} does not split over {self.world} processes")
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def generator(self, seed: int, step: int) -> torch.Generator:
        """:func:`~t2ialign.algorithms.common.seeded` on rank 0 (so one process draws what it always
        drew), a distinct stream on every other rank."""
        from t2ialign.algorithms.common import seeded

        if self.rank == 0:
            return seeded(seed, step)
        return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) * 7919 + self.rank * 2**40)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate the ranks' tensors (equal shapes) along dim 0, in rank order (on ``t``'s device;
        the collective itself runs on the accelerator's)."""
        if not self.active:
            return t
        return self.acc.gather(t.contiguous().to(self.device)).to(t.device)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return t
        import torch.distributed as dist

        out = t.detach().to(self.device, copy=True)
        dist.all_reduce(out)
        return out.to(t.device)

    def mean_scalars(self, row: dict[str, float]) -> dict[str, float]:
        """Each scalar averaged over ranks (every rank must hold the same keys)."""
        if not self.active or not row:
            return row
        keys = sorted(row)
        vals = self.all_sum(torch.tensor([float(row[k]) for k in keys], dtype=torch.float64)) / self.world
        return {k: float(v) for k, v in zip(keys, vals.tolist(), strict=True)}

    # ---- replicated weights ----------------------------------------------------------------------

    def sync_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Replace every trainable gradient by its mean over ranks. A parameter without a gradient on
        every rank keeps none (as in one process); one with a gradient on some rank counts as zero
        on the others. A no-op under FSDP, whose backward pass already averaged the gradients."""
        if not self.active or self.sharded or self.engine is not None:
            return
        import torch.distributed as dist

        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        dist.all_reduce(has)
        live = [p for p, h in zip(params, has.tolist(), strict=True) if h > 0]
        if not live:
            return
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1) for p in live]
        ).to(self.device)
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in live:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.device, copy=True)
            offset += n

    def broadcast_params(self, params: list[torch.nn.Parameter]) -> None:
        """Make every rank start from rank 0's trainable weights (a no-op once sharded: the shards
        were cut from rank 0's weights)."""
        if not self.active or self.sharded:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                buf = p.data.to(self.device, copy=True)
                dist.broadcast(buf, 0)
                p.data.copy_(buf)

    def wait(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()

    # ---- the optimisation step (plain, or DeepSpeed's engine) ------------------------------------

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer, module: torch.nn.Module, grad_clip: float):
        """The optimiser to train with: ``optimizer`` itself, or under DeepSpeed the ZeRO optimiser
        that ``deepspeed.initialize(model=module, optimizer=optimizer)`` wraps it in, clipping
        gradients at ``grad_clip``. Call it once, after :func:`setup_trainable` and before resuming."""
        if self.zero is None:
            return optimizer
        if self.engine is not None:
            raise RuntimeError("the optimiser is already prepared")
        clip = self.zero["gradient_clipping"]
        if clip is not None and float(clip) != float(grad_clip):
            raise ValueError(
                f"the DeepSpeed config clips gradients at {clip}, the trainer at grad_clip={grad_clip}: "
                "the trainer's value is the one used; remove gradient_clipping from the DeepSpeed config "
                "or set it to 'auto'"
            )
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": 1,  # batches are the trainers' own
            "gradient_accumulation_steps": 1,
            "train_batch_size": self.world,
            "managed_gradient_accumulation": False,  # any number of backward passes, then step()
            "gradient_clipping": float(grad_clip),
            "zero_optimization": self.zero["zero_optimization"],
            "steps_per_print": 2**31 - 1,
        }
        engine, zero_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        if engine.managed_gradient_accumulation():  # an older DeepSpeed ignores the key: wrong gradients
            raise RuntimeError(
                f"DeepSpeed {deepspeed.__version__} ignores managed_gradient_accumulation=false, which "
                "the trainers' several backward passes per step need: pip install 'deepspeed>=0.19.5'"
            )
        self.engine = engine
        self.grad_clip = float(grad_clip)
        return zero_optimizer

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``; under DeepSpeed through its engine (no accumulation scaling: the
        trainers scale their losses themselves). Under DeepSpeed a loss without a gradient (a
        deterministic step) still runs a backward pass of zeros: ZeRO-2 reduces after every pass, so
        every rank must take as many as the others, and a step needs at least one."""
        if self.engine is None:
            loss.backward()
            return
        if not loss.requires_grad:
            trainable = [p for p in self.engine.module.parameters() if p.requires_grad]
            loss = loss + 0.0 * sum(p.sum() for p in trainable)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, optimizer, params: list[torch.nn.Parameter], grad_clip: float) -> float:
        """Average the gradients over ranks, clip their global norm at ``grad_clip`` and take the
        optimiser step; returns the norm before clipping. Under DeepSpeed, ``engine.step()`` does all
        three; unlike the plain path it skips the step when the norm is not finite (the trainers then
        stop on the non-finite loss), and a trainable parameter that got no gradient counts as a zero
        gradient (AdamW's momentum and weight decay still move it; the plain path leaves it)."""
        if self.engine is not None:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return float("nan") if norm is None else float(norm)
        self.sync_grads(params)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        return float(norm)

    def save_zero_partition(self, out, optimizer, step: int) -> dict:
        """Write this rank's ZeRO optimiser partition to ``out/zero_optimizer/step{step}/`` and wait
        for every rank (all call it, before the main process replaces the checkpoint, which then
        points at a complete set); returns the marker the checkpoint keeps in place of an optimiser
        state. :meth:`prune_zero_partitions` removes older steps' folders afterwards."""
        from pathlib import Path

        folder = Path(out) / ZERO_DIR / f"step{step}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rank{self.rank}.pt"
        torch.save({"step": step, "world": self.world, "state": optimizer.state_dict()}, str(path) + ".tmp")
        Path(str(path) + ".tmp").replace(path)
        self.wait()
        return {"zero_partitions": self.world}

    def prune_zero_partitions(self, out, step: int) -> None:
        """Remove the partitions of steps other than ``step`` (main process, after the checkpoint of
        ``step`` is written)."""
        import shutil
        from pathlib import Path

        for old in (Path(out) / ZERO_DIR).glob("step*"):
            if old.name != f"step{step}":
                shutil.rmtree(old, ignore_errors=True)

    def load_zero_partition(self, out, optimizer, marker: dict, step: int) -> None:
        """Load this rank's partition written by :meth:`save_zero_partition` at ``step``; a clear
        error when the launch differs from the one that wrote it. Gradients are clipped at this run's
        ``grad_clip`` (DeepSpeed would restore the saved one)."""
        from pathlib import Path

        world = int(marker["zero_partitions"])
        if self.engine is None or world != self.world:
            raise ValueError(
                f"{out} was written under DeepSpeed ZeRO with {world} processes, whose optimiser state "
                "is partitioned over them: resume it with the same DeepSpeed launch "
                f"({world} processes), or start a new --out"
            )
        path = Path(out) / ZERO_DIR / f"step{step}" / f"rank{self.rank}.pt"
        if not path.exists():
            raise ValueError(f"{path} is missing: the DeepSpeed checkpoint in {out} is incomplete")
        saved = torch.load(path, weights_only=False, map_location="cpu")
        states = [None] * self.world
        states[self.rank] = saved["state"]
        optimizer.load_state_dict(states)  # the float32 master copy is refreshed from the weights
        optimizer.clip_grad = self.grad_clip

    # ---- FSDP2 -----------------------------------------------------------------------------------

    def shard_denoiser(self, backend, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """Under FSDP, shard ``backend.denoiser()`` in place and return its trainable parameters (now
        ``DTensor`` shards, to build the optimiser on); otherwise return ``params`` unchanged.

        Call it after LoRA is injected, the full fine-tuning reference is snapshotted (the reference
        stays a replicated, frozen copy) and the trainable weights are broadcast (the shards are cut
        from each rank's own copy), and before the optimiser is built."""
        if self.fsdp is None:
            return params
        if self.sharded:
            raise RuntimeError("the denoiser is already sharded")
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        net = backend.denoiser()
        prepared = fsdp2_prepare_model(self.acc, net)
        if prepared is not net:  # accelerate shards in place; a new module would not be the backend's
            raise RuntimeError("accelerate's FSDP2 preparation returned a new module; cannot shard in place")
        self.module = net
        return backend.trainable_parameters()

    def full(self, tree, everywhere: bool = False):
        """``tree`` (a tensor, or dicts / lists of them) with every ``DTensor`` shard gathered into a
        full CPU tensor, kept on the main process only (``None`` elsewhere: a checkpoint is written
        by the main process, and N full copies of a large model would not fit in host memory) unless
        ``everywhere``. A collective under FSDP: every rank must call it, in the same order."""
        if isinstance(tree, dict):
            return {k: self.full(v, everywhere) for k, v in tree.items()}
        if isinstance(tree, list):
            return [self.full(v, everywhere) for v in tree]
        if _is_dtensor(tree):
            t = tree.full_tensor().detach()
            return t.cpu() if everywhere or self.is_main else None
        return tree

    def local_like(self, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A full tensor cut into this rank's shard the way ``like`` (a ``DTensor``) is sharded; the
        tensor itself when ``like`` is a plain tensor."""
        if not _is_dtensor(like):
            return full.to(like.device)
        from torch.distributed.tensor import DTensor, distribute_tensor

        out = distribute_tensor(full.to(like.device_mesh.device_type), like.device_mesh, like.placements)
        dev = like.to_local().device  # the mesh's device, or the CPU under FSDP's CPU offload
        if out.to_local().device != dev:
            out = DTensor.from_local(
                out.to_local().to(dev),
                like.device_mesh,
                like.placements,
                shape=like.shape,
                stride=like.stride(),
            )
        return out

    def optimizer_state(self, optimizer) -> dict:
        """The optimiser's state dict; under FSDP the full (unsharded) one, keyed by parameter name,
        on the main process (a collective: every rank must call it)."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if not optimizer.state:  # DCP would first take an lr = 0 step to create the state (step = 1)
            names = {id(p): n for n, p in resharded(self.module).named_parameters()}
            groups = [
                {
                    **{k: v for k, v in g.items() if k != "params"},
                    "params": [names[id(p)] for p in g["params"]],
                }
                for g in optimizer.param_groups
            ]
            return {"state": {}, "param_groups": groups}
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(resharded(self.module), optimizer, options=opts)

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        """Load what :meth:`optimizer_state` returned (every rank passes the full state). A parameter
        without state in ``state`` (it never had a gradient) gets none, as in one process."""
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not state["state"]:  # hyper-parameters only (DCP would take its lr = 0 step)
            for g, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
                g.update({k: v for k, v in saved.items() if k != "params"})
            return
        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_optimizer_state_dict(resharded(self.module), optimizer, state, options=opts)
        names = {id(p): n for n, p in resharded(self.module).named_parameters()}
        for p in list(optimizer.state):  # DCP gives every parameter a state; drop the ones not saved
            if names.get(id(p)) not in state["state"]:
                del optimizer.state[p]

    def denoiser_state(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The sharded denoiser's full state dict (CPU tensors) on the main process, empty on the
        others; with ``trainable_only`` just the trainable parameters (all a LoRA save needs). A
        collective: every rank must call it."""
        if not self.sharded:
            raise RuntimeError("no sharded denoiser")
        resharded(self.module)
        if trainable_only:
            full = {k: self.full(p.detach()) for k, p in self.module.named_parameters() if p.requires_grad}
            return full if self.is_main else {}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.module, options=opts)


def _zero_settings(accelerator) -> dict:
    """The ZeRO settings of a DeepSpeed accelerator's config, refusing what the trainers do not
    support (checked at start, before any collective)."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise ValueError("a DeepSpeed launch needs the deepspeed package: pip install deepspeed") from e
    cfg = dict(accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = dict(cfg.get("zero_optimization", {}))
    stage = int(zero.get("stage", 0))
    if stage == 0:
        raise ValueError(
            "DeepSpeed ZeRO stage 0 is not supported by the t2ialign trainers: it partitions nothing; "
            "use a DDP config (configs/accelerate/ddp_multi_gpu.yaml), or ZeRO stage 1 or 2"
        )
    if stage not in (1, 2):
        raise ValueError(
            f"DeepSpeed ZeRO stage {stage} is not supported by the t2ialign trainers: use stage 1 or 2 "
            "(configs/accelerate/deepspeed_zero2.yaml); stage 3 partitions the weights, which the "
            "backends read and write by name (for that use FSDP2, configs/accelerate/fsdp.yaml)"
        )
    for key in ("offload_optimizer", "offload_param"):
        if str((zero.pop(key, None) or {}).get("device", "none")).lower() not in ("none", "null"):
            raise ValueError(f"DeepSpeed {key} is not supported by the t2ialign trainers (untested)")
    if zero.get("elastic_checkpoint"):
        raise ValueError("DeepSpeed elastic_checkpoint is not supported (each rank keeps its partition)")
    if stage == 1 and zero.get("overlap_comm"):
        raise ValueError("DeepSpeed ZeRO stage 1 with overlap_comm is not supported (DeepSpeed refuses it)")
    zero.pop("stage3_gather_16bit_weights_on_model_save", None)
    zero = {k: v for k, v in zero.items() if v != "auto"}  # DeepSpeed's own defaults
    half = [k for k in ("fp16", "bf16") if (cfg.get(k) or {}).get("enabled") in (True, "true")]
    if half or str(getattr(accelerator, "mixed_precision", "no")) != "no":
        raise ValueError(
            "DeepSpeed's mixed precision is not used by the t2ialign trainers (it would cast the "
            "trainable weights): set mixed_precision: 'no' in the accelerate config and choose the "
            "backend's dtype (for example bfloat16 frozen weights under autocast) instead"
        )
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ValueError(f"the DeepSpeed config has a {key!r} section; the trainers build their AdamW")
    clip = cfg.get("gradient_clipping")
    return {"zero_optimization": zero, "gradient_clipping": None if clip in (None, "auto") else clip}
