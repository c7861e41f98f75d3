"""The reward model of the seed paper: a frozen image-text encoder and a trainable 2-layer MLP head.

``r_phi(x, z) = MLP([e_x, e_z, e_x * e_z])`` with ``e_x = encode_image(x)`` and ``e_z = encode_text(z)``
the frozen backbone's unit-norm embeddings (Lee et al. 2023 used CLIP ViT-L/14 and 1,024 hidden
units). The score is unbounded; trained by MSE on labels in {0, 1}, it estimates the probability that
the image matches its prompt. Two options of :class:`RewardHeadConfig` change the head's inductive
bias: ``features='product'`` feeds the MLP ``e_x * e_z`` alone (no prompt identity to memorise), and
``cosine_skip`` adds ``a * cos(e_x, e_z)`` to the MLP's output (a skip connection from the zero-shot
similarity; ``docs/RESULTS.md`` measures both).

A backbone is any module with ``embed_dim``, ``encode_image(images)`` (images in [0, 1], (B, 3, H, W),
differentiable w.r.t. the pixels), ``encode_text(prompts)`` and ``reference()`` (a JSON-ready dict that
names it in a checkpoint card). Two exist: :class:`EncoderBackbone` (the shipped encoder of the shapes
world, the default) and :class:`t2ialign.reward.clip.CLIPBackbone` (CLIP loaded by ``transformers``
from a local folder).

A checkpoint is a folder holding ``model.safetensors`` (the head's weights only) and ``card.json``
(kind ``t2ialign-reward``, the backbone reference with a fingerprint of its weights, the head config,
and what training wrote: data counts, losses, metrics). :func:`load_reward_model` raises
:class:`~t2ialign.models.generator.CheckpointError` with the reason when a folder is corrupt or does
not fit (wrong kind, newer format, another backbone, mismatched sizes)::

    from t2ialign.reward import load_reward_model
    model = load_reward_model("reward/")
    scores = model(images, prompts)     # (B,), differentiable w.r.t. images
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from t2ialign.models.generator import CARD, WEIGHTS, CheckpointError, load_state, read_card

KIND = "t2ialign-reward"
FORMAT_VERSION = 1


def weights_fingerprint(folder: str | Path) -> str:
    """A cheap fingerprint of a model folder's weight files: SHA-256 (first 16 hex digits) of each
    file's name, size, first and last MiB. It tells two checkpoints apart without hashing gigabytes."""
    folder = Path(folder)
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth")
    )
    if not files:
        raise CheckpointError(f"{folder}: no weight files (*.safetensors, *.bin)")
    h = hashlib.sha256()
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), 2)
                h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


class EncoderBackbone(nn.Module):
    """The shipped (or another) dual encoder of the shapes world as a frozen backbone."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu"):
        from t2ialign.models.encoder import default_encoder_path, load_encoder

        super().__init__()
        self.path = Path(path).resolve() if path is not None else None
        self.encoder = load_encoder(self.path, device=device)
        self.embed_dim = self.encoder.config.embed_dim
        self.image_size = self.encoder.config.image_size
        self.fingerprint = weights_fingerprint(self.path or default_encoder_path())

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings (B, D) of images in [0, 1] (B, 3, H, W); differentiable."""
        return self.encoder.encode_image(images.to(self.encoder.device, torch.float32))

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.encoder.encode_text(list(prompts))

    def reference(self) -> dict:
        return {
            "type": "t2ialign-encoder",
            "path": str(self.path) if self.path is not None else None,  # None: the shipped encoder
            "fingerprint": self.fingerprint,
            "embed_dim": self.embed_dim,
        }


def load_backbone(ref: dict, device: str | torch.device = "cpu", path: str | Path | None = None) -> nn.Module:
    """The backbone a card's ``backbone`` entry names (``path`` overrides where it is looked for);
    raises CheckpointError when it is missing or its weights are not the ones the head was trained on."""
    kind = ref.get("type") if isinstance(ref, dict) else None
    where = path if path is not None else (ref or {}).get("path")
    if kind not in ("t2ialign-encoder", "clip"):
        raise CheckpointError(f"unknown backbone type {kind!r} (known: t2ialign-encoder, clip)")
    if where is not None and not Path(where).is_dir():
        raise CheckpointError(
            f"the backbone folder {where} of this reward model does not exist; pass the folder that now "
            "holds it (backbone_path=... / --backbone)"
        )
    if kind == "clip":
        from t2ialign.reward.clip import CLIPBackbone

        if where is None:
            raise CheckpointError("a CLIP backbone reference needs a path")
        backbone = CLIPBackbone(where, device=device)
    else:
        backbone = EncoderBackbone(where, device=device)
    want = ref.get("fingerprint")
    if want is not None and backbone.fingerprint != want:
        raise CheckpointError(
            f"the backbone at {where or 'the shipped encoder'} has weights fingerprint "
            f"{backbone.fingerprint}, but this reward head was trained on {want}: retrain the head for "
            "this backbone"
        )
    return backbone


FEATURES = ("concat", "product")


