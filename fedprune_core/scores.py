"""Importance scores (Lin et al. 2022, Sec. 2.3).

Sources: the weight, the gradient, the optimizer momentum, weight x gradient, the clients'
accumulated squared gradients, or weight x those; each reduced with an L1 (|x|) or L2 (x**2) norm
per entry, summed per group by `fedprune_core.masks`.

On the server the "gradient" of a round is the aggregated pseudo-gradient (W_before - W_after
of FedAvg) and "momentum" is the server optimizer's momentum of those pseudo-gradients. Both
depend on the clients' optimizer: a fresh Adam moves every coordinate by about lr a step, so the
pseudo-gradient says little about which weights matter.

"grad_sq" is the true gradient: each client sums g**2 over its local steps (whatever its
optimizer; g after clipping when `max_grad_norm` clips), uploads it for the entries it held,
and the server averages it per entry over the clients that held it with FedAvg's example
weights. Its signal is sqrt(grad_sq), the root of the accumulated squared gradient, so that both
norms read as for the other sources:
- "grad_sq": L1 gives sqrt(grad_sq), L2 gives grad_sq.
- "weight_x_grad_sq": signal |w| * sqrt(grad_sq), as weight_x_gradient is w * g: L1 gives
  |w| * sqrt(grad_sq), L2 gives w**2 * grad_sq (the diagonal-Fisher saliency of a weight).

Pruned entries get no update, so the server keeps their last score:
- weight scores are the current weight, and a pruned weight keeps its value, so its score stays
  as it was while kept weights move; in refinement a pruned entry returns once kept entries
  fall below it.
- gradient-based scores (every source but "weight", the squared-gradient ones included)
  accumulate over the rounds an entry was trained. Clients send no squared gradient of a pruned
  entry, so its accumulated score is frozen while every kept entry's can only grow: it never
  overtakes a kept entry, and with gradient-based scores refinement can never bring a pruned entry
  back at a fixed layer sparsity (uniform allocation). Adaptive allocation re-divides S among
  layers at each re-ranking; a layer whose share drops takes back its best-scoring pruned groups.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GRAD_SQ_SOURCES: tuple[str, ...] = ("grad_sq", "weight_x_grad_sq")
"""The sources scored from the clients' accumulated squared gradients (clients track and upload them)."""
SCORE_SOURCES: tuple[str, ...] = ("weight", "gradient", "momentum", "weight_x_gradient", *GRAD_SQ_SOURCES)
NORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"l1": torch.abs, "l2": torch.square}
NORMS_OF_SQUARE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"l1": torch.sqrt, "l2": torch.clone}
"""Each norm of x computed from x**2 (>= 0) directly: L1 |x| = sqrt(x**2), L2 x**2 as is (exact)."""


def validate_score(source: str, norm: str) -> None:
    """Raise a ValueError naming an unknown score source or norm."""
    if source not in SCORE_SOURCES:
        raise ValueError(f"score_source={source!r} is not known: use one of {', '.join(SCORE_SOURCES)}")
    if norm not in NORMS:
        raise ValueError(f"score_norm={norm!r} is not known: use one of {', '.join(NORMS)}")


def signal(source: str, weight: torch.Tensor, gradient: torch.Tensor, momentum: torch.Tensor) -> torch.Tensor:
    """The raw quantity a source other than `GRAD_SQ_SOURCES` scores, before the norm."""
    if source == "weight":
        return weight
    if source == "gradient":
        return gradient
    if source == "momentum":
        return momentum
    return weight * gradient


def fresh_scores(
    source: str,
    norm: str,
    weight: torch.Tensor,
    gradient: torch.Tensor,
    momentum: torch.Tensor,
    grad_sq: torch.Tensor,
) -> torch.Tensor:
    """The norm of a source's signal, per entry, as float32 (a new tensor)."""
    if source in GRAD_SQ_SOURCES:
        root = NORMS_OF_SQUARE[norm](grad_sq)  # the norm of sqrt(grad_sq), without a rounding sqrt then square
        scores = root if source == "grad_sq" else NORMS[norm](weight) * root
        return scores.to(torch.float32)
    return NORMS[norm](signal(source, weight, gradient, momentum)).to(torch.float32)


def update_scores(
    previous: torch.Tensor | None,
    source: str,
    norm: str,
    weight: torch.Tensor,
    gradient: torch.Tensor,
    momentum: torch.Tensor,
    trained: torch.Tensor,
    grad_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """New per-entry scores of one parameter.

    Args:
        previous: last scores (same shape) or None at the first round.
        source, norm: see `SCORE_SOURCES` and `NORMS`.
        weight, gradient, momentum: full-shape server tensors.
        trained: bool, entries some client trained last round.
        grad_sq: full-shape squared gradients the clients accumulated last round, averaged over
            the clients that held each entry (>= 0); None: zero (sources that do not read it).

    Returns:
        Weight scores: the norm of the current weight where trained, the last score elsewhere.
        Gradient-based: the last score plus the norm of the signal where trained (accumulated).
    """
    squares = weight.new_zeros(()).expand(weight.shape) if grad_sq is None else grad_sq
    fresh = fresh_scores(source, norm, weight, gradient, momentum, squares)
    if previous is None:
        return fresh
    # in place on `fresh` (a new tensor): at the paper's size each avoided copy is ~0.5 GB
    if source == "weight":
        return torch.where(trained, fresh, previous, out=fresh)
    return torch.where(trained, fresh, fresh.new_zeros(()), out=fresh).add_(previous)
