"""CLIP, loaded by ``transformers`` from a local folder, as a frozen reward-model backbone.

The folder is what ``CLIPModel.save_pretrained`` and the tokenizer's ``save_pretrained`` write
(``config.json``, weights, tokenizer files, optionally ``preprocessor_config.json``); nothing is ever
downloaded (``local_files_only``). Images are preprocessed as ``CLIPImageProcessor`` does, but with
differentiable torch operations so that rewards have gradients with respect to the pixels:

1. resize so that the shorter side is ``size`` (bicubic, antialiased; clamped back to [0, 1]);
2. centre-crop to ``crop_size``;
3. normalise with ``image_mean`` / ``image_std``.

``size``, ``crop_size``, ``image_mean`` and ``image_std`` come from ``preprocessor_config.json`` when
the folder has one, else from the vision config's ``image_size`` and OpenAI CLIP's statistics.
Needs the ``hf`` extra: ``pip install 't2ialign[hf]'``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from t2ialign.models.generator import CheckpointError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _features(out) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose ``pooler_output`` is
    the projected embedding (transformers 5)."""
    if torch.is_tensor(out):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"unexpected output of CLIP's feature method: {type(out).__name__}")
    return pooled


def _side(v, default: int) -> int:
    if v is None:
        return default
    if isinstance(v, int):
        return v
    if isinstance(v, dict):
        for key in ("shortest_edge", "height", "width"):
            if key in v:
                return int(v[key])
    raise CheckpointError(f"cannot read an image size from {v!r} in preprocessor_config.json")


class CLIPBackbone(nn.Module):
    """A frozen ``transformers.CLIPModel`` with the reward backbone interface."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        super().__init__()
        try:
            from transformers import AutoTokenizer, CLIPModel
        except ImportError:
            raise ImportError("the CLIP backbone needs transformers: pip install 't2ialign[hf]'") from None
        from t2ialign.reward.model import weights_fingerprint

        self.path = Path(path).resolve()
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path}: not a CLIP folder (no config.json)")
        try:
            self.model = CLIPModel.from_pretrained(self.path, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{self.path}: cannot load CLIP from this folder ({e})") from None
        self.model = self.model.float().to(device).eval().requires_grad_(False)
        self.fingerprint = weights_fingerprint(self.path)
        cfg = self.model.config
        self.embed_dim = int(cfg.projection_dim)
        self.max_length = int(cfg.text_config.max_position_embeddings)
        self._checked: set[str] = set()  # prompts whose length was checked
        pre = {}
        if (self.path / "preprocessor_config.json").is_file():
            try:
                pre = json.loads((self.path / "preprocessor_config.json").read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(
                    f"{self.path}/preprocessor_config.json: not valid JSON ({e.msg})"
                ) from None
        native = int(cfg.vision_config.image_size)
        self.size = _side(pre.get("size"), native)
        self.crop = _side(pre.get("crop_size"), native)
        mean = pre.get("image_mean", OPENAI_CLIP_MEAN)
        std = pre.get("image_std", OPENAI_CLIP_STD)
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.to(device)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) -> CLIP pixel values (B, 3, crop, crop), differentiably."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0)
        top, left = (nh - self.crop) // 2, (nw - self.crop) // 2
        if top < 0 or left < 0:  # crop larger than the resized image: pad as the processor does
            x = F.pad(x, (max(0, -left), max(0, -left), max(0, -top), max(0, -top)))
            top, left = max(0, top), max(0, left)
        x = x[..., top : top + self.crop, left : left + self.crop]
        return (x - self.mean) / self.std

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings (B, projection_dim), differentiable w.r.t. the pixels."""
        return F.normalize(
            _features(self.model.get_image_features(pixel_values=self.preprocess(images))), dim=-1
        )

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings (B, projection_dim). A prompt longer than CLIP's
        ``max_length`` tokens is truncated to its first tokens, with a warning (once per prompt)."""
        self._warn_truncated(prompts)
        enc = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        return F.normalize(_features(self.model.get_text_features(**enc)), dim=-1)

    def _warn_truncated(self, prompts) -> None:
        new = [p for p in dict.fromkeys(prompts) if p not in self._checked]
        if not new:
            return
        ids = self.tokenizer(new, truncation=False, verbose=False)["input_ids"]
        for p, t in zip(new, ids, strict=True):
            self._checked.add(p)
            if len(t) > self.max_length:
                warnings.warn(
                    f"CLIP ({self.path.name}) reads at most {self.max_length} tokens; this prompt has "
                    f"{len(t)} and is truncated: {p!r:.120}",
                    stacklevel=3,
                )

    def reference(self) -> dict:
        return {
            "type": "clip",
            "path": str(self.path),
            "fingerprint": self.fingerprint,
            "embed_dim": self.embed_dim,
        }
