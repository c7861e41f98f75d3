"""SD3 and FLUX: flow-matching transformers (rectified flow, the Flow-GRPO SDE).

Diffusers' flow-matching models already use the project's convention: the scheduler's ``sigma`` is
the noise level ``s`` (``x_s = (1 - s) x0 + s eps``) and the transformer predicts ``v = eps - x0``.
SD3's transformer takes ``timestep = 1000 s``; FLUX's takes ``s`` (it scales by 1000 inside), works
on 2 x 2 packed latents with positional ids, and, when guidance-distilled (``guidance_embeds``, FLUX
dev), takes the guidance scale as an input instead of running classifier-free guidance.

:meth:`FlowBackend.timesteps` is the grid the pipeline itself samples on (SD3: the scheduler's
static shift; FLUX: ``linspace(1, 1/N, N)`` through the resolution-dependent shift ``mu``), with a
final 0. The stochastic step is :func:`t2ialign.sampling.flow.sde_step`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from t2ialign.backends.diffusers_backend import DiffusersBackend, TextCond
from t2ialign.sampling import flow

log = logging.getLogger(__name__)


def cudnn_attention_unsafe(device_type: str, head_dim: int) -> bool:
    """Whether cuDNN's attention must be left out for a denoiser with this attention head dimension.

    On CUDA, cuDNN's attention backward returned garbage gradients (about 1e37, or NaN) at head
    dimension 16 while its forward was right; flash, memory-efficient and math attention were exact,
    and so was cuDNN at head dimensions 64 and 128 (H100, torch 2.11 + CUDA 13, cuDNN 9.19;
    docs/RESULTS.md, "FLUX bf16 NaN on CUDA"). The real SD3 and FLUX models (64 and 128) are not
    affected; tiny test models are.
    """
    return device_type == "cuda" and head_dim < 64


class FlowBackend(DiffusersBackend):
    """A StableDiffusion3Pipeline (``family="sd3"``) or FluxPipeline (``"flux"``).

    ``sde_a`` is Flow-GRPO's noise scale ``a`` (0.7 published); ``max_sequence_length`` the T5
    token count (default: the pipeline's, 256 for SD3 and 512 for FLUX); ``embedded_guidance`` the
    guidance scale fed to a guidance-distilled FLUX when ``predict`` is called with guidance 1.
    """

    prediction = "flow"
    denoiser_name = "transformer"
    default_lora_targets = (
        "to_k",
        "to_q",
        "to_v",
        "to_out.0",
        "add_k_proj",
        "add_q_proj",
        "add_v_proj",
        "to_add_out",
    )

    def __init__(
        self,
        pipe,
        model_id: str,
        family: str = "sd3",
        sde_a: float = 0.7,
        max_sequence_length: int | None = None,
        embedded_guidance: float = 3.5,
        **kw,
    ):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if family not in ("sd3", "flux"):
            raise ValueError(f"FlowBackend is for the sd3 and flux families, got {family!r}")
        self.family = family
        if family == "flux":
            self.latent_multiple = 2
        super().__init__(pipe, model_id, **kw)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.sde_a = float(sde_a)
        self.max_sequence_length = int(max_sequence_length or (256 if family == "sd3" else 512))
        self.embedded_guidance = float(embedded_guidance)
        self.guidance_embeds = family == "flux" and bool(self.net.config.get("guidance_embeds", False))
        self._grids: dict[int, torch.Tensor] = {}
        head_dim = int(self.net.config.get("attention_head_dim", 64))
        if cudnn_attention_unsafe(self.device.type, head_dim) and torch.backends.cuda.cudnn_sdp_enabled():
            # process-wide, so that gradient checkpointing's recomputation picks the same kernel
            torch.backends.cuda.enable_cudnn_sdp(False)
            log.warning(
                "attention head dimension %d < 64 on CUDA: cuDNN attention turned off for this "
                "process (its backward returns garbage gradients there)",
                head_dim,
            )

    def default_resolution(self) -> int:
        if self.family == "flux":
            return 128 * self.vae_scale_factor  # FluxPipeline.default_sample_size
        return int(self.pipe.transformer.config.sample_size) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        c = int(self.pipe.transformer.config.in_channels)
        return c // 4 if self.family == "flux" else c

    # -- conditioning -----------------------------------------------------------------------------
    def _encode_batch(self, prompts):
        if self.family == "sd3":
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                prompt_3=None,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
        else:
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
        return {"embeds": embeds, "pooled": pooled}

    # -- the grid ---------------------------------------------------------------------------------
    def image_seq_len(self) -> int:
        _, h, w = self.latent_shape
        p = 2 if self.family == "flux" else int(self.net.config.patch_size)
        return (h // p) * (w // p)

    def shift_mu(self) -> float | None:
        """The resolution-dependent shift of schedulers with ``use_dynamic_shifting`` (else None)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.scheduler.config
        if not c.get("use_dynamic_shifting", False):
            return None
        return calculate_shift(
            self.image_seq_len(),
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15 if self.family == "flux" else 1.16),
        )

    def timesteps(self, steps: int) -> torch.Tensor:
        """The pipeline's sampling grid s_0 = 1 > ... > s_steps = 0 (steps + 1 values)."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if steps not in self._grids:
            kw = {}
            mu = self.shift_mu()
            if mu is not None:
                kw["mu"] = mu
            if self.family == "flux":
                kw["sigmas"] = np.linspace(1.0, 1 / steps, steps)
                self.scheduler.set_timesteps(device="cpu", **kw)
            else:
                self.scheduler.set_timesteps(steps, device="cpu", **kw)
            self._grids[steps] = self.scheduler.sigmas.to(torch.float32).to(self.device)
        return self._grids[steps].clone()

    # -- the network ------------------------------------------------------------------------------
    def predict(self, x_s: torch.Tensor, s, cond: TextCond, guidance: float = 1.0) -> torch.Tensor:
        """The velocity v = eps - x0 at noise level s, with classifier-free guidance when != 1
        (for a guidance-distilled FLUX, ``guidance`` goes to the guidance embedding instead)."""
        s = self._s(s, x_s)
        if guidance != 1.0 and not self.guidance_embeds:
            both = TextCond.cat([self.uncond(x_s.shape[0]), cond])
            v_u, v_c = self._net(torch.cat([x_s, x_s]), torch.cat([s, s]), both, 1.0).chunk(2)
            return flow.cfg(v_u, v_c, guidance)
        return self._net(x_s, s, cond, guidance)

    def velocity(self, x_s, s, cond, guidance: float = 1.0):
        """Alias of :meth:`predict` (the samplers in ``t2ialign.sampling`` call ``velocity``)."""
        return self.predict(x_s, s, cond, guidance)

    def _net(self, x: torch.Tensor, s: torch.Tensor, cond: TextCond, guidance: float) -> torch.Tensor:
        dt = self.dtype
        embeds, pooled = cond["embeds"].to(dt), cond["pooled"].to(dt)
        with self.autocast():
            if self.family == "sd3":
                return self.net(
                    hidden_states=x.to(dt),
                    timestep=(s * 1000).to(dt),
                    encoder_hidden_states=embeds,
                    pooled_projections=pooled,
                ).sample.float()
            from diffusers import FluxPipeline

            b, c, h, w = x.shape
            packed = FluxPipeline._pack_latents(x.to(dt), b, c, h, w)
            img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dt)
            txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dt)
            g = None
            if self.guidance_embeds:
                value = self.embedded_guidance if guidance == 1.0 else guidance
                g = torch.full((b,), float(value), device=x.device, dtype=torch.float32)
            out = self.net(
                hidden_states=packed,
                timestep=s.to(dt),
                guidance=g,
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=txt_ids,
                img_ids=img_ids,
            ).sample
        out = out.float().view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)

    # -- the math of the forward and reverse processes --------------------------------------------
    def add_noise(self, x0, eps, s):
        return flow.add_noise(x0, eps, self._s(s, x0))

    def target(self, x0, eps, s):
        return flow.velocity_target(x0, eps)

    def predict_x0(self, out, x_s, s):
        return flow.x0_from_velocity(out, x_s, self._s(s, x_s))

    def ode_step(self, out, s, s_next, x):
        return flow.euler_step(out, s, s_next, x)

    def stochastic_step(self, out, s, s_next, x, noise=None, x_next=None, s_cap: float | None = None):
        """Flow-GRPO's SDE step -> (x_next, log_prob (B,), mean, std). At s = 1, sigma's denominator
        uses ``s_cap``, by default ``s_next`` (the first grid point below 1, as the reference code)."""
        if s_cap is None:
            s_cap = float(torch.as_tensor(s_next).flatten()[0])
        return flow.sde_step(out, s, s_next, x, self.sde_a, s_cap, noise=noise, x_next=x_next)
