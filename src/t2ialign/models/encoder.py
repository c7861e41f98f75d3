"""A small CLIP-like image-text dual encoder of the shapes world, trained contrastively.

It plays CLIP ViT-L/14's roles in the seed paper: the frozen backbone of the reward model, and the
feature space of FID. ``encode_image`` takes images in [0, 1] (B, 3, H, W) and is differentiable with
respect to the pixels; ``image_features`` are the pre-projection features used for FID.

Training (``pretrain_encoder``): symmetric InfoNCE over a batch of renders and their prompts, with
one extra hard negative per image (a prompt differing in exactly one attribute), so that the
embedding separates counts, colours, shapes, backgrounds and positions rather than just scenes.
Two options, off by default, add near misses: renders whose same-colour objects touch, as negative
images (``near_miss``), and colour-swapped prompts, as negative prompts (``swap_negatives``).
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from t2ialign.models.generator import CheckpointError, read_card
from t2ialign.models.text import TextEncoder, TextEncoderConfig, Tokenizer


@dataclass
class EncoderConfig:
    image_size: int = 32
    channels: tuple[int, ...] = (32, 64, 128)  # conv stages, each halving the resolution
    feature_dim: int = 256  # image features (FID space)
    embed_dim: int = 128  # joint embedding
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EncoderConfig:
        d = dict(d)
        d["channels"] = tuple(d["channels"])
        d["text"] = TextEncoderConfig(**d["text"])
        return cls(**d)


def encoder_preset(name: str) -> EncoderConfig:
    vocab = Tokenizer().vocab_size
    if name == "tiny":
        return EncoderConfig(
            channels=(8, 16),
            feature_dim=32,
            embed_dim=16,
            text=TextEncoderConfig(vocab_size=vocab, dim=16, layers=1, heads=2),
        )
    if name == "small":
        return EncoderConfig(text=TextEncoderConfig(vocab_size=vocab, dim=64, layers=2, heads=4))
    raise ValueError(f"unknown preset {name!r}; known presets: tiny, small")


class DualEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        layers: list[nn.Module] = []
        c = 3
        for co in cfg.channels:
            layers += [
                nn.Conv2d(c, co, 3, padding=1),
                nn.GroupNorm(min(8, co), co),
                nn.SiLU(),
                nn.Conv2d(co, co, 3, stride=2, padding=1),
                nn.SiLU(),
            ]
            c = co
        self.cnn = nn.Sequential(*layers)
        side = cfg.image_size // 2 ** len(cfg.channels)
        self.img_fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * side * side, cfg.feature_dim),
            nn.SiLU(),
            nn.Linear(cfg.feature_dim, cfg.feature_dim),
        )
        self.img_proj = nn.Linear(cfg.feature_dim, cfg.embed_dim)
        self.tokenizer = Tokenizer(max_len=cfg.text.max_len)
        self.text = TextEncoder(cfg.text)
        self.txt_proj = nn.Linear(cfg.text.dim, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) -> features (B, feature_dim)."""
        if images.shape[-1] != self.config.image_size or images.shape[-2] != self.config.image_size:
            raise ValueError(
                f"the encoder takes {self.config.image_size}px images, got {tuple(images.shape)}"
            )
        return self.img_fc(self.cnn(images * 2 - 1))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings (B, embed_dim), differentiable w.r.t. the pixels."""
        return F.normalize(self.img_proj(self.image_features(images)), dim=-1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings (B, embed_dim)."""
        ids, mask = self.tokenizer(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        h = self.text(ids, mask)
        m = mask.unsqueeze(-1).float()
        return F.normalize(self.txt_proj((h * m).sum(1) / m.sum(1)), dim=-1)

    def similarity(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Cosine similarity of each image with its prompt: (B,)."""
        return (self.encode_image(images) * self.encode_text(prompts)).sum(-1)


@dataclass
class EncoderTrainConfig:
    preset: str = "small"
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    data_seed: int = 1
    init_seed: int = 0
    checkpoint_every: int = 250
    device: str = "cpu"
    degrade: float = 0.0
    """Fraction of each batch's renders that :func:`degrade` blurs and adds noise to (0: clean renders
    only, as the shipped encoder was trained), so that the encoder also reads images that look like a
    small generator's."""

    near_miss: float = 0.0
    """Probability that a prompt of the batch whose scene has two objects of one colour also gets a
    near-miss render (:func:`~t2ialign.world.scene.touching_scene`: the two objects touch, so the
    image no longer shows the prompt), an extra negative image for that prompt in the text-to-image
    direction of the loss (0: none, as the shipped encoder was trained)."""
    captions: str = "web"
    """Caption noise of the training stream, a preset of :mod:`t2ialign.world.captions` (``web``: the
    alt-text a CLIP learns from; ``exact``: the true prompts, as the encoder of the previous world
    was trained). The hard negative prompts are perturbations of the caption, not of the truth,
    which the web does not know."""
    swap_negatives: bool = False
    """Also give every prompt with two coloured object groups its colour swap
    (:func:`~t2ialign.world.suites.colour_swap`) as an extra negative prompt (False: only the one
    one-attribute perturbation per image, as the shipped encoder was trained)."""

    def __post_init__(self):
        from t2ialign.world.captions import caption_preset

        caption_preset(self.captions)  # an unknown preset is an error naming the known ones
        if self.steps < 1 or self.batch_size < 2 or self.checkpoint_every < 1:
            raise ValueError("steps and checkpoint_every must be positive and batch_size at least 2")
        if not 0.0 <= self.degrade <= 1.0:
            raise ValueError(f"degrade must be in [0, 1], got {self.degrade}")
        if not 0.0 <= self.near_miss <= 1.0:
            raise ValueError(f"near_miss must be in [0, 1], got {self.near_miss}")
        if not isinstance(self.swap_negatives, bool):
            raise ValueError(f"swap_negatives must be True or False, got {self.swap_negatives!r}")


def degrade(x: torch.Tensor, rng: np.random.Generator, fraction: float) -> torch.Tensor:
    """Renders ``x`` (B, 3, H, W) in [0, 1] with a random ``fraction`` of them made to look more like
    a small generator's samples: a smooth random warp (a 6 x 6 field of displacements of std
    U(0.5, 1.5) pixels, upsampled bilinearly; edges wobble and shapes lose their straight lines), a
    slight Gaussian blur (sigma ~ U(0.3, 0.7) px) and Gaussian noise (std ~ U(0, 0.03)), clamped to
    [0, 1]. The others are returned unchanged."""
    b, _, h, w = x.shape
    pick = np.flatnonzero(rng.random(b) < fraction)
    if len(pick) == 0:
        return x
    out = x.clone()
    t = torch.arange(-2, 3, dtype=x.dtype, device=x.device)  # (5,)
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device), indexing="ij"
    )
    base = torch.stack([xs, ys], dim=-1)  # (H, W, 2), grid_sample's (x, y) order
    for i in pick.tolist():
        field = torch.from_numpy(rng.standard_normal((1, 2, 6, 6)).astype(np.float32)).to(x)
        field = field * float(rng.uniform(0.5, 1.5))  # pixels
        field = F.interpolate(field, size=(h, w), mode="bilinear", align_corners=True)[0]  # (2, H, W)
        grid = base + field.permute(1, 2, 0) * torch.tensor([2 / (w - 1), 2 / (h - 1)], device=x.device)
        img = F.grid_sample(x[i : i + 1], grid[None], padding_mode="border", align_corners=True)
        sigma = float(rng.uniform(0.3, 0.7))
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = k / k.sum()
        img = F.pad(img, (2, 2, 2, 2), mode="reflect")  # (1, 3, H + 4, W + 4)
        img = F.conv2d(img, k.view(1, 1, 1, 5).expand(3, 1, 1, 5), groups=3)
        img = F.conv2d(img, k.view(1, 1, 5, 1).expand(3, 1, 5, 1), groups=3)  # (1, 3, H, W)
        noise = torch.from_numpy(rng.standard_normal(img.shape).astype(np.float32)).to(x)
        out[i] = (img[0] + float(rng.uniform(0.0, 0.03)) * noise[0]).clamp(0, 1)
    return out


