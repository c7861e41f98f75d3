"""The backend interface: everything an algorithm sees of a text-to-image model.

Algorithms (``t2ialign.algorithms``) never touch the shapes world or a diffusers pipeline directly;
they call these methods, so the same trainer runs on the embedded model and on SD 1.5 / SDXL / SD3 /
FLUX. Two kinds of model fit it, told apart by ``prediction``:

- ``"flow"``: rectified flow (the embedded model, SD3, FLUX). The network output is the velocity
  ``v = eps - x0``; ``x_s = (1 - s) x0 + s eps``; the stochastic step is Flow-GRPO's SDE.
- ``"epsilon"``: DDPM-family models (SD 1.5, SDXL). The output is ``eps``; ``x_s`` follows the
  scheduler's alphas at the discrete timestep nearest ``s``; the stochastic step is DDIM with
  ``eta = 1`` (DDPO's policy).

In both, ``s`` in [0, 1] is the noise level (1 = pure noise) and ``x`` lives in the model's latent
space (pixels scaled to [-1, 1] for the embedded model, VAE latents for diffusers).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

import torch
from torch import nn


class Backend(Protocol):
    prediction: str  # "flow" or "epsilon"
    latent_shape: tuple[int, ...]  # (C, H, W) of x
    device: torch.device
    model_id: str

    def encode(self, prompts: list[str]) -> Any:
        """Prompt conditioning (no gradient; frozen text encoder, cached where possible). The result
        supports ``len``, ``.index(idx)`` and ``.repeat_interleave(n)``."""

    def predict(self, x_s: torch.Tensor, s: torch.Tensor, cond: Any, guidance: float = 1.0) -> torch.Tensor:
        """The network output at noise level s (B,), with classifier-free guidance when != 1."""

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The forward process: x_s from x0 and eps."""

    def target(self, x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """What ``predict`` should output for (x0, eps, s): ``eps - x0`` or ``eps``."""

    def predict_x0(self, out: torch.Tensor, x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x0_hat from a network output (differentiable)."""

    def timesteps(self, steps: int) -> torch.Tensor:
        """The sampling grid s_0 = 1 > ... > s_steps = 0 (steps + 1 values)."""

    def ode_step(self, out: torch.Tensor, s, s_next, x: torch.Tensor) -> torch.Tensor:
        """Deterministic step (Euler for flow, DDIM eta = 0 for epsilon)."""

    def stochastic_step(
        self,
        out: torch.Tensor,
        s,
        s_next,
        x: torch.Tensor,
        noise: torch.Tensor | None = None,
        x_next: torch.Tensor | None = None,
    ):
        """Stochastic policy step -> (x_next, log_prob (B,), mean, std); with ``x_next`` given, its
        log-probability under the step's Gaussian (no noise drawn)."""

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (B, C, H, W), differentiable (C = 3 for image models; the 2-D
        gym's "images" are (B, 2, 1, 1)). Trainers pass them to the reward and assume no more."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, C, H, W), as ``decode`` returns them -> latents x0."""

    def denoiser(self) -> nn.Module:
        """The trainable network (LoRA-wrapped after ``enable_lora``)."""

    def enable_lora(self, rank: int, alpha: float) -> None:
        """Wrap the denoiser with LoRA adapters (peft); only they are trainable afterwards."""

    def reference(self) -> AbstractContextManager:
        """Within this context, ``predict`` is the frozen reference model (adapters disabled or
        the initial weights)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimiser trains: the whole denoiser, or its LoRA adapters."""

    def snapshot_reference(self) -> None:
        """Freeze a copy of the current denoiser as the reference model of :meth:`reference` (full
        fine-tuning; LoRA's reference is the denoiser with its adapters disabled)."""

    def state_dict_trainable(self) -> dict[str, torch.Tensor]:
        """Copies of the trainable parameters by name (checkpoints, EMA, the rank-0 broadcast)."""

    def load_state_dict_trainable(self, state: dict[str, torch.Tensor]) -> None:
        """Write parameters by name, as :meth:`state_dict_trainable` returns them."""

    @property
    def lora_enabled(self) -> bool:
        """Whether ``enable_lora`` has run (only the adapters train)."""

    def save(self, folder: str, card: dict | None = None, denoiser_state: dict | None = None) -> None:
        """Save the fine-tuned model so that the project's loaders (or diffusers) read it;
        ``denoiser_state`` (full tensors gathered from FSDP shards) replaces the live denoiser's
        weights."""


def denoising_loss(
    backend: Backend,
    x0: torch.Tensor,
    cond: Any,
    eps: torch.Tensor,
    s: torch.Tensor,
    guidance: float = 1.0,
) -> torch.Tensor:
    """The "likelihood" surrogate every method uses, per sample (B,):
    L(x0, c) = mean_dims || out_theta(x_s, s, c) - target(x0, eps) ||^2 (the flow-matching loss
    ``|| v_theta - (eps - x0) ||^2`` for flow models, the epsilon loss for DDPM models).

    With ``guidance`` w != 1 the output is the guided one, out_u + w (out_c - out_u), gradients
    through both branches: the loss of samples that were drawn with guidance w. Fitting the plain
    conditional output to such samples compounds guidance (the tuned model sampled at w then acts
    like one sampled at about w^2 and drifts: over-saturated colours, lost objects)."""
    out = backend.predict(backend.add_noise(x0, eps, s), s, cond, guidance=guidance)
    return (out - backend.target(x0, eps, s)).pow(2).flatten(1).mean(1)


@contextmanager
def adapters_disabled(net: nn.Module):
    """Within this context, every peft LoRA layer of ``net`` is switched off (``net`` is then the
    model it was before the adapters were injected): the reference model of LoRA fine-tuning."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in net.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def resharded(net: nn.Module) -> nn.Module:
    """``net`` with every FSDP2 unit in it resharded (a no-op for an unsharded module). FSDP2 keeps
    a unit's parameters gathered after a forward pass with no backward (the root always), and
    ``named_parameters`` then yields those full tensors instead of the ``DTensor`` shards that the
    optimiser holds; read or write the weights by name only after this."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without torch.distributed
        return net
    for m in net.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return net
