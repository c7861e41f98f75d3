"""Word-level tokenizer over the world's vocabulary, and a small transformer text encoder.

Token ids: ``0`` is padding, ``1`` the null prompt of classifier-free guidance (a prompt of one
``[NULL]`` token), then the world's words in sorted order. A word outside the vocabulary raises
:class:`~t2ialign.world.grammar.PromptError` naming it (no silent unknown token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from t2ialign.world.grammar import check_words
from t2ialign.world.vocab import vocabulary

PAD, NULL = 0, 1


class Tokenizer:
    """Maps prompts to padded id tensors. ``max_len`` bounds the words of a prompt."""

    def __init__(self, words: list[str] | None = None, max_len: int = 16):
        self.words = list(words) if words is not None else [*vocabulary(), "to", "the"]
        self.ids = {w: i + 2 for i, w in enumerate(self.words)}
        self.max_len = max_len

    @property
    def vocab_size(self) -> int:
        return len(self.words) + 2

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``ids`` (B, L) and ``mask`` (B, L), True on real tokens. ``""`` is the null prompt."""
        rows = []
        for p in prompts:
            if p == "":
                rows.append([NULL])
                continue
            words = check_words(p)
            if len(words) > self.max_len:
                raise ValueError(f"prompt has {len(words)} words, at most {self.max_len}: {p!r}")
            rows.append([self.ids[w] for w in words])
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids != PAD


@dataclass
class TextEncoderConfig:
    vocab_size: int = 40
    max_len: int = 16
    dim: int = 64
    layers: int = 2
    heads: int = 4


class TextEncoder(nn.Module):
    """Token embeddings + learned positions + a pre-norm transformer: (B, L) -> (B, L, dim)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Parameter(torch.randn(cfg.max_len, cfg.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.heads, dim_feedforward=cfg.dim * 2, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos[: ids.shape[1]]  # (B, L, D)
        h = self.blocks(h, src_key_padding_mask=~mask)
        return self.norm(h)