def contrastive_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor,
    n_pos: int,
    img_neg: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE. ``img`` (B, D) matches ``txt[:B]``; ``txt[B:]`` are extra negatives that
    only the image-to-text direction sees; ``img_neg`` (M, D), extra negative images that only the
    text-to-image direction sees:

        L = 1/2 [ CE_i(s * img_i . txt^T, i) + CE_i(s * txt_i . [img; img_neg]^T, i) ],  s = exp(logit_scale)
    """
    scale = logit_scale.exp().clamp(max=100)
    logits = scale * img @ txt.T  # (B, B + extra)
    target = torch.arange(n_pos, device=img.device)
    i2t = F.cross_entropy(logits, target)
    images = img if img_neg is None else torch.cat([img, img_neg])  # (B + M, D)
    t2i = F.cross_entropy(scale * txt[:n_pos] @ images.T, target)  # (B, B + M)
    return 0.5 * (i2t + t2i)


def near_miss_renders(specs, rng: np.random.Generator, p: float, size: int) -> torch.Tensor | None:
    """Near-miss renders (M, 3, H, W) in [0, 1] for the batch's ``specs``: with probability ``p`` per
    spec, a new scene of it with two objects of one colour moved to touch
    (:func:`~t2ialign.world.scene.touching_scene`); None when there are none."""
    from t2ialign.world.scene import render_scene, sample_scene, touching_scene

    out = []
    for s in specs:
        seed = int(rng.integers(2**31))
        if rng.random() >= p:
            continue
        scene = touching_scene(sample_scene(s, seed), rng)
        if scene is not None:
            out.append(render_scene(scene, size))
    if not out:
        return None
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0


def _hard_negatives(specs, rng, swaps: bool = False) -> list[str]:
    """One random one-attribute perturbation per spec; with ``swaps``, also each spec's colour swap
    where it has one."""
    from t2ialign.world.grammar import to_prompt
    from t2ialign.world.suites import colour_swap, perturbations

    out = []
    for s in specs:
        ps = perturbations(s)
        out.append(to_prompt(ps[int(rng.integers(len(ps)))][1]))
    if swaps:
        out += [to_prompt(w) for w in map(colour_swap, specs) if w is not None]
    return out


def pretrain_encoder(cfg: EncoderTrainConfig, out: str | Path, progress: bool = True) -> DualEncoder:
    """Train (or resume) the dual encoder in ``out``; saves ``model.safetensors`` + ``card.json``."""
    from tqdm import tqdm

    from t2ialign.models.pretrain import (
        _save_atomic,
        check_resumed_captions,
        machine_description,
        saved_caption_noise,
        world_batch,
    )
    from t2ialign.world.captions import caption_preset
    from t2ialign.world.grammar import parse

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    torch.manual_seed(cfg.init_seed)
    model = DualEncoder(encoder_preset(cfg.preset))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    start, wall, losses = 0, 0.0, []
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        check_resumed_captions(ck.get("config", {}), cfg.captions, ckpt_path, saved_caption_noise(ck, out))
        if "config" in ck and ck["config"] != asdict(cfg):
            saved = {**asdict(EncoderTrainConfig()), **ck["config"]}  # options newer than it: defaults
            diff = {k: (saved.get(k), v) for k, v in asdict(cfg).items() if saved.get(k) != v}
            if set(diff) - {"steps", "checkpoint_every", "device"}:
                raise ValueError(f"{ckpt_path} was made with other settings {diff}; use another --out")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        start, wall, losses = ck["step"], ck["wall"], ck["losses"]
        print(f"resuming from step {start} ({ckpt_path})", file=sys.stderr)
    model.to(cfg.device)
    for st in opt.state.values():
        for key, val in st.items():
            if torch.is_tensor(val) and key != "step":
                st[key] = val.to(cfg.device)
    t0 = time.time() - wall
    bar = tqdm(total=cfg.steps, initial=start, desc="pretrain-encoder", unit="step", disable=not progress)
    for k in range(start, cfg.steps):
        noise = caption_preset(cfg.captions)
        x, prompts, specs = world_batch(cfg.data_seed, k, cfg.batch_size, model.config.image_size, 0.0, noise)
        if not noise.is_exact:  # what the text says, for the hard negatives and the near misses
            specs = [parse(p) for p in prompts]
        rng = np.random.default_rng([cfg.data_seed, k, 7])
        if cfg.degrade > 0:
            x = degrade(x, np.random.default_rng([cfg.data_seed, k, 11]), cfg.degrade)
        for pg in opt.param_groups:
            pg["lr"] = cfg.lr * min(1.0, (k + 1) / 100) * 0.5 * (1 + math.cos(math.pi * k / cfg.steps))
        b = len(prompts)
        if cfg.near_miss > 0:
            rng_nm = np.random.default_rng([cfg.data_seed, k, 13])
            x_neg = near_miss_renders(specs, rng_nm, cfg.near_miss, model.config.image_size)
            if x_neg is not None:
                x = torch.cat([x, x_neg])  # (B + M, 3, H, W): the near misses after the batch's renders
        img = model.encode_image(x.to(cfg.device))  # (B [+ M], D)
        txt = model.encode_text(prompts + _hard_negatives(specs, rng, cfg.swap_negatives))
        loss = contrastive_loss(img[:b], txt, model.logit_scale, b, img[b:] if len(img) > b else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        wall = time.time() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        if (k + 1) % cfg.checkpoint_every == 0 or k + 1 == cfg.steps:
            # weights and card first, the resume checkpoint last (see ``pretrain``)
            save_encoder(
                model,
                out,
                card={
                    "training_command": "t2ialign " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                    "train_config": asdict(cfg),
                    "captions": {"preset": cfg.captions, "noise": caption_preset(cfg.captions).to_dict()},
                    "steps": k + 1,
                    "wall_time_s": round(wall, 1),
                    "machine": machine_description(cfg.device),
                    "parameters": sum(p.numel() for p in model.parameters()),
                },
            )
            _save_atomic(
                {
                    "step": k + 1,
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "config": asdict(cfg),
                    "caption_noise": caption_preset(cfg.captions).to_dict(),
                    "wall": wall,
                    "losses": losses,
                },
                ckpt_path,
            )
    bar.close()
    return model.eval()


def save_encoder(model: DualEncoder, folder: str | Path, card: dict | None = None) -> Path:
    import json

    from safetensors.torch import save_file

    from t2ialign.models.generator import write_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(folder / "model.safetensors", lambda tmp: save_file(state, str(tmp)))  # from any device
    old = {}
    if (folder / "card.json").exists():
        try:
            old = json.loads((folder / "card.json").read_text())
        except json.JSONDecodeError:
            old = {}
    info = {**old, "kind": "t2ialign-encoder", "config": model.config.to_dict(), **(card or {})}
    write_atomic(folder / "card.json", lambda tmp: tmp.write_text(json.dumps(info, indent=1)))
    return folder


def default_encoder_path() -> Path:
    return Path(__file__).resolve().parent.parent / "checkpoints" / "encoder"


def load_encoder(path: str | Path | None = None, device: str | torch.device = "cpu") -> DualEncoder:
    """Load an encoder folder (the shipped default when ``path`` is None), frozen and in eval mode."""
    from t2ialign.models.generator import load_state

    folder = Path(path) if path is not None else default_encoder_path()
    card = read_card(folder, "t2ialign-encoder")
    try:
        cfg = EncoderConfig.from_dict(card["config"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}/card.json: bad config ({e})") from None
    model = DualEncoder(cfg)
    load_state(model, folder)
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def zero_shot_retrieval(model: DualEncoder, n: int = 1000, seed: int = 12345) -> dict:
    """Zero-shot prompt retrieval on ``n`` held-out renders (a data seed never used in training).

    For each render, the candidates are its true prompt and every prompt that differs in one
    attribute. ``per_attribute[a]``: how often the true prompt beats all candidates that differ in
    attribute ``a``; ``overall``: how often it beats all candidates.
    """
    from t2ialign.models.pretrain import world_batch
    from t2ialign.world.grammar import to_prompt
    from t2ialign.world.suites import perturbations

    x, prompts, specs = world_batch(seed, 0, n, model.config.image_size)
    img = model.encode_image(x.to(model.device))
    wins: dict[str, list[bool]] = {}
    overall = []
    for i, spec in enumerate(specs):
        pert = perturbations(spec)
        txt = model.encode_text([prompts[i]] + [to_prompt(p) for _, p in pert])
        sims = txt @ img[i]
        true_sim = sims[0]
        overall.append(bool((sims[1:] < true_sim).all()))
        for attr in {a for a, _ in pert}:
            idx = [j + 1 for j, (a, _) in enumerate(pert) if a == attr]
            wins.setdefault(attr, []).append(bool((sims[idx] < true_sim).all()))
    return {
        "n": n,
        "overall": float(np.mean(overall)),
        "per_attribute": {a: {"accuracy": float(np.mean(w)), "n": len(w)} for a, w in sorted(wins.items())},
    }
