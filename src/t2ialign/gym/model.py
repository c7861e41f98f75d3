"""The gym's model: a small conditional rectified-flow MLP, its pre-training, and its backend.

:class:`FlowMLP` predicts the velocity ``v = eps - x0`` of ``x_s = (1 - s) x0 + s eps`` for 2-D points
(shaped (B, 2, 1, 1)), conditioned on a class id (``n_classes`` is the null class of classifier-free
guidance). :func:`pretrain` fits it to web-labelled data in seconds. :class:`GymBackend` implements
:class:`t2ialign.backends.base.Backend` around it, with the conventions of
:class:`t2ialign.backends.shapes.ShapesBackend` (Flow-GRPO's SDE from :mod:`t2ialign.sampling.flow`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from t2ialign.backends.base import adapters_disabled, resharded
from t2ialign.backends.flowmath import RectifiedFlowMath
from t2ialign.gym.world import GymWorld, images_to_points, points_to_images
from t2ialign.sampling import flow

LORA_TARGETS = ["inp", "h1", "h2", "out"]
MODEL_FILE = "gym_model.pt"


class FlowMLP(nn.Module):
    """v_theta(x_s, s, c): [x, sinusoidal features of s, class embedding] -> 3 SiLU layers -> 2."""

    def __init__(self, n_classes: int, hidden: int = 64, n_freq: int = 8, emb: int = 32):
        super().__init__()
        self.n_classes, self.hidden, self.n_freq, self.emb_dim = n_classes, hidden, n_freq, emb
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32) / 2)
        self.emb = nn.Embedding(n_classes + 1, emb)
        self.inp = nn.Linear(2 + 2 * n_freq + emb, hidden)
        self.h1 = nn.Linear(hidden, hidden)
        self.h2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 2)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        ang = s.reshape(b, 1).to(x.dtype) * self.freqs
        h = torch.cat([x.reshape(b, 2), ang.sin(), ang.cos(), self.emb(labels)], 1)
        h = self.act(self.inp(h))
        h = self.act(self.h1(h))
        h = self.act(self.h2(h))
        return self.out(h).reshape(x.shape)

    def config(self) -> dict:
        return {
            "n_classes": self.n_classes,
            "hidden": self.hidden,
            "n_freq": self.n_freq,
            "emb": self.emb_dim,
        }


@dataclass
class PretrainConfig:
    steps: int = 3000
    """Optimisation steps (each on a fresh web-labelled batch)."""
    batch_size: int = 256
    """Points per step."""
    lr: float = 1e-2
    """AdamW learning rate, cosine-decayed to 0."""
    cond_dropout: float = 0.1
    """Share of labels replaced by the null class (trains the unconditional model for guidance)."""
    hidden: int = 64
    """Width of the MLP."""
    seed: int = 0
    """Seeds the initial weights and the data."""

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.hidden < 1:
            raise ValueError("steps, batch_size and hidden must be positive")
        if self.lr <= 0 or not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"need lr > 0 and cond_dropout in [0, 1), got {self.lr}, {self.cond_dropout}")


def pretrain(world: GymWorld, cfg: PretrainConfig | None = None) -> FlowMLP:
    """Fit a :class:`FlowMLP` to web-labelled points by flow matching,
    L = E || v_theta(x_s, s, c_web) - (eps - x0) ||^2, with s ~ U(0, 1)."""
    cfg = cfg or PretrainConfig()
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    net = FlowMLP(world.n_classes, cfg.hidden)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    n = cfg.batch_size
    for _ in range(cfg.steps):
        x0, cls, _ = world.sample(n, g)
        labels = world.web_labels(cls, g)
        labels = torch.where(torch.rand(n, generator=g) < cfg.cond_dropout, world.n_classes, labels)
        x0 = x0.reshape(n, 2, 1, 1)
        eps = torch.randn(x0.shape, generator=g)
        s = torch.rand(n, generator=g)
        loss = flow.flow_matching_loss(net(flow.add_noise(x0, eps, s), s, labels), x0, eps).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.requires_grad_(False).eval()


@dataclass
class GymCond:
    """The conditioning of a batch: class ids (B,), ``n_classes`` for the null prompt."""

    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def index(self, idx) -> GymCond:
        return GymCond(self.labels[idx])

    def repeat_interleave(self, n: int) -> GymCond:
        return GymCond(self.labels.repeat_interleave(n))


class GymBackend(RectifiedFlowMath):
    """:class:`~t2ialign.backends.base.Backend` of a :class:`FlowMLP` (``prediction = "flow"``; latents
    (B, 2, 1, 1) are the points, images their sigmoid). ``sde_a`` is Flow-GRPO's noise scale."""

    prediction = "flow"
    latent_shape = (2, 1, 1)
    model_id = "gym-flow-mlp"

    def __init__(self, net: FlowMLP, world: GymWorld, sde_a: float = 0.7):
        if net.n_classes != world.n_classes:
            raise ValueError(f"the model has {net.n_classes} classes, the world {world.n_classes}")
        self.net, self.world, self.sde_a = net, world, sde_a
        self._ref: nn.Module | None = None
        self._lora: dict | None = None

    @property
    def device(self) -> torch.device:
        return self.net.freqs.device

    def encode(self, prompts: list[str]) -> GymCond:
        return GymCond(self.world.classes(prompts).to(self.device))

    def predict(self, x_s, s, cond: GymCond, guidance: float = 1.0) -> torch.Tensor:
        s = torch.as_tensor(s, dtype=x_s.dtype, device=x_s.device).expand(x_s.shape[0])
        if guidance == 1.0:
            return self.net(x_s, s, cond.labels)
        null = torch.full_like(cond.labels, self.world.n_classes)
        out = self.net(torch.cat([x_s, x_s]), torch.cat([s, s]), torch.cat([cond.labels, null]))
        v_c, v_u = out.chunk(2)
        return flow.cfg(v_u, v_c, guidance)

    def velocity(self, x_s, s, cond, guidance: float = 1.0):
        """Alias of :meth:`predict` (the samplers of ``t2ialign.sampling`` call ``velocity``)."""
        return self.predict(x_s, s, cond, guidance)

    def denoiser(self) -> nn.Module:
        return self.net

    # add_noise, target, predict_x0, timesteps, ode_step, stochastic_step: RectifiedFlowMath

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return points_to_images(x)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images_to_points(images).reshape(-1, *self.latent_shape)

    # -- fine-tuning ------------------------------------------------------------------------------
    def enable_lora(self, rank: int = 8, alpha: float = 16.0) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        if self._lora is not None:
            raise RuntimeError("LoRA is already enabled on this backend")
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, lora_dropout=0.0)
        self.net.requires_grad_(False)
        inject_adapter_in_model(cfg, self.net)
        for name, p in self.net.named_parameters():
            p.requires_grad_("lora_" in name)
        self._lora = {"rank": rank, "alpha": alpha}

    @property
    def lora_enabled(self) -> bool:
        return self._lora is not None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def snapshot_reference(self) -> None:
        """Freeze a copy of the current network as the reference (full fine-tuning)."""
        self._ref = copy.deepcopy(self.net).requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference(self):
        if self._lora is not None:
            with adapters_disabled(self.net):
                yield self
        else:
            if self._ref is None:
                self.snapshot_reference()
            live, self.net = self.net, self._ref
            try:
                yield self
            finally:
                self.net = live

    def merged_net(self) -> FlowMLP:
        """A plain :class:`FlowMLP` with any LoRA adapters merged into its weights."""
        net = copy.deepcopy(self.net).cpu()
        if self._lora is None:
            return net
        from peft.tuners.lora import LoraLayer

        for m in list(net.modules()):
            if isinstance(m, LoraLayer):
                m.merge()
        state = {k.replace(".base_layer.", "."): v for k, v in net.state_dict().items() if "lora_" not in k}
        plain = FlowMLP(**self.net.config())
        plain.load_state_dict(state)
        return plain

    def save(self, folder, card: dict | None = None, denoiser_state: dict | None = None) -> None:
        """Write ``gym_model.pt`` (merged weights, model and world config) and ``card.json``;
        :func:`load_gym_backend` reads it back."""
        if denoiser_state is not None:
            raise ValueError("the gym backend trains in one process: denoiser_state is not supported")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        net = self.merged_net()
        torch.save(
            {"state": net.state_dict(), "model": net.config(), "world": asdict(self.world)},
            folder / MODEL_FILE,
        )
        (folder / "card.json").write_text(json.dumps({"name": "gym-finetuned", **(card or {})}, indent=2))

    def state_dict_trainable(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in resharded(self.net).named_parameters() if v.requires_grad}

    def load_state_dict_trainable(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.net.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)


def load_gym_backend(folder, sde_a: float = 0.7) -> GymBackend:
    """The backend of a folder written by :meth:`GymBackend.save`."""
    path = Path(folder) / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder} holds no {MODEL_FILE}")
    saved = torch.load(path, weights_only=False, map_location="cpu")
    net = FlowMLP(**saved["model"])
    net.load_state_dict(saved["state"])
    world = GymWorld(**{**saved["world"], "mode_weights": tuple(saved["world"]["mode_weights"])})
    return GymBackend(net.requires_grad_(False).eval(), world, sde_a)
