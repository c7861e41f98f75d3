"""The one reward interface of the project, and the rewards that implement it.

Every reward is a callable::

    rewards, info = reward_fn(images, prompts, metadata)

- ``images``: float tensor (B, 3, H, W) in [0, 1];
- ``prompts``: list of B strings;
- ``metadata``: a list of B dicts, or None. A dict's ``spec`` (a spec dict of the shapes world), when
  present, is used by the rule rewards instead of parsing the prompt;
- ``rewards``: float32 tensor (B,) on the images' device; ``info``: a dict of extra, per-image
  diagnostics (lists of length B) and the reward's name.

Rewards here:

- :class:`ModelReward`: a trained reward model (``t2ialign.reward.model``); differentiable w.r.t.
  the pixels, as ReFL and DRaFT need;
- :class:`SimilarityReward`: the frozen encoder's zero-shot cosine similarity (the baseline);
  differentiable; on a :class:`~t2ialign.reward.clip.CLIPBackbone` it is the CLIP score (the cosine
  of CLIP's image and text embeddings, in [-1, 1]; CLIPScore papers report ``100 * max(cos, 0)``),
  and with ``scale`` the CLIP model's ``logit_scale.exp()`` it is PickScore (Kirstain et al. 2023:
  the same computation on the PickScore_v1 weights and their processor's preprocessing);
- :func:`checker_reward`: the ShapesEval checker, 1.0 for a correct image, 0.0 otherwise (it, and
  the two rule rewards below, need prompts of the shapes world's grammar; free text is an error that
  says so);
- :func:`counting_reward`: Flow-GRPO's GenEval counting reward ``1 - |N_gen - N_ref| / N_ref``
  (clamped at 0), per object group of the prompt, averaged over the groups;
- :func:`partial_credit_reward`: the fraction of the checker's attribute checks that pass;
- :func:`mix_rewards`: a weighted sum of rewards.

The rule rewards run the checker on the pixels and carry no gradient. There is no lookup by name
here: the CLI maps names to these callables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from t2ialign.world.checker import check, detect
from t2ialign.world.grammar import PromptError, parse
from t2ialign.world.spec import Spec

RewardFn = Callable[..., tuple[torch.Tensor, dict]]


def _check_inputs(images: torch.Tensor, prompts: Sequence[str], metadata) -> None:
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a float tensor (B, 3, H, W) in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    if metadata is not None and len(metadata) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(metadata)} metadata entries")


def _spec(prompt: str, meta: dict | None, what: str = "the checker reward") -> Spec:
    if meta and meta.get("spec") is not None:
        s = meta["spec"]
        return s if isinstance(s, Spec) else Spec.from_dict(s)
    try:
        return parse(prompt)
    except PromptError:
        from t2ialign.prompts import needs_spec_error

        err = needs_spec_error(f"{what} (ShapesEval)", prompt)
        raise ValueError(
            f"{err}; for free text use a learned reward (a reward folder) or a CLIP score"
        ) from None


def _out(values, images: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=images.device)


class ModelReward(nn.Module):
    """A trained :class:`~t2ialign.reward.model.RewardModel` as a reward function, differentiable w.r.t.
    the pixels. Text embeddings are cached per prompt (the backbone is frozen).

    ``probability=True`` clamps the score to [0, 1] (its reading as P(good)); the default returns
    the raw score, whose gradient never vanishes at the clamp."""

    def __init__(self, model, probability: bool = False, name: str | None = None):
        super().__init__()
        self.model = model.eval()
        self.probability = probability
        self.name = name or model.card.get("name", "reward-model")
        self._txt: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", **kw) -> ModelReward:
        """Load a reward checkpoint folder as a reward function."""
        from t2ialign.reward.model import load_reward_model

        return cls(load_reward_model(path, device=device), name=kw.pop("name", str(path)), **kw)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self._txt]
        if new:
            if len(self._txt) > 65536:
                self._txt.clear()
            with torch.no_grad():
                emb = self.model.backbone.encode_text(new)
            self._txt.update(zip(new, emb, strict=True))
        return torch.stack([self._txt[p] for p in prompts])

    def forward(
        self, images: torch.Tensor, prompts: Sequence[str], metadata=None
    ) -> tuple[torch.Tensor, dict]:
        _check_inputs(images, prompts, metadata)
        img = self.model.backbone.encode_image(images)
        r = self.model.score_embeddings(img, self.text_embeddings(prompts).to(img.device)).float()
        if self.probability:
            r = r.clamp(0.0, 1.0)
        return r.to(images.device), {"reward": self.name}


class SimilarityReward(nn.Module):
    """Zero-shot cosine similarity of a frozen backbone's image and text embeddings (in [-1, 1]),
    times ``scale``; differentiable w.r.t. the pixels. ``backbone``: an EncoderBackbone, a
    CLIPBackbone, or None for the shipped encoder."""

    def __init__(self, backbone: nn.Module | None = None, name: str = "similarity", scale: float = 1.0):
        super().__init__()
        self.scale = float(scale)
        if backbone is None:
            from t2ialign.reward.model import EncoderBackbone

            backbone = EncoderBackbone()
        self.backbone = backbone.eval().requires_grad_(False)
        self.name = name
        self._txt: dict[str, torch.Tensor] = {}

    def forward(
        self, images: torch.Tensor, prompts: Sequence[str], metadata=None
    ) -> tuple[torch.Tensor, dict]:
        _check_inputs(images, prompts, metadata)
        new = [p for p in dict.fromkeys(prompts) if p not in self._txt]
        if new:
            with torch.no_grad():
                self._txt.update(zip(new, self.backbone.encode_text(new), strict=True))
        img = self.backbone.encode_image(images)
        txt = torch.stack([self._txt[p] for p in prompts]).to(img.device)
        return self.scale * (img * txt).sum(-1).float().to(images.device), {"reward": self.name}


def checker_reward(images: torch.Tensor, prompts: Sequence[str], metadata=None) -> tuple[torch.Tensor, dict]:
    """ShapesEval: 1.0 when the image shows what its prompt says, else 0.0 (no gradient).
    ``info``: ``task`` and ``failed`` (the attributes that failed) per image."""
    _check_inputs(images, prompts, metadata)
    values, tasks, failed = [], [], []
    for i, p in enumerate(prompts):
        res = check(images[i], _spec(p, metadata[i] if metadata else None))
        values.append(1.0 if res.correct else 0.0)
        tasks.append(res.task)
        failed.append([a for a, ok in res.ok.items() if not ok])
    return _out(values, images), {"reward": "checker", "task": tasks, "failed": failed}


def partial_credit_reward(
    images: torch.Tensor, prompts: Sequence[str], metadata=None
) -> tuple[torch.Tensor, dict]:
    """The fraction of the checker's attribute checks that pass (count, shape, and colour,
    background, position when the prompt names them): 1.0 for a correct image."""
    _check_inputs(images, prompts, metadata)
    values, checks = [], []
    for i, p in enumerate(prompts):
        res = check(images[i], _spec(p, metadata[i] if metadata else None, "the partial-credit reward"))
        values.append(sum(res.ok.values()) / len(res.ok))
        checks.append(dict(res.ok))
    return _out(values, images), {"reward": "partial_credit", "checks": checks}


def counting_reward(images: torch.Tensor, prompts: Sequence[str], metadata=None) -> tuple[torch.Tensor, dict]:
    """Flow-GRPO's counting reward ``max(0, 1 - |N_gen - N_ref| / N_ref)`` for each object group of
    the prompt, averaged over the groups. ``N_gen`` counts the detected objects of the group's shape
    (and colour, when the prompt names one); ``N_ref`` is the count the prompt asks for."""
    _check_inputs(images, prompts, metadata)
    values, counts = [], []
    for i, p in enumerate(prompts):
        spec = _spec(p, metadata[i] if metadata else None, "the counting reward")
        found = detect(images[i]).objects
        per_group, got = [], []
        for g in spec.objects:
            n_gen = sum(f.shape == g.shape and (g.color is None or f.color == g.color) for f in found)
            per_group.append(max(0.0, 1.0 - abs(n_gen - g.count) / g.count))
            got.append(n_gen)
        values.append(sum(per_group) / len(per_group))
        counts.append({"found": got, "wanted": [g.count for g in spec.objects]})
    return _out(values, images), {"reward": "counting", "counts": counts}


def mix_rewards(parts: Sequence[tuple[RewardFn, float]], name: str = "mix") -> RewardFn:
    """A reward ``sum_k w_k * r_k(images, prompts, metadata)``; ``info['components']`` holds each
    part's rewards (detached) and ``info['parts']`` each part's info. Differentiable where the
    parts are."""
    parts = list(parts)
    if not parts:
        raise ValueError("mix_rewards needs at least one (reward_fn, weight) pair")
    for fn, w in parts:
        if not callable(fn):
            raise ValueError(f"mix_rewards: {fn!r} is not a reward function")
        if not isinstance(w, int | float):
            raise ValueError(f"mix_rewards: weight {w!r} is not a number")

    def mixed(images: torch.Tensor, prompts: Sequence[str], metadata=None) -> tuple[torch.Tensor, dict]:
        total, components, infos = None, [], []
        for fn, w in parts:
            r, info = fn(images, prompts, metadata)
            total = w * r if total is None else total + w * r
            components.append(r.detach())
            infos.append(info)
        return total, {
            "reward": name,
            "weights": [w for _, w in parts],
            "components": components,
            "parts": infos,
        }

    mixed.__name__ = name
    return mixed
