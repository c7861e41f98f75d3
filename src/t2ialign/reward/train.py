"""Train the reward model on a feedback project (Lee et al. 2023, stage 2).

Data (from :class:`t2ialign.feedback.FeedbackStore`):

- every active good/bad label is one MSE example ``(image, prompt, y)``;
- every label *good* is one example of the auxiliary prompt-classification loss when its prompt has
  negatives: the candidates are the true prompt and prompts the image does not show, and the reward
  must rank the true one first. They come from the prompt's metadata ``negatives`` when given; else,
  for a prompt the world's grammar reads, every prompt that differs from it in exactly one attribute
  (``world.suites.perturbations``, all in canonical phrasing, ``to_prompt``); else from word swaps
  among ``swap_words`` (see :mod:`t2ialign.reward.negatives`). Good labels with no negatives are
  counted (``good_without_negatives``) and train the other losses only;
- every active pairwise comparison is one Bradley-Terry example (ties with target 0.5 / 0.5).

The backbone is frozen, so the image and text embeddings are computed once (per image and per
distinct prompt) and training runs on those cached tensors: seconds per hundred epochs on a CPU.

Validation is a split *by prompt* (no prompt has images on both sides); training stops when the
validation criterion has not improved for ``patience`` epochs and keeps the best epoch's head. The
criterion is by default the Brier score of the score clamped to [0, 1] (plus the Bradley-Terry loss
when there are pairs): the auxiliary loss pushes the scores of mismatched prompts far below 0, which
inflates the plain validation MSE without hurting the reward's reading as a probability. The
decision threshold is chosen on the validation labels. Prompts of the world's held-out (unseen) part
are left out of training by default, so that they stay a test of generalisation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from t2ialign.reward.losses import (
    DEFAULT_LAMBDA,
    DEFAULT_TEMPERATURE,
    bradley_terry_loss,
    mse_loss,
    prompt_classification_loss,
    total_loss,
)
from t2ialign.reward.model import EncoderBackbone, RewardModel, build_reward_model, save_reward_model
from t2ialign.reward.negatives import DEFAULT_SWAP_LIMIT, check_word_groups, free_text_candidates
from t2ialign.world.grammar import to_prompt
from t2ialign.world.spec import Spec
from t2ialign.world.suites import perturbations

BACKBONES = ("encoder", "clip")
LABEL_SETS = ("all", "human", "simulated")


@dataclass
class RewardTrainConfig:
    """Settings of one reward-model training run (validated on construction)."""

    backbone: str = "encoder"  # 'encoder' (the shapes world's dual encoder) or 'clip' (transformers)
    backbone_path: str | None = None  # encoder folder (None: the shipped one) or CLIP folder (required)
    hidden: int = 256  # hidden units of the 2-layer MLP head
    dropout: float = 0.1  # dropout in the head during training
    cosine_skip: bool = False  # head = a * cosine + MLP, starting from a least-squares fit of a
    features: str = "concat"  # MLP input: 'concat' [img, txt, img * txt] or 'product' img * txt
    early_stop: str = "brier"  # validation criterion: 'brier' (MSE of the clamped score) or 'total'
    aux: bool = True  # use the auxiliary prompt-classification loss (off: the ablation)
    swap_words: tuple = ()  # free text: groups of interchangeable words whose swaps are negatives
    swap_limit: int = DEFAULT_SWAP_LIMIT  # at most this many word-swapped negatives per prompt
    lam: float = DEFAULT_LAMBDA  # lambda, the weight of the auxiliary loss (0.5 published)
    temperature: float = DEFAULT_TEMPERATURE  # T of the auxiliary softmax (2 published)
    pairs: bool = True  # use the project's pairwise comparisons (Bradley-Terry) when it has any
    bt_weight: float = 1.0  # weight of the Bradley-Terry loss
    labels: str = "all"  # which labels to learn from: all, human or simulated
    holdout_unseen: bool = True  # never train on prompts of the world's unseen part
    val_fraction: float = 0.2  # fraction of the prompts held out for validation
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-2  # AdamW weight decay
    batch_size: int = 64  # labelled images per step
    max_epochs: int = 300  # upper bound on epochs over the training labels
    patience: int = 30  # epochs without a better validation objective before stopping
    seed: int = 0  # seeds the head's initialisation and the order of the batches
    split_seed: int = 0  # seeds the validation split by prompt
    device: str = "cpu"  # torch device
    embed_batch_size: int = 256  # images per batch when caching the backbone's embeddings

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.backbone == "clip" and not self.backbone_path:
            raise ValueError("a CLIP backbone needs backbone_path, a local folder holding the CLIP model")
        if self.labels not in LABEL_SETS:
            raise ValueError(f"labels must be one of {', '.join(LABEL_SETS)}, got {self.labels!r}")
        self.swap_words = check_word_groups(self.swap_words)
        for name in ("hidden", "batch_size", "max_epochs", "patience", "embed_batch_size", "swap_limit"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lam < 0 or self.bt_weight < 0:
            raise ValueError("lam and bt_weight must be non-negative")
        if self.features not in ("concat", "product"):
            raise ValueError(f"features must be 'concat' or 'product', got {self.features!r}")
        if self.early_stop not in ("brier", "total"):
            raise ValueError(f"early_stop must be 'brier' or 'total', got {self.early_stop!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("lr must be positive and weight_decay non-negative")


def candidate_prompts(spec: dict | Spec) -> list[str]:
    """The auxiliary loss's candidates for an image of ``spec``: its canonical prompt first, then
    the canonical prompt of every spec that differs from it in exactly one attribute."""
    s = spec if isinstance(spec, Spec) else Spec.from_dict(spec)
    return [to_prompt(s)] + [to_prompt(p) for _, p in perturbations(s)]


def aux_candidates(prompt: str, spec, metadata: dict | None, cfg: RewardTrainConfig):
    """(candidates with the true prompt first, or None; where they came from): the metadata's
    ``negatives``, else the spec's one-attribute perturbations, else word swaps (module docstring)."""
    if (metadata or {}).get("negatives"):
        return free_text_candidates(prompt, metadata, (), cfg.swap_limit), "negatives"
    if spec is not None:
        return candidate_prompts(spec), "spec"
    return free_text_candidates(prompt, None, cfg.swap_words, cfg.swap_limit), "word_swaps"


