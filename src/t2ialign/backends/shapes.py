"""The backend of the embedded world's flow model (see :mod:`t2ialign.backends.base`)."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from t2ialign.backends.base import adapters_disabled, resharded
from t2ialign.backends.flowmath import RectifiedFlowMath
from t2ialign.models.generator import Cond, Generator, save_generator
from t2ialign.sampling import flow

LORA_TARGETS = ["conv1", "conv2", "emb", "out_proj"]


class ShapesBackend(RectifiedFlowMath):
    """Wraps a :class:`~t2ialign.models.generator.Generator`. The text encoder is frozen; the UNet
    is the denoiser that algorithms train (fully, or through LoRA adapters).

    ``sde_a`` is Flow-GRPO's noise scale ``a`` of the stochastic step (0.7 as published).
    """

    prediction = "flow"
    merges_lora_on_save = True  # save() needs the whole UNet, not just the adapters

    def __init__(self, generator: Generator, sde_a: float = 0.7):
        self.gen = generator
        self.gen.text.requires_grad_(False)
        self.sde_a = sde_a
        self._ref: nn.Module | None = None
        self._lora: dict | None = None  # rank and alpha once LoRA is enabled
        self._cache: dict[str, Cond] = {}

    # -- identity and shapes ----------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.gen.latent_shape

    @property
    def device(self) -> torch.device:
        return self.gen.device

    @property
    def model_id(self) -> str:
        return self.gen.model_id

    # -- conditioning -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        # One prompt at a time: batched encodings differ in the last float bits with the batch's
        # composition, and the cache would make a prompt's features depend on the call history.
        for p in dict.fromkeys(prompts):
            if p not in self._cache:
                enc = self.gen.encode([p])
                n = int(enc.mask[0].sum())
                self._cache[p] = Cond(enc.ctx[:, :n], enc.mask[:, :n])
        return Cond.cat([self._cache[p] for p in prompts])

    # -- the network ------------------------------------------------------------------------------
    def predict(self, x_s: torch.Tensor, s: torch.Tensor, cond: Cond, guidance: float = 1.0) -> torch.Tensor:
        s = torch.as_tensor(s, dtype=x_s.dtype, device=x_s.device).expand(x_s.shape[0])
        if guidance == 1.0:
            return self.gen.unet(x_s, s, cond.ctx, cond.mask)
        both = Cond.cat([cond, self.encode([""] * x_s.shape[0])])
        out = self.gen.unet(torch.cat([x_s, x_s]), torch.cat([s, s]), both.ctx, both.mask)
        v_c, v_u = out.chunk(2)
        return flow.cfg(v_u, v_c, guidance)

    def velocity(self, x_s, s, cond, guidance: float = 1.0):
        """Alias of :meth:`predict` (the samplers in ``t2ialign.sampling`` call ``velocity``)."""
        return self.predict(x_s, s, cond, guidance)

    def denoiser(self) -> nn.Module:
        return self.gen.unet

    # -- the math of the forward and reverse processes --------------------------------------------
    # add_noise, target, predict_x0, timesteps, ode_step, stochastic_step: RectifiedFlowMath

    def decode(self, x):
        return self.gen.decode(x)

    def encode_images(self, images):
        return self.gen.encode_images(images)

    # -- fine-tuning ------------------------------------------------------------------------------
    def enable_lora(self, rank: int = 8, alpha: float = 16.0) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        if self._lora is not None:
            raise RuntimeError("LoRA is already enabled on this backend")
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, lora_dropout=0.0)
        self.gen.unet.requires_grad_(False)
        inject_adapter_in_model(cfg, self.gen.unet)
        for name, p in self.gen.unet.named_parameters():
            p.requires_grad_("lora_" in name)
        self._lora = {"rank": rank, "alpha": alpha}

    @property
    def lora_enabled(self) -> bool:
        return self._lora is not None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.gen.unet.parameters() if p.requires_grad]

    def snapshot_reference(self) -> None:
        """Freeze a copy of the current denoiser as the reference (done automatically for full
        fine-tuning the first time :meth:`reference` is entered; LoRA needs no copy)."""
        self._ref = copy.deepcopy(self.gen.unet).requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference(self):
        if self._lora is not None:
            with adapters_disabled(self.gen.unet):
                yield self
        else:
            if self._ref is None:
                self.snapshot_reference()
            live = self.gen.unet
            self.gen.unet = self._ref
            try:
                yield self
            finally:
                self.gen.unet = live

    def merged_generator(self, denoiser_state: dict[str, torch.Tensor] | None = None) -> Generator:
        """A plain generator with any LoRA adapters merged into the weights. ``denoiser_state`` (the
        UNet's full state dict, LoRA weights included; what an FSDP run gathers) replaces the live
        UNet's weights, which are then shards."""
        if denoiser_state is None:
            g = copy.deepcopy(self.gen).cpu()
        else:
            g = Generator(self.gen.config, model_id=self.gen.model_id)
            g.text.load_state_dict(self.gen.text.state_dict())
            if self._lora is not None:
                from peft import LoraConfig, inject_adapter_in_model

                r, a = self._lora["rank"], self._lora["alpha"]
                cfg = LoraConfig(r=r, lora_alpha=a, target_modules=LORA_TARGETS, lora_dropout=0.0)
                inject_adapter_in_model(cfg, g.unet)
            g.unet.load_state_dict(denoiser_state)
        if self._lora is not None:
            from peft.tuners.lora import LoraLayer

            for m in list(g.unet.modules()):
                if isinstance(m, LoraLayer):
                    m.merge()
            state = {k: v for k, v in g.unet.state_dict().items() if "lora_" not in k}
            state = {k.replace(".base_layer.", "."): v for k, v in state.items()}
            plain = Generator(g.config, model_id=g.model_id)
            plain.text.load_state_dict(g.text.state_dict())
            plain.unet.load_state_dict(state)
            g = plain
        return g

    def save(self, folder, card: dict | None = None, denoiser_state: dict | None = None) -> None:
        """Save a generator folder that ``load_generator`` / ``t2ialign sample --model`` read
        (``denoiser_state``: see :meth:`merged_generator`)."""
        g = self.merged_generator(denoiser_state)
        save_generator(g, folder, card={"name": "shapes-finetuned", **(card or {})})

    def state_dict_trainable(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().clone() for k, v in resharded(self.gen.unet).named_parameters() if v.requires_grad
        }

    def load_state_dict_trainable(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(resharded(self.gen.unet).named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)