@dataclass
class RewardHeadConfig:
    embed_dim: int  # the backbone's joint embedding size D
    hidden: int = 256  # hidden units of the 2-layer MLP (the paper: 1,024 on CLIP ViT-L/14)
    dropout: float = 0.1  # dropout after the hidden layer (training only)
    init_bias: float = 0.5  # initial output bias: a prior between the labels 0 and 1
    cosine_skip: bool = False  # add a learned linear term a * cos(e_x, e_z) (MLP output zero-initialised)
    features: str = "concat"  # MLP input: 'concat' [e_x, e_z, e_x * e_z] or 'product' e_x * e_z alone

    def __post_init__(self):
        if not isinstance(self.embed_dim, int) or self.embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive integer, got {self.embed_dim!r}")
        if not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {self.hidden!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.features not in FEATURES:
            raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {self.features!r}")


class RewardHead(nn.Module):
    """``MLP([e_x, e_z, e_x * e_z])``: Linear(3D, H) -> GELU -> Dropout -> Linear(H, 1).

    With ``cosine_skip``: ``a * cos(e_x, e_z) + MLP(...)``, a skip connection from the zero-shot
    similarity, with the MLP's output layer initialised to zero (so the untrained head is an affine
    map of the similarity; training sets ``a`` and the bias by least squares first).

    Inputs broadcast over leading dimensions: ``img`` (B, 1, D) against ``txt`` (B, N, D) gives
    (B, N) scores (one image against its N candidate prompts)."""

    def __init__(self, cfg: RewardHeadConfig):
        super().__init__()
        self.config = cfg
        d = cfg.embed_dim
        self.fc1 = nn.Linear((3 if cfg.features == "concat" else 1) * d, cfg.hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(cfg.dropout)
        self.fc2 = nn.Linear(cfg.hidden, 1)
        nn.init.constant_(self.fc2.bias, cfg.init_bias)
        if cfg.cosine_skip:
            nn.init.zeros_(self.fc2.weight)
            self.skip = nn.Parameter(torch.zeros(()))

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        img, txt = torch.broadcast_tensors(img, txt)
        prod = img * txt
        x = torch.cat([img, txt, prod], dim=-1) if self.config.features == "concat" else prod
        out = self.fc2(self.drop(self.act(self.fc1(x)))).squeeze(-1)
        if self.config.cosine_skip:
            out = out + self.skip * prod.sum(-1)  # unit-norm embeddings: the sum is the cosine
        return out


class RewardModel(nn.Module):
    """A frozen backbone and a trainable head; ``model(images, prompts)`` -> scores (B,),
    differentiable with respect to the pixels. ``card`` holds the checkpoint card when loaded."""

    def __init__(self, backbone: nn.Module, head: RewardHead):
        super().__init__()
        if head.config.embed_dim != backbone.embed_dim:
            raise CheckpointError(
                f"the head takes {head.config.embed_dim}-d embeddings but the backbone gives "
                f"{backbone.embed_dim}-d ones"
            )
        self.backbone = backbone.eval().requires_grad_(False)
        self.head = head
        self.card: dict = {}

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    def train(self, mode: bool = True) -> RewardModel:
        super().train(mode)
        self.backbone.eval()  # frozen: never in training mode
        return self

    def score_embeddings(self, img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
        """The head on precomputed backbone embeddings (broadcasting, see :class:`RewardHead`)."""
        return self.head(img_emb, txt_emb)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        return self.head(self.backbone.encode_image(images), self.backbone.encode_text(list(prompts)))


def build_reward_model(
    backbone: nn.Module,
    hidden: int = 256,
    dropout: float = 0.1,
    seed: int = 0,
    cosine_skip: bool = False,
    features: str = "concat",
) -> RewardModel:
    """A reward model with a freshly initialised (seeded) head on ``backbone``."""
    torch.manual_seed(seed)
    cfg = RewardHeadConfig(
        embed_dim=int(backbone.embed_dim),
        hidden=hidden,
        dropout=dropout,
        cosine_skip=cosine_skip,
        features=features,
    )
    head = RewardHead(cfg)
    return RewardModel(backbone, head.to(next(backbone.parameters()).device))


def save_reward_model(model: RewardModel, folder: str | Path, card: dict | None = None) -> Path:
    """Write the head's weights and ``card.json`` (kind, format, backbone reference, head config and
    the given card fields) to ``folder``; the weights go to a temporary file first."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(folder / WEIGHTS)
    info = {
        **(card or {}),
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "backbone": model.backbone.reference(),
        "head": asdict(model.head.config),
    }
    tmp = folder / (CARD + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(folder / CARD)
    model.card = info
    return folder


def load_reward_model(
    folder: str | Path,
    device: str | torch.device = "cpu",
    backbone: nn.Module | None = None,
    backbone_path: str | Path | None = None,
) -> RewardModel:
    """Load a reward checkpoint folder (in eval mode). ``backbone``: an already loaded backbone to
    reuse (its fingerprint must match the card's); ``backbone_path``: where the card's backbone lives
    now, when it moved. Raises CheckpointError naming what is wrong."""
    folder = Path(folder)
    card = read_card(folder, KIND)
    version = card.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder / CARD}: format_version {version!r} is not one this t2ialign reads "
            f"(<= {FORMAT_VERSION})"
        )
    try:
        head_cfg = RewardHeadConfig(**card["head"])
        ref = dict(card["backbone"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CARD}: bad head or backbone entry ({e})") from None
    if backbone is None:
        backbone = load_backbone(ref, device=device, path=backbone_path)
    elif ref.get("fingerprint") not in (None, getattr(backbone, "fingerprint", None)):
        raise CheckpointError(
            f"{folder}: the given backbone (fingerprint {getattr(backbone, 'fingerprint', None)}) is not the "
            f"one this head was trained on ({ref.get('fingerprint')})"
        )
    if head_cfg.embed_dim != backbone.embed_dim:
        raise CheckpointError(
            f"{folder}: the head takes {head_cfg.embed_dim}-d embeddings, the backbone gives "
            f"{backbone.embed_dim}-d"
        )
    head = RewardHead(head_cfg)
    load_state(head, folder)
    model = RewardModel(backbone, head).to(device).eval()
    model.card = card
    return model
