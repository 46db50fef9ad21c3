"""Strategies, looked up by name: Federated Pruning and the baselines it is compared with.

One file per strategy, each a `fedprune_core.strategies.base.BaseStrategy` overriding what it
changes; adding one is that file plus one line in `STRATEGY_BUILDERS`, from which every list of
strategy names (`STRATEGIES`, `fedprune_core.config`'s validation) derives.
"""

from __future__ import annotations

from collections.abc import Callable
from pkgutil import resolve_name
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from fedprune_core.config import ExperimentConfig
    from fedprune_core.engine import Strategy
    from fedprune_core.strategies.base import BaseStrategy

STRATEGY_BUILDERS: dict[str, str] = {
    "fedprune": "fedprune_core.strategies.fedprune:FedPrune.build",
    "fedavg": "fedprune_core.strategies.fedavg:FedAvg.build",
    "fed_dropout": "fedprune_core.strategies.fed_dropout:FedDropout.build",
    "prunefl": "fedprune_core.strategies.prunefl:PruneFL.build",
}
"""Every strategy, by name: where its builder is (`module:Class.build`, as `pkgutil.resolve_name` reads it).

The builders are imported when first used: the strategies import `fedprune_core.config`, which
takes its list of names from here, so importing them here would make a cycle.
"""

STRATEGIES: tuple[str, ...] = tuple(STRATEGY_BUILDERS)


def strategy_builder(name: str) -> Callable[[ExperimentConfig, nn.Module], BaseStrategy]:
    """The builder of strategy `name`.

    Raises:
        ValueError: `name` is not a strategy.
    """
    if name not in STRATEGY_BUILDERS:
        raise ValueError(f"strategy={name!r} is not available: use one of {', '.join(STRATEGY_BUILDERS)}")
    builder: Callable[[ExperimentConfig, nn.Module], BaseStrategy] = resolve_name(STRATEGY_BUILDERS[name])
    return builder


def make_strategy(config: ExperimentConfig, model: nn.Module) -> Strategy:
    """The strategy `config.strategy`, set up for `model`'s parameters (mypy checks here that the
    base, whose members every strategy keeps the signatures of, is a `Strategy`)."""
    return strategy_builder(config.strategy)(config, model)
