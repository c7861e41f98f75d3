"""What every trainer shares: checkpoints with resume, logging, optimisers and rollouts.

Nothing here knows the shapes world: trainers get a backend (``t2ialign.backends.base``) and a
reward function ``reward_fn(images, prompts, metadata) -> (rewards, info)``.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

CHECKPOINT = "trainer_state.pt"


# ---- checkpoints and resume ----------------------------------------------------------------------


def save_trainer_state(
    out: Path, step: int, backend, optimizer, extra: dict | None = None, ranks=None
) -> None:
    """Atomically write the trainable weights, the optimiser and the RNG states to ``out``.

    With ``ranks`` (:class:`~t2ialign.algorithms.parallel.Ranks`) every process calls it and the main
    process writes; under FSDP the shards (weights, optimiser state, ``DTensor`` values in ``extra``)
    are gathered into full tensors first, so any number of processes can resume the state. Under
    DeepSpeed every rank writes its ZeRO optimiser partition beside it (same process count to resume)."""
    ranks = ranks or Ranks(None)
    zero = ranks.engine is not None
    if zero:  # DeepSpeed: every rank writes its optimiser partition, then they wait for each other
        optim = ranks.save_zero_partition(out, optimizer, step)
    if not ranks.sharded and not ranks.is_main:
        return
    trainable = ranks.full(backend.state_dict_trainable())
    if not zero:
        optim = ranks.optimizer_state(optimizer)
    extra = ranks.full(extra or {})
    if not ranks.is_main:
        return
    out.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "trainable": trainable,
        "optimizer": optim,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "extra": extra,
    }
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / CHECKPOINT)
    if zero:
        ranks.prune_zero_partitions(out, step)


def load_trainer_state(out: Path, backend, optimizer, ranks=None) -> tuple[int, dict]:
    """Resume from ``out`` if it holds a trainer state; returns (step, extra) or (0, {}). Under FSDP
    (``ranks`` sharded) the full weights and optimiser state are cut into this rank's shards; the
    tensors in ``extra`` come back full (:meth:`Ranks.local_like` shards them)."""
    ranks = ranks or Ranks(None)
    path = out / CHECKPOINT
    if not path.exists():
        return 0, {}
    # mmap: the ranks of one machine share the file's pages instead of holding a copy each
    state = torch.load(path, weights_only=False, map_location="cpu", mmap=True)
    zero = "zero_partitions" in state["optimizer"]  # written under DeepSpeed ZeRO
    if ranks.engine is not None and not zero:
        raise ValueError(
            f"{out} was written without DeepSpeed (its optimiser state is whole): resume it with the "
            "launch that wrote it (any process count, DDP or FSDP), or start a new --out"
        )
    names = [k for k, p in backend.denoiser().named_parameters() if p.requires_grad]
    live = backend.state_dict_trainable() if ranks.sharded else {}
    trainable = state["trainable"]
    if ranks.sharded:
        trainable = {k: ranks.local_like(v, live[k]) for k, v in trainable.items()}
    backend.load_state_dict_trainable(trainable)
    if zero:  # after the weights: ZeRO's float32 master copy is refreshed from them
        ranks.load_zero_partition(out, optimizer, state["optimizer"], state["step"])
    else:
        ranks.load_optimizer_state(optimizer, _optimizer_keys(state["optimizer"], names, ranks.sharded))
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return state["step"], state["extra"]


def _optimizer_keys(optim: dict, names: list[str], by_name: bool) -> dict:
    """An optimiser state dict keyed by parameter name (FSDP's full state dict) or by index
    (``Optimizer.state_dict``), converted to the keys wanted; ``names`` are the trainable parameters'
    names in the optimiser's order. So an FSDP checkpoint resumes without FSDP and the other way."""
    index = {n: i for i, n in enumerate(names)}
    keys = [k for g in optim["param_groups"] for k in g["params"]]
    if all(isinstance(k, str) for k in keys) == by_name:
        return optim
    table = dict(enumerate(names)) if by_name else index
    missing = [k for k in keys if k not in table]
    if missing:
        raise ValueError(f"the checkpoint's optimiser state has parameters this model lacks: {missing[:3]}")
    conv = table.__getitem__
    return {
        "state": {conv(k): v for k, v in optim["state"].items()},
        "param_groups": [{**g, "params": [conv(k) for k in g["params"]]} for g in optim["param_groups"]],
    }


def save_model(backend, ranks, out: Path, method: str, cfg) -> None:
    """Save the fine-tuned model (``backend.save``) from the main process, with the card every
    trainer writes (``method``, its config dataclass ``cfg`` as ``{method}_config``, the base
    model); every process calls it. Under FSDP the denoiser's full weights are gathered first (only
    the adapters with LoRA, unless the backend ``merges_lora_on_save``) and handed to
    ``backend.save(..., denoiser_state=...)``."""
    card = {"method": method, f"{method}_config": asdict(cfg), "base_model": backend.model_id}
    if ranks.sharded:
        adapters_only = backend.lora_enabled and not getattr(backend, "merges_lora_on_save", False)
        state = ranks.denoiser_state(trainable_only=adapters_only)
        if ranks.is_main:
            backend.save(out, card=card, denoiser_state=state)
    elif ranks.is_main:
        backend.save(out, card=card)
    ranks.wait()


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


def setup_trainable(backend, lora_rank: int, lora_alpha: float, ranks=None) -> list[torch.nn.Parameter]:
    """Enable LoRA (rank > 0) or full fine-tuning of the denoiser; returns the trainable parameters.
    With ``ranks``, rank 0's trainable weights are broadcast to every rank, and under FSDP the
    denoiser is then sharded (build the optimiser after this)."""
    if lora_rank > 0:
        backend.enable_lora(lora_rank, lora_alpha)
    else:
        backend.snapshot_reference()
        backend.denoiser().requires_grad_(True)
    params = backend.trainable_parameters()
    if not params:
        raise RuntimeError("the backend has no trainable parameters")
    if ranks is None:
        return params
    ranks.broadcast_params(params)  # every rank starts from rank 0's weights (random LoRA inits differ)
    return ranks.shard_denoiser(backend, params)


def make_optimizer(backend, params, ranks, lr: float, weight_decay: float, grad_clip: float):
    """The trainers' AdamW on ``params``; under DeepSpeed the ZeRO optimiser around it (see
    :meth:`~t2ialign.algorithms.parallel.Ranks.prepare_optimizer`), clipping at ``grad_clip``."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return ranks.prepare_optimizer(opt, backend.denoiser(), grad_clip)


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


def call_reward(reward_fn, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None, ranks=None):
    """Call a reward function and check what it returns. Non-finite rewards are an error; with
    ``ranks`` (every rank calls this for its share) the verdict is shared, so no rank is left waiting
    in a collective."""
    rewards, info = reward_fn(images, prompts, metadata)
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.shape != (images.shape[0],):
        raise ValueError(f"reward_fn returned shape {tuple(rewards.shape)}, expected ({images.shape[0]},)")
    bad = [prompts[i] for i in torch.nonzero(~torch.isfinite(rewards.detach())).flatten().tolist()]
    n_bad = len(bad)
    if ranks is not None and ranks.active:
        n_bad = int(ranks.all_sum(torch.tensor(float(n_bad), dtype=torch.float64)))
    if n_bad:
        hint = " (the images themselves are not finite)" if not torch.isfinite(images).all() else ""
        where = f", e.g. {bad[0]!r}" if bad else " on another rank"
        raise ValueError(f"reward_fn returned non-finite rewards for {n_bad} images{hint}{where}")
    return rewards, info or {}


def check_finite(row: dict[str, float], step: int, ranks, out: Path) -> None:
    """Stop training with a clear error when a loss of this step is not finite, before the step is
    logged or saved (so ``out`` keeps the last good checkpoint). Every rank must call it: the verdict
    is shared, so no rank is left waiting in a collective."""
    keys = [k for k in row if k == "loss" or k.endswith("_loss")]
    bad = float(sum(not math.isfinite(float(row[k])) for k in keys))
    if ranks.active:
        bad = float(ranks.all_sum(torch.tensor(bad, dtype=torch.float64)))
    if bad:
        values = ", ".join(f"{k}={float(row[k]):.4g}" for k in keys)
        raise FloatingPointError(
            f"a non-finite loss at step {step} ({values}): training stopped before this step was logged "
            f"or saved, and {out} keeps its last checkpoint. Usual causes: a learning rate too high, or "
            "half-precision weights (try --dtype float32)."
        )


def record_step(rows: list[dict], row: dict[str, float], step: int, ranks, out: Path, logger) -> None:
    """Book one training step: stop on a non-finite loss (:func:`check_finite`, every rank), log the
    row (main process) and append it to ``rows``."""
    check_finite(row, step, ranks, out)
    if ranks.is_main:
        logger.log(step, row)
    rows.append({"step": step, **row})


# ---- data parallelism (Hugging Face Accelerate): see t2ialign.algorithms.parallel -----------------

from t2ialign.algorithms.parallel import Ranks  # noqa: E402  (used above; the trainers import it here)
