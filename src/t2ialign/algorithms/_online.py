"""Helpers shared by the online trainers of this package (NFT, RAFT, ReFL / DRaFT).

Prompt batches, ODE sampling from the current (or a swapped-in) set of weights, and the small
checks every online trainer makes on its inputs. All randomness comes from a generator that the
caller makes with ``seeded(cfg.seed, iteration)``, so a resumed run draws the same batches.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from t2ialign.algorithms.common import Ranks, rollout
from t2ialign.backends.base import denoising_loss


def check_prompt_rows(prompts: list[dict]) -> None:
    """Online trainers take prompt rows (dicts with at least "prompt"), as ``suite()`` returns."""
    if not prompts:
        raise ValueError("no prompts to train on")
    for i, row in enumerate(prompts):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"prompt row {i} must be a dict with a 'prompt' string, got {row!r:.80}")


def pick_rows(prompts: list[dict], n: int, generator: torch.Generator) -> list[dict]:
    """``n`` prompt rows drawn without replacement (cycling through fresh permutations when ``n``
    exceeds the number of prompts)."""
    perms = [torch.randperm(len(prompts), generator=generator) for _ in range(math.ceil(n / len(prompts)))]
    return [prompts[int(i)] for i in torch.cat(perms)[:n]]


@torch.no_grad()
def sample_latents(
    backend, cond, n: int, steps: int, guidance: float, generator: torch.Generator, sampler: str = "ode"
) -> torch.Tensor:
    """x0 for ``n`` images (the conditioning already repeated to ``n``): Euler ODE (``"ode"``) or the
    backend's stochastic step at every step (``"sde"``). The starting noise and the SDE noise come
    from ``generator``."""
    x1 = torch.randn((n, *backend.latent_shape), generator=generator).to(backend.device)
    stochastic = torch.full((steps,), sampler == "sde", dtype=torch.bool)
    return rollout(backend, cond, x1, steps, guidance, stochastic=stochastic, generator=generator).x0


@contextlib.contextmanager
def swapped_weights(backend, state: dict[str, torch.Tensor]):
    """Within this context the trainable weights are ``state`` (for example an EMA copy); the live
    weights are restored on exit. The optimiser's state is not touched."""
    live = backend.state_dict_trainable()
    backend.load_state_dict_trainable(state)
    try:
        yield backend
    finally:
        backend.load_state_dict_trainable(live)


def scalar_info(info: dict, prefix: str = "reward/") -> dict[str, float]:
    """The plain numbers of a reward function's ``info`` dict, ready to log."""
    out = {}
    for k, v in (info or {}).items():
        if isinstance(v, bool | int | float):
            out[prefix + str(k)] = float(v)
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            out[prefix + str(k)] = float(v)
    return out


def check_pretrain(weight: float, batch_size: int, pretrain_source) -> bool:
    """Whether the pre-training term is on; raises when it is asked for without data."""
    if weight > 0 and batch_size > 0:
        if pretrain_source is None:
            raise ValueError("pretrain_weight > 0 needs pre-training data (pretrain_source), or set it to 0")
        return True
    return False


def pretrain_batch(
    backend,
    pretrain_source,
    step: int,
    batch_size: int,
    generator: torch.Generator,
    ranks: Ranks | None = None,
) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """Batch ``step`` of the pre-training data (the "keep fidelity" term), ready for
    ``denoising_loss``: (x0, cond, eps, s), this rank's share.

    With ``ranks`` of N > 1 processes, ``batch_size`` is per process: the source's batch ``step`` of
    N * batch_size is drawn, with N * batch_size noise draws from ``generator``, and this rank takes
    its contiguous share of both. When every rank passes a generator in the same state (ReFL, DRaFT)
    N processes x B see exactly what one process x N*B would; with a per-rank generator (NFT, RAFT)
    the images are the global batch's and the noise is the rank's own."""
    world = 1 if ranks is None else ranks.world
    n = batch_size * world
    mine = slice(0, n) if world == 1 else ranks.shard(n)
    images, texts = pretrain_source(step, n)
    x0 = backend.encode_images(images[mine].to(backend.device))
    eps = torch.randn((n, *x0.shape[1:]), generator=generator)[mine].to(backend.device)
    s = torch.rand(n, generator=generator)[mine].to(backend.device)
    return x0, backend.encode(list(texts)[mine]), eps, s


def pretrain_part(backend, batch, part: slice) -> torch.Tensor:
    """The mean denoising loss on the rows ``part`` of a :func:`pretrain_batch`, times the part's
    share of the batch: summed over a step's micro-batches, the batch's mean (the whole batch when
    ``part`` is all of it)."""
    x0, cond, eps, s = batch
    share = (part.stop - part.start) / x0.shape[0]
    return denoising_loss(backend, x0[part], cond.index(part), eps[part], s[part]).mean() * share