def split_prompts(prompts, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) prompts: a seeded shuffle of the sorted distinct prompts; at least one
    validation prompt when there are two or more and ``val_fraction > 0``."""
    ps = sorted(set(prompts))
    rng = np.random.default_rng(seed)
    order = [ps[i] for i in rng.permutation(len(ps))]
    n_val = math.ceil(val_fraction * len(ps)) if val_fraction > 0 and len(ps) >= 2 else 0
    n_val = min(n_val, len(ps) - 1) if ps else 0
    return sorted(order[n_val:]), sorted(order[:n_val])


@dataclass
class RewardData:
    """Cached embeddings and index tensors of a project's labels, aux candidates and pairs."""

    img_emb: torch.Tensor  # (G, D) per distinct image
    txt_emb: torch.Tensor  # (P, D) per distinct prompt text
    texts: list[str]  # prompt text of each txt_emb row
    label_img: torch.Tensor  # (L,) image row of each label
    label_txt: torch.Tensor  # (L,) prompt row of each label
    label_y: torch.Tensor  # (L,) 0/1
    label_val: torch.Tensor  # (L,) bool: in the validation split
    aux_img: torch.Tensor  # (A,) image row of each good label with a spec
    aux_cand: torch.Tensor  # (A, N) prompt rows of the candidates (true first), padded
    aux_mask: torch.Tensor  # (A, N) bool, False on padding
    aux_val: torch.Tensor  # (A,) bool
    aux_label: torch.Tensor  # (A,) the label row each aux example comes from
    pair_w: torch.Tensor  # (Q,) image rows of the winners (left image of a tie)
    pair_l: torch.Tensor  # (Q,)
    pair_txt: torch.Tensor  # (Q,)
    pair_tie: torch.Tensor  # (Q,) bool
    pair_val: torch.Tensor  # (Q,) bool
    train_prompts: list[str] = field(default_factory=list)
    val_prompts: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)

    def aux_candidates(self, i: int) -> list[str]:
        """The candidate prompts (true first) of aux example ``i``."""
        return [
            self.texts[j]
            for j, m in zip(self.aux_cand[i].tolist(), self.aux_mask[i].tolist(), strict=True)
            if m
        ]

    def restrict(self, train_prompts) -> RewardData:
        """A copy that keeps the validation rows and the training rows of ``train_prompts`` only
        (for learning curves); embeddings are shared, not copied."""
        keep_p = set(train_prompts) | set(self.val_prompts)
        keep = torch.tensor([self.texts[t] in keep_p for t in self.label_txt.tolist()], dtype=torch.bool)
        rows = torch.nonzero(keep).squeeze(1)
        new_row = torch.full((len(keep),), -1, dtype=torch.long)
        new_row[rows] = torch.arange(len(rows))
        aux = torch.nonzero(keep[self.aux_label]).squeeze(1) if len(self.aux_label) else self.aux_label
        pair_keep = [self.texts[t] in keep_p for t in self.pair_txt.tolist()]
        pairs = (
            torch.nonzero(torch.tensor(pair_keep, dtype=torch.bool)).squeeze(1)
            if pair_keep
            else self.pair_txt
        )
        tp = sorted(p for p in self.train_prompts if p in keep_p)
        return dataclasses.replace(
            self,
            label_img=self.label_img[rows],
            label_txt=self.label_txt[rows],
            label_y=self.label_y[rows],
            label_val=self.label_val[rows],
            aux_img=self.aux_img[aux],
            aux_cand=self.aux_cand[aux],
            aux_mask=self.aux_mask[aux],
            aux_val=self.aux_val[aux],
            aux_label=new_row[self.aux_label[aux]],
            pair_w=self.pair_w[pairs],
            pair_l=self.pair_l[pairs],
            pair_txt=self.pair_txt[pairs],
            pair_tie=self.pair_tie[pairs],
            pair_val=self.pair_val[pairs],
            train_prompts=tp,
            counts={
                **self.counts,
                "train_prompts": len(tp),
                "train_labels": int((~self.label_val[rows]).sum()),
            },
        )


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def build_data(store, cfg: RewardTrainConfig, backbone, progress: bool = False) -> RewardData:
    """Read the project's labels and pairs, split by prompt, and cache the frozen embeddings."""
    from tqdm import tqdm

    simulated = {"all": None, "human": False, "simulated": True}[cfg.labels]
    recs = [
        r
        for r in store.labelled_images(simulated=simulated, load_images=False)
        if not (cfg.holdout_unseen and r.split == "unseen")
    ]
    pairs = []
    if cfg.pairs:
        pairs = [
            p
            for p in store.pairs(simulated=simulated, load_images=False)
            if not (cfg.holdout_unseen and p.split == "unseen")
        ]
    if not recs and not pairs:
        raise ValueError(
            f"{store.path}: no {'' if cfg.labels == 'all' else cfg.labels + ' '}labels or comparisons to "
            "train on (label images with 't2ialign label serve' or 't2ialign label simulate')"
        )
    train_p, val_p = split_prompts(
        [r.prompt for r in recs] + [p.prompt for p in pairs], cfg.val_fraction, cfg.split_seed
    )
    val_set = set(val_p)

    gids = list(
        dict.fromkeys(
            [r.generation_id for r in recs] + [g for p in pairs for g in (p.generation_w, p.generation_l)]
        )
    )
    g_row = {g: i for i, g in enumerate(gids)}
    texts: dict[str, int] = {}

    def t_row(text: str) -> int:
        return texts.setdefault(text, len(texts))

    label_img, label_txt, label_y, label_val = [], [], [], []
    aux_img, aux_rows, aux_val, aux_label = [], [], [], []
    no_spec, no_negatives, sources = 0, 0, {"negatives": 0, "spec": 0, "word_swaps": 0}
    metadata = store.prompt_metadata() if cfg.aux else {}
    cands_of: dict[str, tuple[list[str] | None, str]] = {}
    for li, r in enumerate(recs):
        label_img.append(g_row[r.generation_id])
        label_txt.append(t_row(r.prompt))
        label_y.append(float(r.label))
        label_val.append(r.prompt in val_set)
        if cfg.aux and r.label == 1:
            if r.prompt not in cands_of:
                cands_of[r.prompt] = aux_candidates(r.prompt, r.spec, metadata.get(r.prompt), cfg)
            cands, source = cands_of[r.prompt]
            no_spec += r.spec is None
            if cands is None:
                no_negatives += 1
                continue
            sources[source] += 1
            aux_img.append(g_row[r.generation_id])
            aux_rows.append([t_row(p) for p in cands])
            aux_val.append(r.prompt in val_set)
            aux_label.append(li)
    n_cand = max((len(c) for c in aux_rows), default=1)
    aux_cand = torch.zeros(len(aux_rows), n_cand, dtype=torch.long)
    aux_mask = torch.zeros(len(aux_rows), n_cand, dtype=torch.bool)
    for i, c in enumerate(aux_rows):
        aux_cand[i, : len(c)] = torch.tensor(c)
        aux_mask[i, : len(c)] = True
    pw, pl, pt, ptie, pval = [], [], [], [], []
    for p in pairs:
        pw.append(g_row[p.generation_w])
        pl.append(g_row[p.generation_l])
        pt.append(t_row(p.prompt))
        ptie.append(p.tie)
        pval.append(p.prompt in val_set)

    # cache the frozen embeddings
    img_chunks = []
    starts = range(0, len(gids), cfg.embed_batch_size)
    for s in tqdm(starts, desc="embed images", unit="batch", disable=not progress):
        chunk = gids[s : s + cfg.embed_batch_size]
        sha = [store.generation(g)["image_sha256"] for g in chunk]
        x = _to_tensor([store.load_image_file(h) for h in sha]).to(cfg.device)
        img_chunks.append(backbone.encode_image(x).float())
    text_list = list(texts)
    txt_chunks = [
        backbone.encode_text(text_list[s : s + 1024]).float() for s in range(0, len(text_list), 1024)
    ]
    D = backbone.embed_dim
    long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    boolean = lambda v: torch.tensor(v, dtype=torch.bool)  # noqa: E731
    label_val_t = boolean(label_val)
    y = torch.tensor(label_y, dtype=torch.float32)
    counts = {
        "labels": len(recs),
        "images": len(gids),
        "prompts": len(set(train_p) | val_set),
        "train_prompts": len(train_p),
        "val_prompts": len(val_p),
        "train_labels": int((~label_val_t).sum()),
        "val_labels": int(label_val_t.sum()),
        "good_fraction": float(y.mean()) if len(y) else None,
        "aux_examples": len(aux_rows),
        "aux_candidates_mean": float(np.mean([len(c) for c in aux_rows])) if aux_rows else 0.0,
        "good_without_spec": no_spec,
        "good_without_negatives": no_negatives,
        "aux_sources": sources,
        "pairs": len(pairs),
        "pair_ties": int(sum(ptie)),
        "texts": len(text_list),
    }
    return RewardData(
        img_emb=torch.cat(img_chunks) if img_chunks else torch.zeros(0, D, device=cfg.device),
        txt_emb=torch.cat(txt_chunks) if txt_chunks else torch.zeros(0, D, device=cfg.device),
        texts=text_list,
        label_img=long(label_img),
        label_txt=long(label_txt),
        label_y=y,
        label_val=label_val_t,
        aux_img=long(aux_img),
        aux_cand=aux_cand,
        aux_mask=aux_mask,
        aux_val=boolean(aux_val),
        aux_label=long(aux_label),
        pair_w=long(pw),
        pair_l=long(pl),
        pair_txt=long(pt),
        pair_tie=boolean(ptie),
        pair_val=boolean(pval),
        train_prompts=train_p,
        val_prompts=val_p,
        counts=counts,
    )


