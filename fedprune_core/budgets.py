"""Matched client budgets: each method's knob at which a client downloads a given share of the model.

A budget is the share of the dense model's parameters a client downloads (float entries of its
payload over the dense payload's, running statistics left out: `fedprune_core.submodel.float_entries`).
Each method reaches it with its own knob:

- Federated Pruning: the target sparsity S. The share a client gets at S depends on the masks, so it
  is computed from one-shot masks of the run's pruning section (pattern, allocation, score) on given
  weights, and S is found by bisection (`fp_sparsity_for_share`).
- PruneFL: `prunefl.max_density`, the share of its prunable weights it may keep. Its masks are
  entry by entry, so a client's share is exact without masks: (dense - (1 - d) x prunable) / dense
  (`prunefl_density_for_share`). PruneFL's objective may keep less than the cap.
- Federated Dropout: the dropout rate (`fedprune_core.strategies.fed_dropout.rate_for_share`).

What a run downloads, uploads, computes and holds is measured by the run itself; these knobs only aim
it at the budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from fedprune_core.config import ExperimentConfig, PruningConfig
from fedprune_core.engine import ServerState
from fedprune_core.prunable import PrunableSpec, find_prunable
from fedprune_core.schedule import ScheduleConfig
from fedprune_core.strategies.fed_dropout import rate_for_share
from fedprune_core.strategies.fedprune import FedPrune
from fedprune_core.strategies.prunefl import PATTERN as PRUNEFL_PATTERN
from fedprune_core.submodel import extract, float_entries
from fedprune_core.types import MaskDict, StateDict

ONE_SHOT = ScheduleConfig(num_rounds=2, sparsify_rounds=1, ramp="one_shot", refine_rounds=0)
"""A schedule whose round 1 masks at the full target sparsity."""


def one_shot_masks(pruning: PruningConfig, specs: dict[str, PrunableSpec], weights: StateDict) -> MaskDict:
    """The masks Federated Pruning builds from `weights` in one shot at `pruning.sparsity` (its
    pattern, allocation and score)."""
    strategy = FedPrune(specs, pruning, ONE_SHOT)
    state = ServerState(0, weights)
    return strategy.mask(state, strategy.score(state, 1), 1)


def fp_share(config: ExperimentConfig, model: nn.Module, weights: StateDict, sparsity: float) -> float:
    """The share of the dense parameters a Federated Pruning client downloads at `sparsity`, with the
    masks `config.pruning` builds from `weights` in one shot."""
    p = dataclasses.replace(config.pruning, sparsity=sparsity)
    specs = find_prunable(model, p.prunable, p.pattern, p.include_1d)
    masks = one_shot_masks(p, specs, weights)
    return float_entries(extract(weights, masks, specs)) / float_entries(extract(weights, {}, {}))


def bisect(share_at: Callable[[float], float], share: float, lo: float, hi: float, steps: int = 14) -> float:
    """The knob in [lo, hi] at which `share_at` (falling as the knob grows) is `share`, to (hi-lo)/2**steps."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if share_at(mid) > share else (lo, mid)
    return (lo + hi) / 2


def fp_sparsity_for_share(config: ExperimentConfig, model: nn.Module, weights: StateDict, share: float) -> float:
    """The Federated Pruning sparsity at which a client downloads `share` of the dense parameters.

    Raises:
        ValueError: `share` is out of reach below `pruning.max_layer_sparsity`.
    """
    top = config.pruning.max_layer_sparsity
    least = fp_share(config, model, weights, top)
    if least > share:
        raise ValueError(
            f"share={share} is below what a Federated Pruning client can download at sparsity {top} "
            f"({least:.4f}): raise the share, or pruning.max_layer_sparsity"
        )
    return bisect(lambda s: fp_share(config, model, weights, s), share, 0.0, top)


def prunefl_density_for_share(config: ExperimentConfig, model: nn.Module, share: float) -> float:
    """PruneFL's `max_density` at which a client downloads at most `share` of the dense parameters.

    Raises:
        ValueError: `share` is below the parameters PruneFL never prunes.
    """
    weights = {n: p.detach() for n, p in model.named_parameters()}
    dense = float_entries(extract(weights, {}, {}))
    prunable = sum(s.numel for s in find_prunable(model, config.pruning.prunable, PRUNEFL_PATTERN).values())
    density = 1.0 - (1.0 - share) * dense / prunable
    if density <= 0.0:
        raise ValueError(
            f"share={share} is below what PruneFL can download ({1 - prunable / dense:.4f} of dense is never pruned): "
            "raise the share, or widen pruning.prunable"
        )
    return min(density, 1.0)


@dataclasses.dataclass(frozen=True)
class Knobs:
    """Each method's setting for one budget (None: the method cannot get down to it).

    Attributes:
        share: the budget, a share of the dense parameters a client downloads.
        fp_sparsity: Federated Pruning's `pruning.sparsity`.
        prunefl_density: PruneFL's `prunefl.max_density`.
        fd_rate: Federated Dropout's `fed_dropout.rate` (of `config.fed_dropout.units`).
        fd_hidden_rate: Federated Dropout's rate with `fed_dropout.units: hidden`.
    """

    share: float
    fp_sparsity: float | None
    prunefl_density: float | None
    fd_rate: float | None
    fd_hidden_rate: float | None = None


def knobs_for(config: ExperimentConfig, model: nn.Module, shares: tuple[float, ...]) -> list[Knobs]:
    """Every method's knob for each budget in `shares`, Federated Pruning's from `model`'s own weights
    (e.g. the seeded initialization the runs start from), rounded to 4 decimals."""
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}

    def reach(find: Callable[..., float], *args: object) -> float | None:
        try:
            return round(find(*args), 4)
        except ValueError:
            return None

    hidden = config.replace({"fed_dropout": {"units": "hidden"}})
    return [
        Knobs(share, reach(fp_sparsity_for_share, config, model, weights, share),
              reach(prunefl_density_for_share, config, model, share), reach(rate_for_share, config, model, share),
              reach(rate_for_share, hidden, model, share))
        for share in shares
    ]


def seeded_model(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """`build()` under torch's global RNG seeded with `seed`, leaving the caller's RNG state as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()
