"""Per-layer sparsity: uniform, or adaptive (Lin et al. 2022, Sec. 2.4).

Adaptive: layer importance I_l = mean per-entry score of the layer; a layer gets sparsity
s_l = clip(c * I_mean / I_l, min_sparsity, max_sparsity), c found by bisection so that the
parameter-weighted mean of the s_l equals the target S. Less important layers get more sparsity,
and `max_sparsity` < 1 keeps every layer from being emptied. A layer whose importance is 0 (or
below `IMPORTANCE_FLOOR` of the largest) gets the most sparsity; when no layer has any importance
(e.g. gradient scores before any update) every layer gets S.
"""

from __future__ import annotations

import torch

from fedprune_core.masks import validate_sparsity
from fedprune_core.prunable import PrunableSpec

ALLOCATIONS: tuple[str, ...] = ("uniform", "adaptive")

IMPORTANCE_FLOOR = 1e-12
"""Layer importances below this fraction of the largest count as this fraction (e.g. all-zero layers)."""


def uniform(specs: dict[str, PrunableSpec], sparsity: float) -> dict[str, float]:
    """Every prunable layer at `sparsity`."""
    validate_sparsity(sparsity)
    return {name: float(sparsity) for name in specs}


def _weighted_mean(values: torch.Tensor, sizes: torch.Tensor) -> float:
    return float((values * sizes).sum() / sizes.sum())


def adaptive(
    scores: dict[str, torch.Tensor],
    specs: dict[str, PrunableSpec],
    sparsity: float,
    min_sparsity: float = 0.0,
    max_sparsity: float = 0.95,
) -> dict[str, float]:
    """Layer sparsities from layer importance; their parameter-weighted mean equals `sparsity`."""
    validate_sparsity(sparsity)
    if not 0.0 <= min_sparsity <= sparsity <= max_sparsity < 1.0:
        raise ValueError(
            f"adaptive bounds min_sparsity={min_sparsity}, max_sparsity={max_sparsity} must satisfy "
            f"0 <= min <= sparsity={sparsity} <= max < 1: widen the bounds"
        )
    names = list(specs)
    if sparsity == 0.0 or not names:
        return {n: 0.0 for n in names}
    # accumulated in float64 without a float64 copy of every score tensor
    means = [float(scores[n].mean(dtype=torch.float64)) for n in names]
    importance = torch.tensor(means, dtype=torch.float64)
    if not float(importance.max()) > 0.0:  # no layer has any importance yet: nothing to tell them apart
        return uniform(specs, sparsity)
    sizes = torch.tensor([specs[n].numel for n in names], dtype=torch.float64)
    # A relative floor bounds the ratios' range, so 100 bisection steps resolve every layer's sparsity.
    floor = IMPORTANCE_FLOOR * float(importance.max())
    ratio = _weighted_mean(importance, sizes) / importance.clamp_min(floor)

    def alloc(c: float) -> torch.Tensor:
        return (c * ratio).clamp(min_sparsity, max_sparsity)

    lo, hi = 0.0, max_sparsity / float(ratio.min())
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _weighted_mean(alloc(mid), sizes) < sparsity else (lo, mid)
    return {n: float(s) for n, s in zip(names, alloc(hi).tolist(), strict=True)}
