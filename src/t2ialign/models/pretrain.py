"""Pre-training of the generator by rectified flow on scenes rendered on the fly.

This world's pre-training data (the seed paper's LAION) is an endless stream of random specs of
every task, rendered with random seeds. Batch ``k`` is a pure function of ``(data_seed, k)``, so a
run killed at any point (SIGKILL included) resumes from its last checkpoint with the same data.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from t2ialign.models.generator import Generator, build_generator, save_generator
from t2ialign.sampling.flow import add_noise, flow_matching_loss
from t2ialign.world.captions import CaptionNoise, caption_preset


@dataclass
class PretrainConfig:
    preset: str = "small"  # model size (see ``models.generator.preset``)
    steps: int = 4000  # optimisation steps
    batch_size: int = 64
    lr: float = 5e-4  # peak learning rate (linear warm-up, cosine decay to 10%)
    warmup: int = 200
    cond_dropout: float = 0.1  # share of prompts replaced by the null prompt (for guidance)
    ema: float = 0.999  # EMA decay of the weights that are saved and sampled
    data_seed: int = 0  # seeds the data stream and the noise
    init_seed: int = 0  # seeds the initial weights
    checkpoint_every: int = 250
    image_size: int = 32
    max_minutes: float = 0.0  # stop (and save) after this wall time; 0 = no limit
    device: str = "cpu"  # where the model trains; data and noise are drawn on the CPU either way
    captions: str = "web"  # caption noise of the stream: a preset of ``world.captions`` (web, exact)

    def __post_init__(self):
        caption_preset(self.captions)  # an unknown preset is an error naming the known ones
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, batch_size and checkpoint_every must be positive")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if not 0 < self.ema < 1:
            raise ValueError(f"ema must be in (0, 1), got {self.ema}")
        if self.image_size not in (32, 64):
            raise ValueError(f"image_size must be 32 or 64, got {self.image_size}")


def world_batch(
    data_seed: int,
    k: int,
    batch_size: int,
    size: int = 32,
    cond_dropout: float = 0.0,
    captions: CaptionNoise | None = None,
):
    """Batch ``k`` of the pre-training stream: images in [0, 1] (B, 3, H, W), prompts, true specs.

    ``captions`` is the caption noise of the prompts (:mod:`t2ialign.world.captions`; ``None`` or
    ``EXACT``: the true prompts). The images and specs do not depend on it: the web and the exact
    stream of one seed show the same scenes, and only their captions differ (the caption noise draws
    from a stream of its own)."""
    from t2ialign.world.captions import caption
    from t2ialign.world.grammar import to_prompt
    from t2ialign.world.scene import random_spec, render

    rng = np.random.default_rng([data_seed, k])
    specs = [random_spec(rng) for _ in range(batch_size)]
    imgs = np.stack([render(s, int(rng.integers(2**31)), size) for s in specs])  # (B, H, W, 3)
    if captions is None or captions.is_exact:
        texts = [to_prompt(s) for s in specs]
    else:
        crng = np.random.default_rng([data_seed, k, 3])
        texts = [caption(s, captions, crng) for s in specs]
    prompts = [t if rng.random() >= cond_dropout else "" for t in texts]
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    return x, prompts, specs


def check_resumed_captions(
    saved_config: dict, captions: str, ckpt_path: Path, saved_noise: dict | None = None
) -> None:
    """Refuse to resume a checkpoint trained on other captions than this run asks for (runs from
    before the captioner saved no ``captions`` and were trained on exact captions). ``saved_noise``,
    the rates the checkpoint was trained with (saved since the presets' rates can change), must
    equal the preset's rates today."""
    saved = saved_config.get("captions", "exact")
    if saved != captions:
        raise ValueError(
            f"{ckpt_path} was trained on {saved!r} captions and this run asks for {captions!r}: a model "
            f"pre-trained on one caption corpus does not continue on another; pass --captions {saved} "
            "to resume it, or use another --out"
        )
    now = caption_preset(captions).to_dict()
    if saved_noise is not None and saved_noise != now:
        diff = {k: (saved_noise.get(k), v) for k, v in now.items() if saved_noise.get(k) != v}
        raise ValueError(
            f"{ckpt_path} was trained on {captions!r} captions of other rates than the preset has "
            f"today {diff} (saved, now): the preset changed since; use another --out"
        )


def saved_caption_noise(ck: dict, folder: Path) -> dict | None:
    """The caption rates a checkpoint was trained with: saved in it, or (checkpoints from before the
    rates were saved) in the ``card.json`` of its folder; None when neither has them."""
    if "caption_noise" in ck:
        return ck["caption_noise"]
    card = folder / "card.json"
    if card.exists():
        return json.loads(card.read_text()).get("captions", {}).get("noise")
    return None


def lr_at(cfg: PretrainConfig, k: int) -> float:
    if k < cfg.warmup:
        return cfg.lr * (k + 1) / cfg.warmup
    p = (k - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, p))))


