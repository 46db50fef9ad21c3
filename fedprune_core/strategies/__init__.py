"""Strategies, looked up by name: Federated Pruning and the baselines it is compared with."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fedprune_core.config import ExperimentConfig
from fedprune_core.engine import Strategy
from fedprune_core.strategies.fed_dropout import FedDropout
from fedprune_core.strategies.fedavg import FedAvg
from fedprune_core.strategies.fedprune import FedPrune
from fedprune_core.strategies.prunefl import PruneFL

STRATEGY_BUILDERS: dict[str, Callable[[ExperimentConfig, nn.Module], Strategy]] = {
    "fedprune": FedPrune.build,
    "fedavg": FedAvg.build,
    "fed_dropout": FedDropout.build,
    "prunefl": PruneFL.build,
}


def make_strategy(config: ExperimentConfig, model: nn.Module) -> Strategy:
    """The strategy `config.strategy`, set up for `model`'s parameters."""
    if config.strategy not in STRATEGY_BUILDERS:
        raise ValueError(
            f"strategy={config.strategy!r} is not available: use one of {', '.join(STRATEGY_BUILDERS)}"
        )
    return STRATEGY_BUILDERS[config.strategy](config, model)
