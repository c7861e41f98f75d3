"""Sampling loops over any backend (``encode``, ``velocity``, ``decode``, ``latent_shape``).

The math of each step lives in :mod:`t2ialign.sampling.flow`; these loops only call the model.
Each image's starting noise comes from its own seed, so an image depends on its prompt and seed
alone, never on the batch it was drawn in.
"""

from __future__ import annotations

import numpy as np
import torch

from t2ialign.sampling.flow import euler_step, time_grid


def initial_noise(seeds: list[int], shape: tuple[int, ...], device=None) -> torch.Tensor:
    """x_1 ~ N(0, I), one generator per seed: (B, *shape)."""
    out = torch.empty(len(seeds), *shape)
    for i, sd in enumerate(seeds):
        out[i] = torch.randn(shape, generator=torch.Generator().manual_seed(int(sd)))
    return out.to(device)


def sample_ode(
    backend, cond, x1: torch.Tensor, steps: int = 20, guidance: float = 3.0, shift: float = 1.0
) -> torch.Tensor:
    """Euler ODE from s = 1 to 0 with classifier-free guidance: returns x_0 (B, C, H, W)."""
    grid = time_grid(steps, shift, device=x1.device)
    x = x1
    for k in range(steps):
        v = backend.velocity(x, grid[k], cond, guidance=guidance)
        x = euler_step(v, grid[k], grid[k + 1], x)
    return x


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample_backend(backend, cond, x1: torch.Tensor, steps: int = 20, guidance: float = 3.0) -> torch.Tensor:
    """The deterministic sampler of any backend (its ``timesteps`` grid and ``ode_step``: Euler for
    flow models, DDIM with eta = 0 for epsilon models), with classifier-free guidance: x_0."""
    grid = backend.timesteps(steps)
    x = x1
    for k in range(steps):
        out = backend.predict(x, grid[k], cond, guidance=guidance)
        x = backend.ode_step(out, grid[k], grid[k + 1], x)
    return x


@torch.no_grad()
def generate_images(
    model,
    prompts: list[str],
    seeds: list[int],
    steps: int = 20,
    guidance: float = 3.0,
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """Sample one image per (prompt, seed): uint8 (N, H, W, 3).

    ``model`` is a generator of the embedded world (sampled by the Euler ODE, :func:`sample_ode`)
    or any backend (:mod:`t2ialign.backends`: the shapes backend, SD 1.5 / SDXL / SD3 / FLUX),
    sampled by its own deterministic step (:func:`sample_backend`)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    is_backend = hasattr(model, "ode_step")
    out = []
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="sample", unit="batch")
    for i in starts:
        p, sd = prompts[i : i + batch_size], seeds[i : i + batch_size]
        cond = model.encode(p)
        x1 = initial_noise(sd, model.latent_shape, device=model.device)
        if is_backend:
            x0 = sample_backend(model, cond, x1, steps=steps, guidance=guidance)
        else:
            x0 = sample_ode(model, cond, x1, steps=steps, guidance=guidance)
        out.append(to_uint8(model.decode(x0)))
    if out:
        return np.concatenate(out)
    side = () if is_backend else model.latent_shape[1:]  # a backend's pixel size is known after decoding
    return np.zeros((0, *side, 3), np.uint8) if side else np.zeros((0, 0, 0, 3), np.uint8)