def machine_description(device: str) -> str:
    desc = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        desc += f", trained on {torch.cuda.get_device_name(0)}"
    return desc


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def pretrain(
    cfg: PretrainConfig, out: str | Path, progress: bool = True, snapshots: tuple[int, ...] = ()
) -> Generator:
    """Train (or resume) a generator in ``out``; returns the EMA model, also saved to ``out``.

    ``snapshots``: steps (each a multiple of ``cfg.checkpoint_every``) at which a copy of the
    weights and card is also kept in ``out/step{N}`` (for a curve of quality against steps)."""
    bad = [s for s in snapshots if s % cfg.checkpoint_every or not 0 < s <= cfg.steps]
    if bad:
        raise ValueError(
            f"snapshot steps {bad} must be multiples of checkpoint_every ({cfg.checkpoint_every}) "
            f"from 1 to steps ({cfg.steps})"
        )
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    model = build_generator(cfg.preset, seed=cfg.init_seed)
    model.config.image_size = cfg.image_size
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    start, wall = 0, 0.0
    losses: list[float] = []
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        check_resumed_captions(ck["config"], cfg.captions, ckpt_path, saved_caption_noise(ck, out))
        saved = {"captions": "exact", **ck["config"]}  # runs from before the captioner: exact captions
        if saved != asdict(cfg):
            diff = {k: (saved.get(k), v) for k, v in asdict(cfg).items() if saved.get(k) != v}
            if set(diff) - {"steps", "max_minutes", "checkpoint_every", "device"}:
                raise ValueError(f"{ckpt_path} was made with other settings {diff}; use another --out")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        start, wall, losses = ck["step"], ck["wall"], ck["losses"]
        print(f"resuming from step {start} ({ckpt_path})", file=sys.stderr)

    def save(step: int) -> None:
        # The weights and card first, the resume checkpoint last: a run killed in between resumes
        # from the previous checkpoint and writes this step's weights again, so a run whose
        # checkpoint says it is finished always has its final weights on disk.
        for folder in [out] + ([out / f"step{step}"] if step in snapshots else []):
            save_generator(copy.deepcopy(ema).cpu(), folder, card=card(step))
        _save_atomic(
            {
                "step": step,
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "config": asdict(cfg),
                "caption_noise": caption_preset(cfg.captions).to_dict(),
                "wall": wall,
                "losses": losses,
            },
            ckpt_path,
        )

    def card(step: int) -> dict:
        return {
            "name": f"shapes-{cfg.preset}",
            "training_command": "t2ialign " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "pretrain_config": asdict(cfg),
            "captions": {"preset": cfg.captions, "noise": caption_preset(cfg.captions).to_dict()},
            "steps": step,
            "wall_time_s": round(wall, 1),
            "machine": machine_description(cfg.device),
            "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss_ema100": float(np.mean(losses[-100:])) if losses else None,
        }

    model.to(cfg.device)
    ema.to(cfg.device)
    for st in opt.state.values():
        for key, val in st.items():
            if torch.is_tensor(val) and key != "step":
                st[key] = val.to(cfg.device)
    bar = tqdm(total=cfg.steps, initial=start, desc="pretrain", unit="step", disable=not progress)
    t0 = time.time() - wall
    k = start
    model.train()
    while k < cfg.steps:
        x, prompts, _ = world_batch(
            cfg.data_seed, k, cfg.batch_size, cfg.image_size, cfg.cond_dropout, caption_preset(cfg.captions)
        )
        g = torch.Generator().manual_seed(cfg.data_seed * 1_000_003 + k)
        x0 = model.encode_images(x).to(cfg.device)
        eps = torch.randn(x0.shape, generator=g).to(cfg.device)
        s = torch.rand(x0.shape[0], generator=g).to(cfg.device)
        for pg in opt.param_groups:
            pg["lr"] = lr_at(cfg, k)
        v = model.velocity(add_noise(x0, eps, s), s, model.encode(prompts))
        loss = flow_matching_loss(v, x0, eps).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + k) / (10 + k))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        k += 1
        wall = time.time() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        over_time = cfg.max_minutes > 0 and wall > cfg.max_minutes * 60
        if k % cfg.checkpoint_every == 0 or k == cfg.steps or over_time:
            save(k)
        if over_time:
            print(f"stopping at step {k}: --max-minutes {cfg.max_minutes} reached", file=sys.stderr)
            break
    bar.close()
    return ema.eval()
