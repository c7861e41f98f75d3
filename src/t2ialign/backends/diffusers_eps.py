"""SD 1.5 and SDXL: UNets with epsilon or v prediction, DDIM with eta (DDPO's policy step).

The noise level ``s`` in [0, 1] maps to the scheduler's discrete timesteps as ``s = (t + 1) / T``
(T = ``num_train_timesteps``, 1000): ``s = 1`` is the noisiest timestep ``T - 1`` and ``s = 0`` is
the clean end of the chain (alpha_bar = the scheduler's ``final_alpha_cumprod``: 1 with
``set_alpha_to_one``, else ``alphas_cumprod[0]``, as diffusers' DDIM). Any ``s`` rounds to the
nearest timestep. :meth:`EpsBackend.timesteps` is the DDIM scheduler's own grid for the pipeline's
scheduler config (``timestep_spacing`` as configured, ``"leading"`` for SD 1.5, whose first grid
point is then ``(981 + 1) / 1000`` for 50 steps, not exactly 1), so a chain sampled here is the one
diffusers' ``DDIMScheduler`` samples.

The scheduler's ``clip_sample`` and ``thresholding`` (pixel-space options that the latent models'
configs switch off) are not applied.

``predict`` returns the network's own output (eps, or v for ``v_prediction`` models), and ``target``
the matching regression target, so ``denoising_loss`` is the model's training loss. The DDIM math is
:mod:`t2ialign.sampling.ddim`.
"""

from __future__ import annotations

import torch

from t2ialign.backends.diffusers_backend import DiffusersBackend, TextCond
from t2ialign.sampling import ddim
from t2ialign.sampling.flow import _bcast


class EpsBackend(DiffusersBackend):
    """A StableDiffusionPipeline (``family="sd"``) or StableDiffusionXLPipeline (``"sdxl"``).

    ``eta`` is the DDIM eta of :meth:`stochastic_step` (1: DDPO's DDPM policy);
    ``timestep_spacing`` overrides the scheduler config's (``"leading"``, ``"trailing"``,
    ``"linspace"``).
    """

    prediction = "epsilon"
    denoiser_name = "unet"

    def __init__(
        self,
        pipe,
        model_id: str,
        family: str = "sd",
        eta: float = 1.0,
        timestep_spacing: str | None = None,
        **kw,
    ):
        from diffusers import DDIMScheduler

        if family not in ("sd", "sdxl"):
            raise ValueError(f"EpsBackend is for the sd and sdxl families, got {family!r}")
        self.family = family
        super().__init__(pipe, model_id, **kw)
        extra = {"timestep_spacing": timestep_spacing} if timestep_spacing else {}
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **extra)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"unsupported prediction_type {self.prediction_type!r} (epsilon or v_prediction)"
            )
        self.eta = float(eta)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.final_alpha_cumprod = float(self.scheduler.final_alpha_cumprod)
        self._grids: dict[int, torch.Tensor] = {}

    def default_resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.unet.config.in_channels)

    # -- conditioning -----------------------------------------------------------------------------
    def _encode_batch(self, prompts):
        if self.family == "sd":
            embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
            return {"embeds": embeds}
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"embeds": embeds, "pooled": pooled}

    def uncond(self, n):
        if self.family == "sdxl" and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            c = self.encode([""])
            return TextCond({k: torch.zeros_like(v) for k, v in c.tensors.items()}).repeat_interleave(n)
        return super().uncond(n)

    # -- timesteps and alphas ---------------------------------------------------------------------
    def timestep_index(self, s, x: torch.Tensor) -> torch.Tensor:
        """The discrete timestep of each noise level, (B,) long; -1 is the clean end."""
        t = torch.round(self._s(s, x) * self.num_train_timesteps).long() - 1
        return t.clamp(-1, self.num_train_timesteps - 1)

    def alpha_bar(self, s, x: torch.Tensor) -> torch.Tensor:
        """alpha_bar at each noise level: (B,) float32."""
        t = self.timestep_index(s, x)
        ab = self.alphas_cumprod[t.clamp(min=0)]
        return torch.where(t >= 0, ab, torch.full_like(ab, self.final_alpha_cumprod))

    def timesteps(self, steps: int) -> torch.Tensor:
        """The DDIM grid: s_k = (t_k + 1) / T for the scheduler's timesteps, then 0."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if steps not in self._grids:
            self.scheduler.set_timesteps(steps)
            t = self.scheduler.timesteps.to(torch.float32)
            s = torch.cat([(t + 1) / self.num_train_timesteps, torch.zeros(1)])
            self._grids[steps] = s.to(self.device)
        return self._grids[steps].clone()

    # -- the network ------------------------------------------------------------------------------
    def predict(self, x_s: torch.Tensor, s, cond: TextCond, guidance: float = 1.0) -> torch.Tensor:
        """The UNet's output (eps or v) at noise level s, with classifier-free guidance when != 1."""
        t = self.timestep_index(s, x_s).clamp(min=0)
        if guidance != 1.0:
            both = TextCond.cat([self.uncond(x_s.shape[0]), cond])
            out_u, out_c = self._unet(torch.cat([x_s, x_s]), torch.cat([t, t]), both).chunk(2)
            return out_u + guidance * (out_c - out_u)
        return self._unet(x_s, t, cond)

    def _unet(self, x: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        kw = {}
        if self.family == "sdxl":
            r = float(self.resolution)
            time_ids = torch.tensor([r, r, 0.0, 0.0, r, r], device=x.device).expand(x.shape[0], 6)
            kw["added_cond_kwargs"] = {
                "text_embeds": cond["pooled"].to(self.dtype),
                "time_ids": time_ids.to(self.dtype),
            }
        with self.autocast():
            out = self.net(
                x.to(self.dtype), t, encoder_hidden_states=cond["embeds"].to(self.dtype), **kw
            ).sample
        return out.float()

    def eps_from_output(self, out: torch.Tensor, x_s: torch.Tensor, s) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return out
        ab = _bcast(self.alpha_bar(s, x_s), x_s)
        return ab.sqrt() * out + (1 - ab).sqrt() * x_s

    # -- the math of the forward and reverse processes --------------------------------------------
    def add_noise(self, x0, eps, s):
        ab = _bcast(self.alpha_bar(s, x0), x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def target(self, x0, eps, s):
        if self.prediction_type == "epsilon":
            return eps
        ab = _bcast(self.alpha_bar(s, x0), x0)
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0

    def predict_x0(self, out, x_s, s):
        ab = _bcast(self.alpha_bar(s, x_s), x_s)
        if self.prediction_type == "epsilon":
            return (x_s - (1 - ab).sqrt() * out) / ab.sqrt()
        return ab.sqrt() * x_s - (1 - ab).sqrt() * out

    def ode_step(self, out, s, s_next, x):
        """Deterministic DDIM (eta = 0)."""
        eps = self.eps_from_output(out, x, s)
        return ddim.ddim_deterministic_step(eps, self.alpha_bar(s, x), self.alpha_bar(s_next, x), x)

    def stochastic_step(self, out, s, s_next, x, noise=None, x_next=None):
        """DDIM with ``self.eta`` (1: the DDPM step of DDPO) -> (x_next, log_prob (B,), mean, std)."""
        eps = self.eps_from_output(out, x, s)
        return ddim.ddim_step(
            eps, self.alpha_bar(s, x), self.alpha_bar(s_next, x), x, self.eta, noise=noise, x_prev=x_next
        )
