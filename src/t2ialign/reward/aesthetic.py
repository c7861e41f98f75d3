"""An aesthetic score: a linear-layer MLP on a CLIP model's unit-norm image embeddings, its weights
from a file (LAION's "improved aesthetic predictor", ``sac+logos+ava1-l14-linearMSE.pth`` on CLIP
ViT-L/14, as DDPO's aesthetic reward uses it; or any MLP saved the same way).

The file is a state dict (``.pth`` / ``.pt`` read with ``torch.load(weights_only=True)``, or
``.safetensors``) whose 2-d ``*.weight`` tensors, in the order of their keys' layer numbers
(``layers.0.weight``, ``layers.2.weight``, ...), are the MLP's linear layers with their biases. As in
LAION's predictor, there is no nonlinearity between them (their dropout is off at inference). The
first layer must take the CLIP model's embedding size; the last must give one number.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn


def load_mlp(path: str | Path) -> nn.Sequential:
    """The MLP of a weights file (see the module docstring); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such aesthetic-MLP weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"{path}: cannot read the weights ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")

    def order(key: str):
        return [int(n) for n in re.findall(r"\d+", key)] or [0]

    weights = sorted((k for k, v in state.items() if k.endswith("weight") and v.dim() == 2), key=order)
    if not weights:
        raise ValueError(f"{path}: no linear layers (2-d '*.weight' tensors)")
    layers = []
    for k in weights:
        w = state[k].float()
        b = state.get(k[: -len("weight")] + "bias")
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b.float())
        if layers and layers[-1].out_features != lin.in_features:
            raise ValueError(
                f"{path}: layer {k} takes {lin.in_features} inputs, the one before gives "
                f"{layers[-1].out_features}"
            )
        layers.append(lin)
    if layers[-1].out_features != 1:
        raise ValueError(f"{path}: the last layer gives {layers[-1].out_features} numbers, not one score")
    return nn.Sequential(*layers).eval().requires_grad_(False)


class AestheticReward(nn.Module):
    """``mlp(normalize(clip.encode_image(images)))`` as a reward function (prompts are not read);
    differentiable w.r.t. the pixels."""

    def __init__(self, backbone: nn.Module, weights: str | Path, name: str = "aesthetic"):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.mlp = load_mlp(weights).to(next(backbone.parameters()).device)
        if self.mlp[0].in_features != backbone.embed_dim:
            raise ValueError(
                f"{weights}: the MLP takes {self.mlp[0].in_features}-d embeddings, the CLIP model gives "
                f"{backbone.embed_dim}-d (LAION's predictor is for CLIP ViT-L/14, 768-d)"
            )
        self.name = name

    def forward(
        self, images: torch.Tensor, prompts: Sequence[str], metadata=None
    ) -> tuple[torch.Tensor, dict]:
        from t2ialign.reward.rewards import _check_inputs

        _check_inputs(images, prompts, metadata)
        emb = self.backbone.encode_image(images)  # unit norm, as the predictor was trained on
        return self.mlp(emb).squeeze(-1).float().to(images.device), {"reward": self.name}
