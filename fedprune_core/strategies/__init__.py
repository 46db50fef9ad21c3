"""Strategies, looked up by name: Federated Pruning and the baselines it is compared with.

One file per strategy, each a `fedprune_core.strategies.base.BaseStrategy` overriding what it
changes and naming the configuration it reads (`config_keys`); adding one is that file plus one
line in `STRATEGY_BUILDERS`, from which every list of strategy names (`STRATEGIES`,
`fedprune_core.config`'s validation) and of the settings that apply to a run (`applicable_config`)
derives.
"""

from __future__ import annotations

from collections.abc import Callable
from pkgutil import resolve_name
from typing import TYPE_CHECKING, Any

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


SHARED_CONFIG_KEYS: tuple[str, ...] = ("schedule.num_rounds",)
"""Keys inside a strategy's own sections that every strategy reads (every run has a number of rounds)."""


def strategy_class(name: str) -> type[BaseStrategy]:
    """The class of strategy `name` (its builder's class), imported on first use.

    Raises:
        ValueError: `name` is not a strategy.
    """
    strategy_builder(name)  # the error for an unknown name
    cls: type[BaseStrategy] = resolve_name(STRATEGY_BUILDERS[name].rpartition(".")[0])
    return cls


def applicable_config(config: ExperimentConfig) -> dict[str, Any]:
    """`config.to_dict()` without the settings of other strategies: what a run of `config.strategy` reads.

    A key is left out when it lies in another strategy's `config_keys` and neither in this
    strategy's nor in `SHARED_CONFIG_KEYS` (a FedAvg run has no `pruning.*` or `prunefl.*`; a
    Federated Dropout run keeps `pruning.prunable`, the parameters it drops units of). Keys no
    strategy claims (seed, model, federated, ...) apply to every run.
    """
    own = strategy_class(config.strategy).config_keys + SHARED_CONFIG_KEYS
    claimed = tuple(key for name in STRATEGIES for key in strategy_class(name).config_keys)
    return _kept(config.to_dict(), lambda key: _within(key, own) or not _within(key, claimed))


def _within(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def _kept(section: dict[str, Any], keep: Callable[[str], bool], parent: str = "") -> dict[str, Any]:
    """The leaves of nested `section` whose dotted key `keep` accepts; emptied sections dropped."""
    out: dict[str, Any] = {}
    for name, value in section.items():
        key = f"{parent}{name}"
        if isinstance(value, dict):
            if inner := _kept(value, keep, f"{key}."):
                out[name] = inner
        elif keep(key):
            out[name] = value
    return out
