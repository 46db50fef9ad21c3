"""The strategy registry and the shared defaults: every name builds, dense FedAvg is the base."""

from __future__ import annotations

import inspect

import pytest
import torch

from fedprune_core import config as config_module
from fedprune_core.config import ExperimentConfig
from fedprune_core.engine import ServerState, Strategy
from fedprune_core.strategies import (
    SHARED_CONFIG_KEYS,
    STRATEGIES,
    STRATEGY_BUILDERS,
    applicable_config,
    make_strategy,
    strategy_builder,
    strategy_class,
)
from fedprune_core.strategies.base import BaseStrategy
from fedprune_core.strategies.fedavg import FedAvg
from fedprune_core.toy import ToyWorkload

TOY = ToyWorkload()


def test_config_takes_its_names_from_the_registry() -> None:
    assert config_module.STRATEGIES is STRATEGIES
    assert STRATEGIES == tuple(STRATEGY_BUILDERS) == ("fedprune", "fedavg", "fed_dropout", "prunefl")


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_registered_strategy_builds_with_every_protocol_member(name: str) -> None:
    strategy = make_strategy(ExperimentConfig(strategy=name), TOY.build_model())
    assert isinstance(strategy, BaseStrategy)
    members = [n for n, _ in inspect.getmembers(Strategy) if not n.startswith("_")]
    assert len(members) == 12 and all(hasattr(strategy, n) for n in members)


def test_an_unknown_strategy_names_the_value_and_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"strategy='fedsgd' is not available: use one of fedprune, fedavg, "):
        strategy_builder("fedsgd")


def test_the_base_is_dense_fedavg() -> None:
    fedavg = FedAvg.build(ExperimentConfig(strategy="fedavg"), TOY.build_model())
    state = ServerState(3, {"w": torch.ones(2, 2)}, extra={"e": torch.zeros(1)})
    masks = {"w": torch.tensor([[True, False], [True, True]])}
    assert fedavg.specs == {} and fedavg.groups == () and not fedavg.track_grad_sq and not fedavg.dense_grad_sq
    assert not fedavg.rescale_kept
    assert fedavg.initialize(state, TOY, []) is state
    assert all(fedavg.keeps_masks(r) for r in (1, 2, 100))
    assert fedavg.score(state, 4) == {} and fedavg.mask(state, {}, 4) == {}
    assert fedavg.client_masks(state, masks, 4, client_id=1) is masks
    assert fedavg.observe(state, masks, {"w": torch.ones(2, 2)}, masks, None) == {}
    assert fedavg.metrics(state) == {}


def _leaves(section: dict, parent: str = "") -> set[str]:
    return {k for name, value in section.items()
            for k in (_leaves(value, f"{parent}{name}.") if isinstance(value, dict) else {f"{parent}{name}"})}


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_strategy_names_configuration_that_exists(name: str) -> None:
    keys = _leaves(ExperimentConfig().to_dict())
    for claimed in strategy_class(name).config_keys + SHARED_CONFIG_KEYS:
        assert any(k == claimed or k.startswith(f"{claimed}.") for k in keys), claimed


@pytest.mark.parametrize(("name", "own", "absent"), [
    ("fedprune", {"pruning.sparsity", "schedule.refine_every"}, {"fed_dropout.rate", "prunefl.reconfig_every"}),
    ("fedavg", set(), {"pruning.prunable", "schedule.sparsify_rounds", "fed_dropout.rate", "prunefl.max_density"}),
    ("fed_dropout", {"pruning.prunable", "fed_dropout.rate"},
     {"pruning.sparsity", "schedule.ramp", "prunefl.reconfig_every"}),
    ("prunefl", {"pruning.prunable", "prunefl.max_density"},
     {"pruning.pattern", "schedule.refine_rounds", "fed_dropout.units"}),
])
def test_a_run_keeps_the_settings_its_strategy_reads_and_those_of_every_run(
    name: str, own: set[str], absent: set[str]
) -> None:
    config = ExperimentConfig(strategy=name)
    kept = _leaves(applicable_config(config))
    every_run = {"seed", "model", "corpus", "strategy", "init_from", "schedule.num_rounds", "federated.local.lr"}
    assert own | every_run <= kept
    assert not absent & kept
    assert kept <= _leaves(config.to_dict())
