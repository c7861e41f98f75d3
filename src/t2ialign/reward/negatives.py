"""Perturbed prompts for the reward model's auxiliary loss on free text.

The auxiliary prompt-classification loss (Lee et al. 2023) asks the reward to rank an image's true
prompt above prompts that the image does not show. The paper made those from its own prompt
templates (its counts, colours and backgrounds); this project makes them, for a good image of
prompt ``z``, from the first of these sources that gives any:

1. the prompt's metadata ``negatives`` (a list of prompts, given per prompt in the prompt file):
   all of them, in the given order;
2. for a prompt of the embedded shapes world's grammar, every prompt that differs from it in exactly
   one attribute (``t2ialign.world.suites.perturbations``, the paper's way in this world);
3. word swaps among a user-given vocabulary (:func:`word_swaps`): each word of the prompt that is
   in a group of interchangeable words (counts, colours, or a word-list file) is replaced by each
   other word of its group, one word at a time, at most ``limit`` swapped prompts (taken in turn
   from each swappable word, so that every such word is perturbed).

A good image whose prompt gets no candidate this way contributes to the regression and
Bradley-Terry losses only (training reports how many did). Word swaps are simple: they match whole
words case-insensitively, keep a capital first letter, and do not fix grammar ("a cat" -> "two cat"
would be wrong, which is why ``a``/``an`` are not in :data:`COUNT_WORDS`).
"""

from __future__ import annotations

import re
from pathlib import Path

COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
COLOUR_WORDS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "gray",
)
DEFAULT_SWAP_LIMIT = 16
_WORD = re.compile(r"[\w'-]+")


def check_word_groups(groups, where: list[str] | None = None) -> tuple[tuple[str, ...], ...]:
    """Groups as lower-case tuples; a group of fewer than two different words, a word that is not
    one word, or a word in two groups is an error (``where``: how to name each group in it)."""
    names = where or [f"word group {i + 1}" for i in range(len(groups))]
    out, seen = [], {}
    for i, g in enumerate(groups):
        words = tuple(dict.fromkeys(str(w).strip().lower() for w in g))
        if len(words) < 2:
            raise ValueError(f"{names[i]}: a word group needs at least two different words, got {list(g)!r}")
        for w in words:
            if not _WORD.fullmatch(w):
                raise ValueError(f"{names[i]}: {w!r} is not one word (letters, digits, ' and -)")
            if w in seen:
                raise ValueError(f"{names[i]}: the word {w!r} is in another group too ({names[seen[w]]})")
            seen[w] = i
        out.append(words)
    return tuple(out)


def read_word_groups(path: str | Path) -> tuple[tuple[str, ...], ...]:
    """A word-list file: one group of interchangeable words a line, separated by commas or spaces
    (``small, large, huge``); blank lines and lines starting with ``#`` are skipped. Errors name the
    file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such word-list file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
    groups, where = [], []
    for n, line in enumerate(lines, start=1):
        text = line.strip()
        if text and not text.startswith("#"):
            groups.append([w for w in re.split(r"[,\s]+", text) if w])
            where.append(f"{path}:{n}")
    if not groups:
        raise ValueError(f"{path}: no word groups (one group of interchangeable words a line)")
    return check_word_groups(groups, where)


def _cased(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word.capitalize() if like[:1].isupper() else word


def word_swaps(prompt: str, groups, limit: int = DEFAULT_SWAP_LIMIT) -> list[str]:
    """Prompts that differ from ``prompt`` in one word swapped within its group (see the module
    docstring), at most ``limit``, in turn over the swappable words; deterministic."""
    group_of = {w: g for g in groups for w in g}
    per_word: list[list[str]] = []
    for m in _WORD.finditer(prompt):
        g = group_of.get(m.group().lower())
        if g is None:
            continue
        swaps = [
            prompt[: m.start()] + _cased(w, m.group()) + prompt[m.end() :]
            for w in g
            if w != m.group().lower()
        ]
        per_word.append(swaps)
    out: list[str] = []
    for k in range(max((len(s) for s in per_word), default=0)):
        for swaps in per_word:
            if k < len(swaps) and swaps[k] != prompt and swaps[k] not in out:
                out.append(swaps[k])
    return out[:limit]


def free_text_candidates(prompt: str, metadata: dict | None, groups, limit: int) -> list[str] | None:
    """The auxiliary loss's candidates (the true prompt first) from the metadata's ``negatives`` or,
    failing that, from word swaps; None when there are none."""
    negatives = (metadata or {}).get("negatives")
    if negatives:
        negs = [n for n in dict.fromkeys(negatives) if n != prompt]
    else:
        negs = word_swaps(prompt, groups, limit) if groups else []
    return [prompt, *negs] if negs else None
