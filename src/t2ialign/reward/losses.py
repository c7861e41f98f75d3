"""Losses of the reward model (Lee et al. 2023, section 4; METHODS.md section 1), as pure functions.

Notation: ``r = r_phi(x, z)`` the reward of image ``x`` for prompt ``z``; ``y in {0, 1}`` the
human (or simulated) label, 1 for an image that matches its prompt.

- :func:`mse_loss`:            ``L_MSE = E (y - r_phi(x, z))^2``
- :func:`prompt_classification_loss`: for an image labelled good, its true prompt ``z`` and ``N - 1``
  perturbed prompts ``z_j`` (each differs from ``z`` in exactly one attribute),
  ``L_pc = CE( softmax_j( r_phi(x, z_j) / T ), index of z )``
- :func:`bradley_terry_loss`:  for a comparison of a winner ``x_w`` and a loser ``x_l`` of one prompt,
  ``L_BT = -log sigmoid( r(x_w, z) - r(x_l, z) )``; a tie has target 0.5 / 0.5:
  ``-0.5 log sigmoid(d) - 0.5 log sigmoid(-d)``
- :func:`total_loss`:          ``L = L_MSE + lambda * L_pc (+ bt_weight * L_BT)``, lambda = 0.5 and
  T = 2 as published.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_LAMBDA = 0.5
DEFAULT_TEMPERATURE = 2.0


def mse_loss(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``L_MSE = mean_i w_i (y_i - r_i)^2 / mean_i w_i``; ``scores`` and ``labels`` (B,).

    ``weights`` (B,), optional, weight each example (e.g. the number of labels an image got)."""
    if scores.shape != labels.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ in shape")
    sq = (labels.to(scores.dtype) - scores) ** 2  # (y - r_phi(x, z))^2
    if weights is None:
        return sq.mean()
    w = weights.to(scores.dtype)
    return (w * sq).sum() / w.sum().clamp_min(1e-12)


def prompt_classification_loss(
    scores: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    true_index: int | torch.Tensor = 0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The auxiliary prompt-classification loss, averaged over the batch.

    ``scores`` (B, N): ``r_phi(x_b, z_j)`` of each image against its candidate prompts (the true one
    and its perturbations). ``true_index``: the column of the true prompt (an int, or a (B,) tensor).
    ``mask`` (B, N) bool, optional: False marks padding where an image has fewer candidates.

        L_pc = CE( softmax_j( r_phi(x, z_j) / T ), true index )
             = -r(x, z_true) / T + log sum_j exp( r(x, z_j) / T )
    """
    if scores.dim() != 2:
        raise ValueError(
            f"scores must be (B, N) rewards of each image for its N candidates, got {scores.dim()}-d"
        )
    if temperature <= 0:
        raise ValueError(f"the temperature must be positive, got {temperature}")
    logits = scores / temperature  # r_phi(x, z_j) / T
    if mask is not None:
        logits = logits.masked_fill(~mask.bool(), float("-inf"))
    if isinstance(true_index, int):
        target = torch.full((scores.shape[0],), true_index, dtype=torch.long, device=scores.device)
    else:
        target = true_index.to(device=scores.device, dtype=torch.long)
    return F.cross_entropy(logits, target)


def bradley_terry_loss(r_w: torch.Tensor, r_l: torch.Tensor, tie: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry loss of pairwise comparisons, averaged: ``r_w``, ``r_l`` (B,) the rewards of the
    preferred and the other image; ``tie`` (B,) bool, optional, marks ties (target 0.5 / 0.5).

        P(w beats l) = sigmoid(r_w - r_l)
        L_BT = -log sigmoid(r_w - r_l)                                  (a decided comparison)
        L_BT = -0.5 log sigmoid(r_w - r_l) - 0.5 log sigmoid(r_l - r_w)  (a tie)
    """
    if r_w.shape != r_l.shape:
        raise ValueError(f"r_w {tuple(r_w.shape)} and r_l {tuple(r_l.shape)} differ in shape")
    d = r_w - r_l
    target = torch.ones_like(d)
    if tie is not None:
        target = torch.where(tie.to(d.device).bool(), torch.full_like(d, 0.5), target)
    # -[t log sigmoid(d) + (1 - t) log sigmoid(-d)], computed stably
    return F.binary_cross_entropy_with_logits(d, target)


def total_loss(
    l_mse: torch.Tensor | None,
    l_pc: torch.Tensor | None = None,
    l_bt: torch.Tensor | None = None,
    lam: float = DEFAULT_LAMBDA,
    bt_weight: float = 1.0,
) -> torch.Tensor:
    """``L = L_MSE + lambda * L_pc + bt_weight * L_BT``; a term that is None (no labelled image, no
    good image in the batch, no pairs) is left out. At least one term must be given."""
    terms = []
    if l_mse is not None:
        terms.append(l_mse)
    if l_pc is not None:
        terms.append(lam * l_pc)
    if l_bt is not None:
        terms.append(bt_weight * l_bt)
    if not terms:
        raise ValueError("total_loss needs at least one of L_MSE, L_pc and L_BT")
    return sum(terms[1:], terms[0])