def _losses(model: RewardModel, data: RewardData, cfg: RewardTrainConfig, lab, aux, pair) -> dict:
    """The loss terms on index subsets (tensors of rows) of labels, aux examples and pairs."""
    dev = data.img_emb.device
    out = {}
    if len(lab):
        r = model.score_embeddings(data.img_emb[data.label_img[lab]], data.txt_emb[data.label_txt[lab]])
        out["mse"] = mse_loss(r, data.label_y[lab].to(dev))  # E (y - r_phi(x, z))^2
    if len(aux):
        img = data.img_emb[data.aux_img[aux]].unsqueeze(1)  # (A, 1, D)
        txt = data.txt_emb[data.aux_cand[aux]]  # (A, N, D)
        scores = model.score_embeddings(img, txt)  # (A, N): r_phi(x, z_j)
        out["pc"] = prompt_classification_loss(scores, cfg.temperature, 0, data.aux_mask[aux].to(dev))
    if len(pair):
        t = data.txt_emb[data.pair_txt[pair]]
        r_w = model.score_embeddings(data.img_emb[data.pair_w[pair]], t)
        r_l = model.score_embeddings(data.img_emb[data.pair_l[pair]], t)
        out["bt"] = bradley_terry_loss(r_w, r_l, data.pair_tie[pair].to(dev))
    if out:
        out["total"] = total_loss(out.get("mse"), out.get("pc"), out.get("bt"), cfg.lam, cfg.bt_weight)
    return out


