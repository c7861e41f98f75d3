"""The embedded world's text-to-image model: tokenizer + text encoder + UNet, trained by rectified flow.

It implements the backend interface that every algorithm uses (``t2ialign.backends.base``):
``encode(prompts) -> Cond``, ``velocity(x_s, s, cond, guidance)``, ``decode(x) -> images in [0, 1]``,
``encode_images(images) -> x0`` and ``latent_shape``. Its latent space is pixel space scaled to
[-1, 1].

Presets: ``tiny`` (tests, a few thousand parameters) and ``small`` (the shipped model).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from t2ialign.models.text import TextEncoder, TextEncoderConfig, Tokenizer
from t2ialign.models.unet import UNet, UNetConfig


@dataclass
class GeneratorConfig:
    image_size: int = 32
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GeneratorConfig:
        u = dict(d["unet"])
        for k in ("channels", "attn_levels"):
            u[k] = tuple(u[k])
        return cls(image_size=d["image_size"], text=TextEncoderConfig(**d["text"]), unet=UNetConfig(**u))


def preset(name: str) -> GeneratorConfig:
    """Named sizes: ``tiny`` for tests, ``small`` for the shipped default."""
    vocab = Tokenizer().vocab_size
    if name == "tiny":
        return GeneratorConfig(
            text=TextEncoderConfig(vocab_size=vocab, dim=16, layers=1, heads=2),
            unet=UNetConfig(channels=(8, 16), attn_levels=(1,), heads=2, text_dim=16, groups=4),
        )
    if name == "small":
        return GeneratorConfig(
            text=TextEncoderConfig(vocab_size=vocab, dim=64, layers=2, heads=4),
            unet=UNetConfig(channels=(32, 64, 96), attn_levels=(2,), heads=4, text_dim=64),
        )
    raise ValueError(f"unknown preset {name!r}; known presets: tiny, small")


PRESETS = ("tiny", "small")


@dataclass
class Cond:
    """Encoded prompts: token features ``ctx`` (B, L, D) and ``mask`` (B, L)."""

    ctx: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.ctx.shape[0]

    def index(self, idx) -> Cond:
        return Cond(self.ctx[idx], self.mask[idx])

    def repeat_interleave(self, n: int) -> Cond:
        return Cond(self.ctx.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0))

    def detach(self) -> Cond:
        return Cond(self.ctx.detach(), self.mask)

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        L = max(c.ctx.shape[1] for c in conds)

        def pad(t, v):
            return torch.nn.functional.pad(
                t, (0, 0, 0, L - t.shape[1]) if t.dim() == 3 else (0, L - t.shape[1]), value=v
            )

        return Cond(
            torch.cat([pad(c.ctx, 0.0) for c in conds]), torch.cat([pad(c.mask, False) for c in conds])
        )


class Generator(nn.Module):
    """Text-to-image flow model of the shapes world (see module docstring)."""

    def __init__(self, config: GeneratorConfig, model_id: str = "shapes-untrained"):
        super().__init__()
        self.config = config
        self.tokenizer = Tokenizer(max_len=config.text.max_len)
        self.text = TextEncoder(config.text)
        self.unet = UNet(config.unet)
        self.model_id = model_id

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.config.unet.in_channels, self.config.image_size, self.config.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def denoiser(self) -> nn.Module:
        """The module that fine-tuning trains (the text encoder stays frozen)."""
        return self.unet

    def encode(self, prompts: list[str]) -> Cond:
        ids, mask = self.tokenizer(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return Cond(self.text(ids, mask), mask)

    def velocity(self, x_s: torch.Tensor, s: torch.Tensor, cond: Cond, guidance: float = 1.0) -> torch.Tensor:
        """v_theta(x_s, s, c), with classifier-free guidance when ``guidance != 1``: (B, C, H, W)."""
        s = torch.as_tensor(s, dtype=x_s.dtype, device=x_s.device).expand(x_s.shape[0])
        if guidance == 1.0:
            return self.unet(x_s, s, cond.ctx, cond.mask)
        null = self.encode([""] * x_s.shape[0])
        both = Cond.cat([cond, null])
        v = self.unet(torch.cat([x_s, x_s]), torch.cat([s, s]), both.ctx, both.mask)
        v_c, v_u = v.chunk(2)
        return v_u + guidance * (v_c - v_u)

    @staticmethod
    def decode(x: torch.Tensor) -> torch.Tensor:
        """Latents in [-1, 1] -> images in [0, 1] (B, 3, H, W), differentiable."""
        return ((x + 1) / 2).clamp(0, 1)

    @staticmethod
    def encode_images(images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) -> latents x0 in [-1, 1]."""
        return images * 2 - 1


