"""What every trainer shares: checkpoints with resume, logging, optimisers and rollouts.

Nothing here knows the shapes world: trainers get a backend (``t2ialign.backends.base``) and a
reward function ``reward_fn(images, prompts, metadata) -> (rewards, info)``.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CHECKPOINT = "trainer_state.pt"


# ---- checkpoints and resume ----------------------------------------------------------------------


def save_trainer_state(out: Path, step: int, backend, optimizer, extra: dict | None = None) -> None:
    """Atomically write the trainable weights, the optimiser and the RNG states to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "trainable": backend.state_dict_trainable(),
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "extra": extra or {},
    }
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / CHECKPOINT)


def load_trainer_state(out: Path, backend, optimizer) -> tuple[int, dict]:
    """Resume from ``out`` if it holds a trainer state; returns (step, extra) or (0, {})."""
    path = out / CHECKPOINT
    if not path.exists():
        return 0, {}
    state = torch.load(path, weights_only=False, map_location="cpu")
    backend.load_state_dict_trainable(state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return state["step"], state["extra"]


# ---- logging -------------------------------------------------------------------------------------


class RunLogger:
    """Scalars to ``out/log.jsonl`` always, to TensorBoard when installed, and to Weights & Biases
    when ``wandb_project`` is given and wandb is installed."""

    def __init__(self, out: Path, config: dict, tensorboard: bool = True, wandb_project: str | None = None):
        self.path = Path(out) / "log.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tb = None
        self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out) / "tensorboard"))
            except ImportError:
                self.tb = None
        if wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_project, config=config, dir=str(out))
            except ImportError as e:
                raise ValueError("--wandb needs the wandb package: pip install wandb") from e

    def log(self, step: int, scalars: dict[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, float(v), step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_log(out: Path) -> list[dict]:
    path = Path(out) / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(out: Path, step: int) -> None:
    """Drop log rows after ``step`` (a resumed run rewrites them)."""
    rows = [r for r in read_log(out) if r["step"] <= step]
    path = Path(out) / "log.jsonl"
    if path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---- optimisation --------------------------------------------------------------------------------


def check_lr_and_lora(cfg) -> None:
    """The checks every trainer config shares: a positive ``lr`` and a non-negative ``lora_rank``."""
    if cfg.lr <= 0:
        raise ValueError(f"lr must be positive, got {cfg.lr}")
    if cfg.lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0, got {cfg.lora_rank}")


def setup_trainable(backend, lora_rank: int, lora_alpha: float) -> list[torch.nn.Parameter]:
    """Enable LoRA (rank > 0) or full fine-tuning of the denoiser; returns the trainable parameters."""
    if lora_rank > 0:
        backend.enable_lora(lora_rank, lora_alpha)
    else:
        backend.snapshot_reference()
        backend.denoiser().requires_grad_(True)
    params = backend.trainable_parameters()
    if not params:
        raise RuntimeError("the backend has no trainable parameters")
    return params


def seeded(seed: int, step: int) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, step): resumed runs draw the same noise."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))


# ---- rollouts ------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """A sampled chain. ``xs`` (T + 1, B, C, H, W) holds x at each grid point, ``log_probs`` (T, B)
    the log-probability of each stochastic step (0 for deterministic steps), ``grid`` (T + 1,) the
    noise levels, ``stochastic`` (T,) which steps were stochastic."""

    xs: torch.Tensor
    log_probs: torch.Tensor
    grid: torch.Tensor
    stochastic: torch.Tensor

    @property
    def x0(self) -> torch.Tensor:
        return self.xs[-1]


@torch.no_grad()
def rollout(
    backend,
    cond,
    x1: torch.Tensor,
    steps: int,
    guidance: float,
    stochastic: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Trajectory:
    """Sample from s = 1 to 0, stochastic (the policy step with its log-probability) where
    ``stochastic[k]`` is True and deterministic elsewhere (all stochastic by default)."""
    grid = backend.timesteps(steps)
    if stochastic is None:
        stochastic = torch.ones(steps, dtype=torch.bool)
    xs, lps = [x1], []
    x = x1
    for k in range(steps):
        out = backend.predict(x, grid[k], cond, guidance=guidance)
        if stochastic[k]:
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x, lp, _, _ = backend.stochastic_step(out, grid[k], grid[k + 1], x, noise=noise)
        else:
            x = backend.ode_step(out, grid[k], grid[k + 1], x)
            lp = torch.zeros(x.shape[0], device=x.device)
        xs.append(x)
        lps.append(lp)
    return Trajectory(torch.stack(xs), torch.stack(lps), grid, stochastic.clone())


def step_log_prob(backend, traj: Trajectory, k: int, cond, guidance: float, idx=None):
    """Re-evaluate step k of a stored trajectory under the current parameters (with gradient):
    returns (log_prob (B,), mean, std)."""
    x, x_next = traj.xs[k], traj.xs[k + 1]
    if idx is not None:
        x, x_next = x[idx], x_next[idx]
    out = backend.predict(x, traj.grid[k], cond, guidance=guidance)
    _, lp, mean, std = backend.stochastic_step(out, traj.grid[k], traj.grid[k + 1], x, x_next=x_next)
    return lp, mean, std


def initial_noise(n: int, shape, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randn((n, *shape), generator=generator).to(device)


def call_reward(reward_fn, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None):
    """Call a reward function and check what it returns."""
    rewards, info = reward_fn(images, prompts, metadata)
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.shape != (images.shape[0],):
        raise ValueError(f"reward_fn returned shape {tuple(rewards.shape)}, expected ({images.shape[0]},)")
    return rewards, info or {}


# ---- data parallelism (Hugging Face Accelerate) --------------------------------------------------


SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")
"""Accelerate's distributed types that shard the model or the optimiser, refused by :class:`Ranks`."""


class Ranks:
    """The data-parallel view of an optional ``accelerate.Accelerator``: which shard of a global batch
    this process owns, collectives over ranks, and who writes logs and checkpoints.

    Gradients are averaged by :meth:`sync_grads` (one flat ``all_reduce`` of the trainable gradients
    over ``torch.distributed``) rather than by wrapping the denoiser with ``accelerator.prepare``:
    the backends call their denoiser themselves, swap it for the frozen reference, inject LoRA into
    it and save it by parameter name, all of which a DDP wrapper would break. The averaging is DDP's
    arithmetic (mean of the per-rank gradients) without its overlap of communication and backward.

    With no accelerator, or one of a single process, every method is the identity (or a no-op), so
    single-process training is unchanged.
    """

    def __init__(self, accelerator=None):
        kind = str(getattr(getattr(accelerator, "distributed_type", None), "value", "NO"))
        if kind in SHARDED:
            raise ValueError(
                f"this accelerator is set up for {kind} (sharded weights or optimiser state), which the "
                "t2ialign trainers do not support yet: they train replicated weights with a data-parallel "
                "gradient average. Launch with a DDP config (configs/accelerate/ddp_multi_gpu.yaml, "
                "multi_node.yaml) instead."
            )
        self.acc = accelerator
        self.rank = int(accelerator.process_index) if accelerator is not None else 0
        self.world = int(accelerator.num_processes) if accelerator is not None else 1
        # collectives run on the accelerator's device (NCCL takes no CPU tensors)
        self.device = accelerator.device if accelerator is not None else torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.acc is None or bool(self.acc.is_main_process)

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of ``n`` (which must split evenly)."""
        if n % self.world:
            raise ValueError(f"a global batch of {n} does not split over {self.world} processes")
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def generator(self, seed: int, step: int) -> torch.Generator:
        """:func:`seeded` on rank 0 (so one process draws what it always drew), a distinct stream on
        every other rank."""
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

    def sync_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Replace every trainable gradient by its mean over ranks. A parameter without a gradient on
        every rank keeps none (as in one process); one with a gradient on some rank counts as zero
        on the others."""
        if not self.active:
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
        """Make every rank start from rank 0's trainable weights."""
        if not self.active:
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
