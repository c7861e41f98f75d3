"""What the diffusers backends share (see :mod:`t2ialign.backends.base` for the interface).

A backend wraps a loaded diffusers pipeline: the frozen VAE and text encoders, and the denoiser
(UNet or transformer) that algorithms train, fully or through LoRA adapters (peft, through diffusers'
own ``add_adapter``). Prompts are encoded once with the pipeline's ``encode_prompt`` and cached.
``x`` is always an unpacked VAE latent (B, C, H, W), scaled as the pipeline scales it.

Subclasses: :class:`t2ialign.backends.diffusers_eps.EpsBackend` (SD 1.5, SDXL) and
:class:`t2ialign.backends.diffusers_flow.FlowBackend` (SD3, FLUX). Build them with
:func:`t2ialign.backends.loader.load_backend`.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from t2ialign.backends.base import resharded

LORA_CARD_KIND = "t2ialign-diffusers-lora"
FULL_CARD_KIND = "t2ialign-diffusers"


@dataclass
class TextCond:
    """Encoded prompts: named tensors that all have the batch first (``embeds`` (B, L, D), and
    ``pooled`` (B, P) for SDXL, SD3 and FLUX)."""

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def index(self, idx) -> TextCond:
        return TextCond({k: v[idx] for k, v in self.tensors.items()})

    def repeat_interleave(self, n: int) -> TextCond:
        return TextCond({k: v.repeat_interleave(n, 0) for k, v in self.tensors.items()})

    def detach(self) -> TextCond:
        return TextCond({k: v.detach() for k, v in self.tensors.items()})

    def to(self, device) -> TextCond:
        return TextCond({k: v.to(device) for k, v in self.tensors.items()})

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    @staticmethod
    def cat(conds: list[TextCond]) -> TextCond:
        return TextCond({k: torch.cat([c.tensors[k] for c in conds]) for k in conds[0].tensors})


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class DiffusersBackend:
    """Shared machinery of the diffusers backends.

    Arguments: ``pipe`` a loaded pipeline; ``model_id`` a name for cards (the folder path);
    ``device``; ``dtype`` the storage dtype of the frozen weights (float32, bfloat16 or float16:
    the network then runs under ``torch.autocast`` and trainable weights stay in float32);
    ``gradient_checkpointing`` on the denoiser; ``resolution`` in pixels (default: the pipeline's);
    ``cache_size`` how many encoded prompts to keep; ``lora_targets`` the module names (suffixes) that
    :meth:`enable_lora` adapts and ``lora_init`` peft's ``init_lora_weights`` (``True``: B = 0,
    ``"gaussian"`` as diffusers' and Flow-GRPO's scripts).
    """

    family = ""  # "sd", "sdxl", "sd3" or "flux"
    prediction = ""
    denoiser_name = "unet"
    default_lora_targets: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")

    def __init__(
        self,
        pipe,
        model_id: str,
        base_path: str | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
        gradient_checkpointing: bool = False,
        resolution: int | None = None,
        cache_size: int = 1024,
        lora_targets: list[str] | None = None,
        lora_init: str | bool = True,
    ):
        self.pipe = pipe
        self.model_id = str(model_id)
        self.base_path = str(base_path or model_id)
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype
        self.cache_size = cache_size
        self.lora_targets = list(lora_targets) if lora_targets else list(self.default_lora_targets)
        self.lora_init = lora_init
        self._cache: OrderedDict[str, TextCond] = OrderedDict()
        self._lora: dict | None = None
        self._ref: nn.Module | None = None
        vae = pipe.vae
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.vae_dtype = torch.float32 if dtype == torch.float16 and vae.config.get("force_upcast") else dtype
        for name, comp in pipe.components.items():
            if isinstance(comp, nn.Module):
                comp.requires_grad_(False).eval()
                want = self.vae_dtype if name == "vae" else dtype
                if any(p.dtype != want for p in comp.parameters() if p.is_floating_point()):
                    comp.to(self.device, dtype=want)
                else:
                    comp.to(self.device)
        self.net: nn.Module = getattr(pipe, self.denoiser_name)
        self._net_cls = type(self.net)  # FSDP2 swaps the class of a sharded module
        if gradient_checkpointing:
            self.net.enable_gradient_checkpointing()
        self.resolution = int(resolution or self.default_resolution())
        if self.resolution % (self.vae_scale_factor * self.latent_multiple) != 0:
            raise ValueError(
                f"resolution {self.resolution} must be a multiple of "
                f"{self.vae_scale_factor * self.latent_multiple} for this model"
            )

    latent_multiple = 1  # the latent side must be a multiple of this (2 for FLUX's packing)

    # -- to be provided by subclasses ---------------------------------------------------------------
    def default_resolution(self) -> int:
        raise NotImplementedError

    def _encode_batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # -- identity and shapes ----------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (self.latent_channels, side, side)

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.vae.config.latent_channels)

    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    def autocast(self):
        """Mixed precision for the network (a no-op in float32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # -- conditioning -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextCond:
        """Prompt conditioning from the frozen text encoders, cached per prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        for i in range(0, len(missing), 32):
            chunk = missing[i : i + 32]
            enc = self._encode_batch(chunk)
            for j, p in enumerate(chunk):
                self._cache[p] = TextCond({k: v[j : j + 1].detach().clone() for k, v in enc.items()})
        for p in prompts:
            self._cache.move_to_end(p)
        out = TextCond.cat([self._cache[p] for p in prompts])
        while len(self._cache) > max(self.cache_size, len(set(prompts))):
            self._cache.popitem(last=False)
        return out

    def prompt_limits(self) -> list[tuple[str, object, int]]:
        """(name, tokenizer, most tokens it passes on) of each of the pipeline's tokenizers: a CLIP
        tokenizer's ``model_max_length`` (77 for the real models), T5's ``max_sequence_length``."""
        t5 = {"sd3": "tokenizer_3", "flux": "tokenizer_2"}.get(self.family)
        out = []
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            tok = getattr(self.pipe, name, None)
            if tok is None:
                continue
            limit = int(getattr(self, "max_sequence_length", 0)) if name == t5 else int(tok.model_max_length)
            out.append((name, tok, limit))
        return out

    def overlong_prompts(self, prompts: list[str]) -> list[dict]:
        """The prompts that a text encoder of this pipeline would cut: one dict per (prompt,
        tokenizer) with ``prompt``, ``tokenizer``, ``tokens`` (with the special tokens) and
        ``limit``. The pipeline keeps the first ``limit`` tokens (diffusers' ``encode_prompt``)."""
        out = []
        for name, tok, limit in self.prompt_limits():
            for p in dict.fromkeys(prompts):
                n = len(tok(p, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])
                if n > limit:
                    out.append({"prompt": p, "tokenizer": name, "tokens": n, "limit": limit})
        return out

    def uncond(self, n: int) -> TextCond:
        """The unconditional input of classifier-free guidance (the empty prompt)."""
        return self.encode([""]).repeat_interleave(n)

    # -- VAE --------------------------------------------------------------------------------------
    def _vae_shift(self) -> float:
        return float(self.pipe.vae.config.get("shift_factor") or 0.0)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (B, 3, H, W), differentiable."""
        vae = self.pipe.vae
        z = x / vae.config.scaling_factor + self._vae_shift()
        with self.autocast():
            img = vae.decode(z.to(self.vae_dtype)).sample
        return ((img.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) -> latents x0 (the mean of the VAE's posterior)."""
        vae = self.pipe.vae
        side = self.resolution
        if images.shape[-2:] != (side, side):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, this backend works at {side} x {side}")
        out = []
        for chunk in images.split(16):
            with self.autocast():
                mean = vae.encode((chunk * 2 - 1).to(self.device, self.vae_dtype)).latent_dist.mean
            out.append((mean.float() - self._vae_shift()) * vae.config.scaling_factor)
        return torch.cat(out)

    # -- the network ------------------------------------------------------------------------------
    def _s(self, s, x: torch.Tensor) -> torch.Tensor:
        """Noise levels as a float32 (B,) tensor on the device."""
        return torch.as_tensor(s, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])

    # -- fine-tuning ------------------------------------------------------------------------------
    def enable_lora(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        target_modules: list[str] | None = None,
        init: str | bool | None = None,
    ) -> None:
        """LoRA adapters (peft, through diffusers' ``add_adapter``) on the denoiser's attention
        projections (``lora_targets``); only they train, in float32."""
        from peft import LoraConfig

        if self._lora is not None:
            raise RuntimeError("LoRA is already enabled on this backend")
        targets = list(target_modules or self.lora_targets)
        init = self.lora_init if init is None else init
        cfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=targets)
        self.net.requires_grad_(False)
        self.net.add_adapter(cfg)
        for p in self.net.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self._lora = {"rank": rank, "alpha": alpha, "target_modules": targets}

    @property
    def lora_enabled(self) -> bool:
        return self._lora is not None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def snapshot_reference(self) -> None:
        """Freeze a copy of the current denoiser as the reference (full fine-tuning; LoRA needs no
        copy). The live denoiser is kept in float32 for training."""
        self._ref = copy.deepcopy(self.net).requires_grad_(False).eval()
        if self.net.dtype != torch.float32:
            self.net.float()

    @contextlib.contextmanager
    def reference(self):
        """Within this context ``predict`` runs the frozen reference model."""
        if self._lora is not None:
            self.net.disable_adapters()
            try:
                yield self
            finally:
                self.net.enable_adapters()
        else:
            if self._ref is None:
                self.snapshot_reference()
            live = self.net
            self.net = self._ref
            try:
                yield self
            finally:
                self.net = live

    def state_dict_trainable(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in resharded(self.net).named_parameters() if v.requires_grad}

    def load_state_dict_trainable(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(resharded(self.net).named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def lora_state_dict(self, denoiser_state: dict | None = None) -> dict[str, torch.Tensor]:
        """The adapters' weights in the (peft) format of diffusers' training scripts (read from
        ``denoiser_state`` when given, e.g. gathered by an FSDP run)."""
        from peft.utils import get_peft_model_state_dict

        if self._lora is None:
            raise RuntimeError("LoRA is not enabled on this backend")
        state = get_peft_model_state_dict(self.net, state_dict=denoiser_state)
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    def save(self, folder, card: dict | None = None, denoiser_state: dict | None = None) -> None:
        """With LoRA: ``pytorch_lora_weights.safetensors`` written by the pipeline class's
        ``save_lora_weights`` (what ``pipe.load_lora_weights(folder)`` reads, rank and alpha in its
        metadata). Full fine-tuning: the whole pipeline (``save_pretrained``). Both with a
        ``card.json`` that :func:`~t2ialign.backends.loader.load_backend` reads.

        ``denoiser_state``: the denoiser's weights gathered by an FSDP run (the adapters' with LoRA,
        the full state dict otherwise), saved in place of the live denoiser's shards."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        info = {"backend": self.family, "base_path": self.base_path, "base_model": self.model_id}
        if self._lora is not None:
            self._save_lora(folder, denoiser_state)
            info.update(kind=LORA_CARD_KIND, lora=self._lora)
        elif denoiser_state is None:
            self.pipe.save_pretrained(str(folder))
            info.update(kind=FULL_CARD_KIND)
        else:
            self._save_full_from_state(folder, denoiser_state)
            info.update(kind=FULL_CARD_KIND)
        info.update(card or {})
        info["kind"] = LORA_CARD_KIND if self._lora is not None else FULL_CARD_KIND
        (folder / "card.json").write_text(json.dumps(info, indent=2, default=str) + "\n")

    def _save_full_from_state(self, folder: Path, state: dict) -> None:
        """``save_pretrained`` with an unsharded denoiser rebuilt from ``state`` in place of the live
        (sharded) one."""
        from accelerate import init_empty_weights

        with init_empty_weights():
            plain = self._net_cls.from_config(self.net.config)
        plain.load_state_dict(state, assign=True)
        live = getattr(self.pipe, self.denoiser_name)
        setattr(self.pipe, self.denoiser_name, plain)
        try:
            self.pipe.save_pretrained(str(folder))
        finally:
            setattr(self.pipe, self.denoiser_name, live)

    def _save_lora(self, folder: Path, denoiser_state: dict | None = None) -> None:
        import inspect

        name = self.denoiser_name
        save = type(self.pipe).save_lora_weights
        state = self.lora_state_dict(denoiser_state)
        kw = {f"{name}_lora_layers": state}
        meta_key = f"{name}_lora_adapter_metadata"
        if meta_key in inspect.signature(save).parameters:
            kw[meta_key] = self.net.peft_config["default"].to_dict()
        else:  # diffusers before 0.34 reads no alpha: it loads with alpha = rank, so fold alpha / rank into B
            scale = self._lora["alpha"] / self._lora["rank"]
            for k, v in state.items():
                if "lora_B" in k:
                    state[k] = v * scale
        save(str(folder), **kw)

    def load_lora(self, folder, fuse: bool = True) -> None:
        """Load LoRA weights saved by :meth:`save` (or any diffusers LoRA) into the pipeline and,
        with ``fuse``, merge them into the denoiser's weights."""
        from diffusers.utils import logging as dlogging

        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # it warns about each text encoder that has no LoRA keys
        try:
            self.pipe.load_lora_weights(str(folder))
            if fuse:
                self.pipe.fuse_lora()
                self.pipe.unload_lora_weights()
        finally:
            dlogging.set_verbosity(level)
        self.net = getattr(self.pipe, self.denoiser_name)
        self.net.requires_grad_(False)
        self._cache.clear()