def build_generator(name_or_config: str | GeneratorConfig = "small", seed: int = 0) -> Generator:
    """A randomly initialised generator from a preset name or a config (seeded)."""
    cfg = preset(name_or_config) if isinstance(name_or_config, str) else name_or_config
    torch.manual_seed(seed)
    name = name_or_config if isinstance(name_or_config, str) else "custom"
    return Generator(cfg, model_id=f"shapes-{name}-init{seed}")


# ---- saving and loading ------------------------------------------------------------------------

WEIGHTS, CARD = "model.safetensors", "card.json"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, corrupt or does not fit the model."""


def save_generator(model: Generator, folder: str | Path, card: dict | None = None) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/card.json`` (config + the given card fields)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(folder / WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    digest = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()[:12]
    info = {"kind": "t2ialign-generator", "config": model.config.to_dict(), **(card or {})}
    info["model_id"] = info.get("name", "shapes") + "-" + digest
    info["sha256_12"] = digest
    write_atomic(folder / CARD, lambda tmp: tmp.write_text(json.dumps(info, indent=1)))
    model.model_id = info["model_id"]
    return folder


def write_atomic(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary path next to ``path``, then rename it over ``path``, so a
    process killed mid-write (SIGKILL included) leaves either the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def read_card(folder: str | Path, kind: str) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    for f in (WEIGHTS, CARD):
        if not (folder / f).exists():
            raise CheckpointError(f"{folder}: missing {f} (a checkpoint folder holds {WEIGHTS} and {CARD})")
    try:
        card = json.loads((folder / CARD).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / CARD}: not valid JSON ({e.msg})") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"{folder / CARD}: expected a JSON object, got {type(card).__name__}")
    if card.get("kind") != kind:
        raise CheckpointError(f"{folder}: holds a {card.get('kind')!r}, expected a {kind!r}")
    return card


def load_state(module: nn.Module, folder: str | Path) -> None:
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises several error types for a corrupt file
        raise CheckpointError(f"{path}: corrupt or unreadable weights ({e})") from None
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} is {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{len(names)} {what} ({', '.join(names[:2])}{', ...' if len(names) > 2 else ''})"
        for what, names in [
            ("tensors missing", missing),
            ("unexpected tensors", unexpected),
            ("tensors of another shape", reshaped),
        ]
        if names
    ]
    if problems:
        raise CheckpointError(f"{path}: weights do not fit the model in {CARD}: {'; '.join(problems)}")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:  # (anything the checks above miss)
        msg = " ".join(str(e).split())
        raise CheckpointError(f"{path}: weights do not fit the model in {CARD}: {msg[:300]}") from None


def default_generator_path() -> Path:
    return Path(__file__).resolve().parent.parent / "checkpoints" / "generator"


def load_generator(path: str | Path | None = None, device: str | torch.device = "cpu") -> Generator:
    """Load a generator folder (the shipped default when ``path`` is None)."""
    folder = Path(path) if path is not None else default_generator_path()
    card = read_card(folder, "t2ialign-generator")
    try:
        cfg = GeneratorConfig.from_dict(card["config"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / CARD}: bad config ({e})") from None
    model = Generator(cfg, model_id=card.get("model_id", "shapes"))
    load_state(model, folder)
    return model.to(device).eval()
