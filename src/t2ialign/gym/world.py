"""The gym's world: K classes of 2-D points, each a mixture of Gaussian modes with known centres.

The ``M = n_classes * modes_per_class`` modes sit on a circle of radius ``circle_radius``, mode ``j``
at angle ``2 pi j / M`` and of class ``j mod K`` (neighbours belong to different classes). Within a
class the modes carry the weights ``mode_weights``. A prompt names a class (``"class 3"``); the empty
prompt is the unconditional one (classifier-free guidance).

"Web-labelled" data: a point of true class ``c`` carries its own label with probability
``1 - label_noise`` and one of the other ``K - 1`` labels, uniformly, otherwise. A model fit to it
draws, for the prompt ``c``, from ``(1 - label_noise) p(x | c) + label_noise / (K - 1) sum_{c' != c}
p(x | c')``: a known share of its mass lies in the wrong modes, as captions misstate an image.

"Images": the latent ``x`` is the point itself, shaped (B, 2, 1, 1) (two channels, one pixel); an
image is ``sigmoid(x)`` in (0, 1), so every image convention of the trainers (values in [0, 1], a
4-D tensor) holds, and ``logit`` takes an image back to its point.

Rewards of the common interface ``reward_fn(images, prompts, metadata) -> (rewards (B,), info)``:
:class:`SuccessReward` (1 inside a mode of the prompted class, within ``radius`` of its centre, else
0) and :class:`SmoothReward` (a sigmoid of the margin to the nearest correct mode, differentiable).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

NULL_PROMPT = ""
_PROMPT = re.compile(r"^class (\d+)$")


@dataclass
class GymWorld:
    n_classes: int = 4
    """K, the number of classes (prompts)."""
    modes_per_class: int = 3
    """Gaussian modes of each class."""
    mode_weights: tuple[float, ...] = (0.5, 0.3, 0.2)
    """Within-class weights of the modes (one per mode, summing to 1)."""
    circle_radius: float = 3.0
    """Radius of the circle the mode centres sit on."""
    mode_std: float = 0.2
    """Standard deviation of each (isotropic) mode."""
    radius: float = 0.7
    """A point is a success when it lies within this distance of a centre of the prompted class."""
    label_noise: float = 0.4
    """Probability that a web label names another class than the point's (uniformly among them)."""
    smooth_temperature: float = 0.5
    """Temperature of :class:`SmoothReward`: sigmoid((radius - distance) / temperature)."""

    def __post_init__(self):
        if self.n_classes < 2 or self.modes_per_class < 1:
            raise ValueError("need n_classes >= 2 and modes_per_class >= 1")
        self.mode_weights = tuple(float(w) for w in self.mode_weights)
        if len(self.mode_weights) != self.modes_per_class:
            raise ValueError(
                f"mode_weights has {len(self.mode_weights)} entries for {self.modes_per_class} modes "
                "per class"
            )
        if min(self.mode_weights) <= 0 or abs(sum(self.mode_weights) - 1.0) > 1e-6:
            raise ValueError(f"mode_weights must be positive and sum to 1, got {self.mode_weights}")
        if self.circle_radius <= 0 or self.mode_std <= 0 or self.radius <= 0 or self.smooth_temperature <= 0:
            raise ValueError("circle_radius, mode_std, radius and smooth_temperature must be positive")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}")
        gap = 2 * self.circle_radius * math.sin(math.pi / self.n_modes)
        if 2 * self.radius >= gap:
            raise ValueError(
                f"success discs of radius {self.radius} overlap (neighbouring centres {gap:.3f} apart)"
            )

    @property
    def n_modes(self) -> int:
        return self.n_classes * self.modes_per_class

    def centres(self) -> torch.Tensor:
        """(M, 2): mode j at angle 2 pi j / M on the circle."""
        a = 2 * math.pi * torch.arange(self.n_modes, dtype=torch.float64) / self.n_modes
        return (self.circle_radius * torch.stack([a.cos(), a.sin()], 1)).float()

    def mode_class(self) -> torch.Tensor:
        """(M,): the class of each mode, j mod K."""
        return torch.arange(self.n_modes) % self.n_classes

    def mode_rank(self) -> torch.Tensor:
        """(M,): the index of each mode within its class, j div K."""
        return torch.arange(self.n_modes) // self.n_classes

    # ---- prompts ---------------------------------------------------------------------------------

    def prompt(self, c: int) -> str:
        return f"class {int(c)}"

    def prompt_rows(self) -> list[dict]:
        """The trainers' prompt rows, one per class."""
        return [{"prompt": self.prompt(c), "class": c} for c in range(self.n_classes)]

    def parse(self, prompt: str) -> int:
        """The class a prompt names; ``n_classes`` (the null class) for the empty prompt."""
        if prompt == NULL_PROMPT:
            return self.n_classes
        m = _PROMPT.match(prompt)
        if m is None or int(m.group(1)) >= self.n_classes:
            raise ValueError(
                f"not a gym prompt: {prompt!r} (expected 'class C' with C < {self.n_classes}, or '')"
            )
        return int(m.group(1))

    def classes(self, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([self.parse(p) for p in prompts], dtype=torch.long)

    # ---- data ------------------------------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator, classes: torch.Tensor | None = None):
        """``n`` clean points of the true distribution: (points (n, 2), class (n,), mode (n,)). Classes
        are uniform unless given; the mode within a class follows ``mode_weights``."""
        K = self.n_classes
        if classes is None:
            classes = torch.randint(K, (n,), generator=generator)
        w = torch.tensor(self.mode_weights)
        rank = torch.multinomial(w, n, replacement=True, generator=generator)
        mode = rank * K + classes
        pts = self.centres()[mode] + self.mode_std * torch.randn((n, 2), generator=generator)
        return pts, classes, mode

    def web_labels(self, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Each true class kept with probability 1 - label_noise, else replaced by one of the others."""
        n = classes.shape[0]
        wrong = torch.rand(n, generator=generator) < self.label_noise
        shift = torch.randint(1, self.n_classes, (n,), generator=generator)
        return torch.where(wrong, (classes + shift) % self.n_classes, classes)

    def web_source(self, seed: int = 0):
        """``pretrain_source(step, n) -> (images (n, 2, 1, 1), prompts)``: web-labelled data, batch
        ``step`` a pure function of (seed, step) (the trainers' pre-training term)."""

        def source(step: int, n: int):
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step) + 7)
            pts, cls, _ = self.sample(n, g)
            labels = self.web_labels(cls, g)
            return points_to_images(pts), [self.prompt(c) for c in labels.tolist()]

        return source

    # ---- judging points --------------------------------------------------------------------------

    def class_distance(self, points: torch.Tensor, classes: torch.Tensor):
        """(distance (B,) to the nearest centre of each point's class, that mode's index (B,)),
        differentiable in the points."""
        d = torch.cdist(points, self.centres().to(points))  # (B, M)
        other = self.mode_class().to(points.device)[None, :] != classes[:, None].to(points.device)
        d = d.masked_fill(other, float("inf"))
        dist, mode = d.min(1)
        return dist, mode

    def success(self, points: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(B,) bool: within ``radius`` of a centre of the point's class."""
        return self.class_distance(points, classes)[0] <= self.radius

    def smooth(self, points: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """r = sigmoid((radius - d) / T), d the distance to the nearest centre of the class: (B,)."""
        d, _ = self.class_distance(points, classes)
        return torch.sigmoid((self.radius - d) / self.smooth_temperature)


def points_to_images(points: torch.Tensor) -> torch.Tensor:
    """image = sigmoid(x), (B, 2) or (B, 2, 1, 1) -> (B, 2, 1, 1) in (0, 1)."""
    return torch.sigmoid(points.reshape(points.shape[0], 2, 1, 1))


def images_to_points(images: torch.Tensor) -> torch.Tensor:
    """x = logit(image), (B, 2, 1, 1) -> (B, 2) (images clamped to [1e-6, 1 - 1e-6] first)."""
    if images.dim() != 4 or tuple(images.shape[1:]) != (2, 1, 1):
        raise ValueError(f"gym images are (B, 2, 1, 1) tensors, got {tuple(images.shape)}")
    return torch.logit(images.reshape(images.shape[0], 2), eps=1e-6)


class SuccessReward:
    """reward_fn: 1 inside a mode of the prompted class (within ``world.radius``), else 0."""

    def __init__(self, world: GymWorld):
        self.world = world

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata=None):
        ok = self.world.success(images_to_points(images.detach()), self.world.classes(prompts))
        r = ok.float()
        return r, {"success": float(r.mean())}


class SmoothReward:
    """reward_fn, differentiable in the images: sigmoid((radius - d) / smooth_temperature)."""

    def __init__(self, world: GymWorld):
        self.world = world

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata=None):
        cls = self.world.classes(prompts)
        pts = images_to_points(images)
        r = self.world.smooth(pts, cls)
        return r, {"success": float(self.world.success(pts.detach(), cls).float().mean())}
