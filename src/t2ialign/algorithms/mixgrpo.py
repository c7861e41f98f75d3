"""MixGRPO (Li et al. 2025, METHODS.md s. 2): Flow-GRPO with the SDE only inside a sliding window.

Sampling is stochastic (Flow-GRPO's SDE step, with log-probabilities) only on the ``w`` consecutive
steps ``[l, l + w)`` of the chain and the ODE elsewhere; only the window's steps are trained, so an
iteration costs ``w`` instead of ``T`` trained steps. The window starts at the highest noise
(``l = 0``) and moves ``window_stride`` steps towards low noise every ``window_shift_every``
iterations; at the end of the chain it rolls back to the start (the reference code's
``--roll_back``) or stays there:

    l(it) = (floor(it / shift_every) mod n_windows) * stride,   n_windows = floor((T - w) / stride) + 1

The loss is Flow-GRPO's (:func:`t2ialign.algorithms.grpo.ppo_clip_loss` per window step, plus
``beta * KL`` to the reference; the reference code uses beta = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from t2ialign.algorithms.common import RunLogger
from t2ialign.algorithms.grpo import GRPOConfig, train_group_policy


def window_start(
    iteration: int, steps: int, window_size: int, shift_every: int, stride: int = 1, roll_back: bool = True
) -> int:
    """The first step l of the SDE window at ``iteration`` (see the module docstring)."""
    last = steps - window_size
    shifts = iteration // shift_every
    if roll_back:
        return (shifts % (last // stride + 1)) * stride
    return min(shifts * stride, last)


@dataclass
class MixGRPOConfig(GRPOConfig):
    beta: float = 0.0
    """KL weight to the reference model (0 in the reference code's MixGRPO runs)."""
    window_size: int = 4
    """w, consecutive SDE (and trained) steps (4 published, of 25 sampling steps)."""
    window_shift_every: int = 10
    """Iterations between moves of the window (25 published, for 300 iterations)."""
    window_stride: int = 1
    """Steps the window moves each time (1 published)."""
    roll_back: bool = True
    """At the end of the chain the window returns to the first step (published); else it stays."""

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.window_size <= self.train_steps:
            raise ValueError(f"window_size must be in [1, train_steps], got {self.window_size}")
        if self.window_shift_every < 1 or self.window_stride < 1:
            raise ValueError("window_shift_every and window_stride must be at least 1")


def train_mixgrpo(
    backend,
    reward_fn,
    prompts: list[dict],
    cfg: MixGRPOConfig,
    out: str | Path,
    progress: bool = True,
    logger: RunLogger | None = None,
    accelerator=None,
) -> list[dict]:
    """Fine-tune ``backend`` in place with MixGRPO; resumes from ``out`` (the window is a function of
    the iteration). Arguments and log rows as :func:`t2ialign.algorithms.grpo.train_grpo`, plus
    ``window_start``. The final model is saved to ``out``."""

    def window(it: int) -> tuple[int, int]:
        first = window_start(
            it, cfg.train_steps, cfg.window_size, cfg.window_shift_every, cfg.window_stride, cfg.roll_back
        )
        return first, first + cfg.window_size

    return train_group_policy(
        backend, reward_fn, prompts, cfg, out, "mixgrpo", window, progress, logger, accelerator=accelerator
    )