@torch.no_grad()
def _brier(model: RewardModel, data: RewardData, rows: torch.Tensor) -> float:
    """Brier score of the score clamped to [0, 1] (its reading as a probability) on label rows."""
    r = model.score_embeddings(data.img_emb[data.label_img[rows]], data.txt_emb[data.label_txt[rows]])
    return ((r.clamp(0, 1) - data.label_y[rows].to(r.device)) ** 2).mean().item()


@torch.no_grad()
def init_from_similarity(model: RewardModel, data: RewardData) -> tuple[float, float] | None:
    """With a cosine skip: set its weight ``a`` and the output bias ``b`` by least squares of the
    training labels on the zero-shot similarity (``y ~ a * cos + b``); returns (a, b)."""
    rows = torch.nonzero(~data.label_val).squeeze(1)
    if not model.head.config.cosine_skip or len(rows) < 2:
        return None
    cos = (data.img_emb[data.label_img[rows]] * data.txt_emb[data.label_txt[rows]]).sum(-1).double()
    y = data.label_y[rows].double().to(cos.device)
    var = cos.var(unbiased=False)
    a = (((cos - cos.mean()) * (y - y.mean())).mean() / var).item() if var > 1e-12 else 0.0
    b = (y.mean() - a * cos.mean()).item()
    model.head.skip.fill_(a)
    model.head.fc2.bias.fill_(b)
    return a, b


