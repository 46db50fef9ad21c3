"""Importance scores (Lin et al. 2022, Sec. 2.3).

Sources: the weight, the gradient, the optimizer momentum, or weight x gradient; each reduced
with an L1 (|x|) or L2 (x**2) norm per entry, summed per group by `fedprune_core.masks`.
On the server the "gradient" of a round is the aggregated pseudo-gradient (W_before - W_after
of FedAvg) and "momentum" is the server optimizer's momentum of those pseudo-gradients.

Pruned entries get no update, so the server keeps their last score:
- weight scores are the current weight, and a pruned weight keeps its value, so its score stays
  as it was while kept weights move; in refinement a pruned entry returns once kept entries
  fall below it.
- gradient-based scores accumulate over the rounds an entry was trained. A pruned entry's
  accumulated score is frozen while every kept entry's can only grow, so it never overtakes a
  kept entry: with gradient-based scores refinement can never bring a pruned entry back at a fixed
  layer sparsity (uniform allocation). Adaptive allocation re-divides S among layers at each
  re-ranking; a layer whose share drops takes back its best-scoring pruned groups.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SCORE_SOURCES: tuple[str, ...] = ("weight", "gradient", "momentum", "weight_x_gradient")
NORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"l1": torch.abs, "l2": torch.square}


def validate_score(source: str, norm: str) -> None:
    """Raise a ValueError naming an unknown score source or norm."""
    if source not in SCORE_SOURCES:
        raise ValueError(f"score_source={source!r} is not known: use one of {', '.join(SCORE_SOURCES)}")
    if norm not in NORMS:
        raise ValueError(f"score_norm={norm!r} is not known: use one of {', '.join(NORMS)}")


def signal(source: str, weight: torch.Tensor, gradient: torch.Tensor, momentum: torch.Tensor) -> torch.Tensor:
    """The raw quantity a source scores, before the norm."""
    if source == "weight":
        return weight
    if source == "gradient":
        return gradient
    if source == "momentum":
        return momentum
    return weight * gradient


def update_scores(
    previous: torch.Tensor | None,
    source: str,
    norm: str,
    weight: torch.Tensor,
    gradient: torch.Tensor,
    momentum: torch.Tensor,
    trained: torch.Tensor,
) -> torch.Tensor:
    """New per-entry scores of one parameter.

    Args:
        previous: last scores (same shape) or None at the first round.
        source, norm: see `SCORE_SOURCES` and `NORMS`.
        weight, gradient, momentum: full-shape server tensors.
        trained: bool, entries some client trained last round.

    Returns:
        Weight scores: the norm of the current weight where trained, the last score elsewhere.
        Gradient-based: the last score plus the norm of the signal where trained (accumulated).
    """
    fresh = NORMS[norm](signal(source, weight, gradient, momentum)).to(torch.float32)
    if previous is None:
        return fresh
    # in place on `fresh` (a new tensor): at the paper's size each avoided copy is ~0.5 GB
    if source == "weight":
        return torch.where(trained, fresh, previous, out=fresh)
    return torch.where(trained, fresh, fresh.new_zeros(()), out=fresh).add_(previous)