@torch.no_grad()
def label_scores(model: RewardModel, data: RewardData) -> np.ndarray:
    """The model's score for every label row of ``data``."""
    model.eval()
    r = model.score_embeddings(data.img_emb[data.label_img], data.txt_emb[data.label_txt])
    return r.float().cpu().numpy()


def machine_description() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def make_backbone(cfg: RewardTrainConfig):
    if cfg.backbone == "clip":
        from t2ialign.reward.clip import CLIPBackbone

        return CLIPBackbone(cfg.backbone_path, device=cfg.device)
    return EncoderBackbone(cfg.backbone_path, device=cfg.device)


@contextlib.contextmanager
def _one_thread(device: str):
    """Run the head's training on one CPU thread: its matrices are tiny, and on a busy machine a
    thread pool's synchronisation costs far more than it saves (100x measured on 2 shared cores)."""
    n = torch.get_num_threads()
    if str(device).startswith("cpu"):
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def fit_head(
    model: RewardModel,
    data: RewardData,
    cfg: RewardTrainConfig,
    progress: bool = False,
    where: str = "",
    ranks=None,
):
    """Train ``model``'s head on cached ``data``: the epoch loop with early stopping on the
    validation criterion (``cfg.early_stop``); leaves the best epoch's head in ``model``, in eval
    mode. Returns (history, best epoch).

    ``ranks`` (a :class:`t2ialign.algorithms.common.Ranks` of N > 1 processes, every one holding the
    same ``data`` and head): each step's batch (labels, auxiliary examples and pairs, as one process
    draws them) is split contiguously over the ranks, each rank's loss terms are weighted by its
    share of the batch so that the mean of the ranks' gradients (averaged after the backward pass) is
    the gradient of the whole batch's loss, and every rank evaluates the full validation set; the
    early-stopping criterion is rank 0's, so every rank stops at the same epoch with the same head."""
    with _one_thread(cfg.device):
        history, best_epoch = _fit(model, data, cfg, progress, where, ranks)
    model.eval()
    return history, best_epoch


def _split(rows: torch.Tensor, ranks) -> torch.Tensor:
    """This rank's contiguous share of ``rows`` (sizes differ by at most one)."""
    n = len(rows)
    return rows[ranks.rank * n // ranks.world : (ranks.rank + 1) * n // ranks.world]


def _shard_losses(model, data, cfg, lab, aux, pair, ranks) -> tuple[torch.Tensor | None, dict[str, float]]:
    """This rank's share of the loss of the batch (``lab``, ``aux``, ``pair``: the whole batch's
    rows): ``world * sum_t w_t (n_t / N_t) L_t`` over the terms t (mse, pc, bt; w_t = 1, lambda,
    bt_weight), with ``L_t`` the mean over the rank's ``n_t`` of the batch's ``N_t`` examples, so the
    ranks' mean is the batch's :func:`total_loss`. Returns (that loss, or None when this rank has
    no example, and the rank's contributions ``(n_t / N_t) L_t`` to each term and to the total)."""
    mine = {"mse": _split(lab, ranks), "pc": _split(aux, ranks), "bt": _split(pair, ranks)}
    total = {"mse": len(lab), "pc": len(aux), "bt": len(pair)}
    weight = {"mse": 1.0, "pc": cfg.lam, "bt": cfg.bt_weight}
    terms = _losses(model, data, cfg, mine["mse"], mine["pc"], mine["bt"])
    loss, parts = None, {}
    for key in ("mse", "pc", "bt"):
        if key not in terms:
            continue
        share = len(mine[key]) / total[key]
        part = weight[key] * share * terms[key]
        loss = part if loss is None else loss + part
        parts[key] = share * terms[key].item()
        parts["total"] = parts.get("total", 0.0) + part.item()
    return (loss * ranks.world if loss is not None else None), parts


def _fit(
    model: RewardModel, data: RewardData, cfg: RewardTrainConfig, progress: bool, where: str = "", ranks=None
):
    from tqdm import tqdm

    active = ranks is not None and ranks.active
    params = list(model.head.parameters())
    if active:
        ranks.broadcast_params(params)  # every rank starts from rank 0's head
        if ranks.rank > 0:  # distinct dropout masks on every rank (rank 0 draws what one process draws)
            torch.manual_seed(cfg.seed * 1_000_003 + ranks.rank)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    tr_lab = torch.nonzero(~data.label_val).squeeze(1)
    va_lab = torch.nonzero(data.label_val).squeeze(1)
    va_aux = torch.nonzero(data.aux_val).squeeze(1)
    tr_pair = torch.nonzero(~data.pair_val).squeeze(1)
    va_pair = torch.nonzero(data.pair_val).squeeze(1)
    has_val = len(va_lab) + len(va_pair) > 0
    if len(tr_lab) + len(tr_pair) == 0:
        raise ValueError(f"{where}: every labelled prompt fell in the validation split; lower val_fraction")
    # each epoch: one pass over the training labels (or pairs when there are no labels); the aux
    # examples and the pairs are spread over the same number of steps
    n_main = len(tr_lab) if len(tr_lab) else len(tr_pair)
    steps = max(1, math.ceil(n_main / cfg.batch_size))
    aux_label_pos = {int(li): i for i, li in enumerate(data.aux_label.tolist())}
    history, best, best_state, best_epoch, bad = [], math.inf, None, 0, 0
    bar = tqdm(
        range(cfg.max_epochs),
        desc="train reward",
        unit="epoch",
        disable=not progress or (active and not ranks.is_main),
    )
    for epoch in bar:
        model.train()
        lab_perm = tr_lab[torch.randperm(len(tr_lab), generator=gen)]
        pair_perm = tr_pair[torch.randperm(len(tr_pair), generator=gen)]
        sums: dict[str, float] = {}
        for k in range(steps):
            lab = lab_perm[k * len(lab_perm) // steps : (k + 1) * len(lab_perm) // steps]
            # the aux loss sees the good images of this batch (each good label is one aux example)
            aux_idx = [aux_label_pos[int(li)] for li in lab.tolist() if int(li) in aux_label_pos]
            aux = torch.tensor(aux_idx, dtype=torch.long)
            pair = pair_perm[k * len(pair_perm) // steps : (k + 1) * len(pair_perm) // steps]
            if active:  # the same batch on every rank, each rank its share (see fit_head)
                if len(lab) + len(aux) + len(pair) == 0:
                    continue
                loss, parts = _shard_losses(model, data, cfg, lab, aux, pair, ranks)
                opt.zero_grad(set_to_none=True)
                if loss is not None:
                    loss.backward()
                ranks.sync_grads(params)
                opt.step()
                batch_terms = [key for key, r in (("mse", lab), ("pc", aux), ("bt", pair)) if len(r)]
                for key in [*batch_terms, "total"]:  # the batch's terms: the same keys on every rank
                    sums.setdefault(key, 0.0)
                for key, v in parts.items():
                    sums[key] += v / steps
                continue
            terms = _losses(model, data, cfg, lab, aux, pair)
            if "total" not in terms:
                continue
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            opt.step()
            for key, v in terms.items():
                sums[key] = sums.get(key, 0.0) + v.item() / steps
        if active and sums:  # the ranks' contributions add up to the batches' values
            keys = list(sums)
            summed = ranks.all_sum(torch.tensor([sums[key] for key in keys], dtype=torch.float64))
            sums = dict(zip(keys, summed.tolist(), strict=True))
        rec = {"epoch": epoch + 1, **{f"train_{k}": round(v, 5) for k, v in sums.items()}}
        if has_val:
            model.eval()
            with torch.no_grad():
                vt = _losses(model, data, cfg, va_lab, va_aux, va_pair)
            rec.update({f"val_{k}": round(v.item(), 5) for k, v in vt.items()})
            rec["val_brier"] = round(_brier(model, data, va_lab), 5) if len(va_lab) else None
            if cfg.early_stop == "total":
                objective = vt["total"].item()
            else:  # the clamped score's MSE, plus the Bradley-Terry term when there are pairs
                objective = (rec["val_brier"] or 0.0) + cfg.bt_weight * rec.get("val_bt", 0.0)
            if active:  # rank 0's criterion decides for all (the ranks' heads are the same)
                shared = torch.tensor([objective], dtype=torch.float64)
                ranks.broadcast_params([shared])
                objective = float(shared)
            if objective < best - 1e-6:
                best, best_epoch, bad = objective, epoch + 1, 0
                best_state = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
            else:
                bad += 1
        history.append(rec)
        bar.set_postfix(
            {k: f"{v:.3f}" for k, v in rec.items() if k in ("train_total", "val_total", "val_mse")}
        )
        if has_val and bad >= cfg.patience:
            break
    bar.close()
    if best_state is not None:
        model.head.load_state_dict(best_state)
    else:
        best_epoch = len(history)
    return history, best_epoch


def train_reward_model(
    store,
    cfg: RewardTrainConfig,
    out: str | Path | None = None,
    progress: bool = True,
    backbone=None,
    name: str | None = None,
    command: str | None = None,
    accelerator=None,
) -> RewardModel:
    """Train a reward head on the project ``store`` (a FeedbackStore); save it with its card to
    ``out`` when given. ``backbone``: an already loaded backbone to reuse (else built from ``cfg``);
    ``command``: the command line recorded in the card (default: this process's).

    With an ``accelerate.Accelerator`` of N processes, every rank reads the project and embeds it
    (the embeddings then taken from rank 0, so that all ranks hold the same data), ``batch_size``
    stays the global batch (an epoch has the steps of one process) and each step's batch is split
    over the ranks with the head's gradients averaged; validation runs on the full validation set on
    every rank and early stopping follows rank 0's criterion, so every rank ends with the same head
    (see :func:`fit_head`). ``cfg.device`` is replaced by the accelerator's device. The main process
    alone writes ``out``; every rank returns the model."""
    from t2ialign.algorithms.common import Ranks
    from t2ialign.reward.eval import binary_metrics, choose_threshold

    t0 = time.time()
    ranks = Ranks(accelerator)
    if ranks.active and torch.device(cfg.device) != ranks.device:
        cfg = dataclasses.replace(cfg, device=str(ranks.device))
    progress = progress and ranks.is_main
    backbone = backbone if backbone is not None else make_backbone(cfg)
    data = build_data(store, cfg, backbone, progress=progress)
    ranks.broadcast_params([data.img_emb, data.txt_emb])  # bit-identical data on every rank
    model = build_reward_model(
        backbone,
        hidden=cfg.hidden,
        dropout=cfg.dropout,
        seed=cfg.seed,
        cosine_skip=cfg.cosine_skip,
        features=cfg.features,
    ).to(cfg.device)
    skip_init = init_from_similarity(model, data)
    history, best_epoch = fit_head(model, data, cfg, progress, where=str(store.path), ranks=ranks)
    has_val = bool(data.label_val.any() or data.pair_val.any())

    # metrics against the labels, threshold chosen on validation
    scores = label_scores(model, data)
    y = data.label_y.numpy()
    val = data.label_val.numpy()
    metrics: dict = {}
    if len(y):
        threshold = choose_threshold(scores[val], y[val]) if val.any() else 0.5
        metrics["threshold"] = threshold
        metrics["threshold_from"] = "validation" if val.any() else "default 0.5 (no validation labels)"
        for split, m in (("train", ~val), ("val", val)):
            if m.any():
                metrics[split] = binary_metrics(scores[m], y[m], threshold, np.clip(scores[m], 0, 1))
    card = {
        "name": name or (Path(out).name if out is not None else "reward"),
        "training_command": command or shlex.join(sys.argv),
        "project": str(Path(store.path).resolve()),
        "train_config": asdict(cfg),
        "data": data.counts,
        "split": {"train_prompts": data.train_prompts, "val_prompts": data.val_prompts},
        "similarity_init": skip_init,
        "epochs": len(history),
        "best_epoch": best_epoch,
        "early_stopped": has_val and len(history) < cfg.max_epochs,
        "history": history,
        "metrics": metrics,
        "wall_time_s": round(time.time() - t0, 1),
        "machine": machine_description(),
    }
    model.card = card
    if out is not None and ranks.is_main:
        save_reward_model(model, out, card)
    ranks.wait()
    return model
