"""Experiment configuration: strict from_dict, validation on construction, messages that name the fix."""

from __future__ import annotations

import json

import pytest

from fedprune_core.config import MAX_COUNT, MAX_ROUNDS, MAX_SEED, ExperimentConfig, PruningConfig
from fedprune_core.presets import PRESETS, preset


def test_defaults_round_trip_through_json() -> None:
    config = ExperimentConfig()
    assert ExperimentConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_partial_nested_dict_overrides_only_what_it_names() -> None:
    config = ExperimentConfig.from_dict(
        {"pruning": {"sparsity": 0.3, "prunable": ["fc.*", "conv.*"]}, "federated": {"local": {"lr": 0.5}}}
    )
    assert config.pruning.sparsity == 0.3 and config.pruning.prunable == ("fc.*", "conv.*")
    assert config.pruning.pattern == PruningConfig().pattern
    assert config.federated.local.lr == 0.5 and config.federated.local.steps == 5
    assert config.replace({"pruning": {"pattern": "row"}}).pruning.sparsity == 0.3


def test_lists_of_lists_become_tuples() -> None:
    config = ExperimentConfig.from_dict({"fed_dropout": {"layer_rates": [["fc*", 0.25]]}})
    assert config.fed_dropout.layer_rates == (("fc*", 0.25),)


def test_an_int_stands_for_a_float() -> None:
    assert ExperimentConfig.from_dict({"pruning": {"sparsity": 0}}).pruning.sparsity == 0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name: str) -> None:
    assert preset(name).name == name


@pytest.mark.parametrize(("data", "fragments"), [
    ({"prunning": {}}, ["unknown config key 'prunning'", "known keys here are", "pruning"]),
    ({"pruning": {"sparsty": 0.3}}, ["unknown config key 'pruning.sparsty'", "sparsity"]),
    ({"federated": {"local": {"step": 3}}}, ["'federated.local.step'", "steps"]),
    ({"pruning": 0.5}, ["config section 'pruning'=0.5 must be a mapping"]),
    ({"pruning": {"prunable": "*weight"}}, ["'pruning.prunable'='*weight'", "tuple", "['*weight']"]),
    ({"schedule": {"num_rounds": "10"}}, ["'schedule.num_rounds'='10'", "int"]),
    ({"schedule": {"num_rounds": 10.5}}, ["'schedule.num_rounds'=10.5", "int"]),
    ({"pruning": {"include_1d": "no"}}, ["'pruning.include_1d'='no'", "bool"]),
    ({"pruning": {"sparsity": True}}, ["'pruning.sparsity'=True", "float"]),
    ({"pruning": {"sparsity": 1.0}}, ["sparsity=1.0 must be a fraction in [0, 1)", "pass e.g. 0.5"]),
    ({"pruning": {"pattern": "block"}}, ["pattern='block'", "use one of unstructured, row, column"]),
    ({"pruning": {"score_source": "taylor"}}, ["score_source='taylor'", "weight_x_gradient"]),
    ({"pruning": {"score_norm": "l0"}}, ["score_norm='l0'", "l1, l2"]),
    ({"pruning": {"allocation": "greedy"}}, ["allocation='greedy'", "uniform, adaptive"]),
    ({"pruning": {"prunable": []}}, ["prunable=() selects nothing"]),
    ({"pruning": {"sparsity": 0.5, "max_layer_sparsity": 0.4}},
     ["max_layer_sparsity=0.4", "widen the bounds"]),
    ({"schedule": {"num_rounds": 10, "sparsify_rounds": 8, "refine_rounds": 5}},
     ["sparsify_rounds=8 + refine_rounds=5 exceed num_rounds=10", "raise num_rounds or shorten a phase"]),
    ({"schedule": {"ramp": "exp"}}, ["ramp='exp'"]),
    ({"strategy": "fedsgd"}, ["strategy='fedsgd'", "fedprune, fedavg"]),
    ({"federated": {"clients_per_round": 0}}, ["clients_per_round=0 must be >= 1"]),
    ({"federated": {"server_lr": 0.0}}, ["server_lr=0.0 must be > 0"]),
    ({"federated": {"local": {"steps": 0}}}, ["steps=0"]),
])  # fmt: skip
def test_bad_config_names_the_value_the_rule_and_the_fix(
    data: dict[str, object], fragments: list[str]
) -> None:
    with pytest.raises(ValueError) as err:
        ExperimentConfig.from_dict(data)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_replace_is_as_strict_as_from_dict() -> None:
    with pytest.raises(ValueError, match="unknown config key 'schedule.rounds'"):
        ExperimentConfig().replace({"schedule": {"rounds": 3}})


def test_the_root_must_be_a_mapping() -> None:
    with pytest.raises(ValueError, match="config section '<root>'"):
        ExperimentConfig.from_dict([("seed", 1)])  # type: ignore[arg-type]


@pytest.mark.parametrize(("data", "fragments"), [
    ({"schedule": {"num_rounds": 10**20}}, [f"'schedule.num_rounds'={10**20}", "[0, 1000000] (MAX_ROUNDS)"]),
    ({"schedule": {"num_rounds": MAX_ROUNDS + 1, "refine_rounds": 0}}, [f"'schedule.num_rounds'={MAX_ROUNDS + 1}"]),
    ({"federated": {"eval_every": MAX_ROUNDS + 1}}, ["'federated.eval_every'", "MAX_ROUNDS"]),
    ({"federated": {"local": {"batch_size": MAX_COUNT + 1}}}, ["'federated.local.batch_size'", "(MAX_COUNT)"]),
    ({"prunefl": {"initial_max_steps": 2**64}}, [f"'prunefl.initial_max_steps'={2**64}"]),
    ({"seed": -1}, [f"'seed'=-1 must be in [0, {MAX_SEED}] (MAX_SEED)"]),
    ({"seed": MAX_SEED + 1}, [f"'seed'={MAX_SEED + 1}"]),
    ({"federated": {"server_lr": float("inf")}}, ["'federated.server_lr'=inf must be a finite number", "1.0"]),
    ({"federated": {"local": {"weight_decay": float("inf")}}}, ["'federated.local.weight_decay'=inf"]),
    ({"prunefl": {"time_constant": float("inf")}}, ["'prunefl.time_constant'=inf"]),
    ({"federated": {"local": {"max_grad_norm": "abc"}}}, ["'federated.local.max_grad_norm'='abc'", "float | None"]),
    ({"federated": {"local": {"max_grad_norm": True}}}, ["'federated.local.max_grad_norm'=True"]),
])  # fmt: skip
def test_every_number_is_finite_and_bounded(data: dict[str, object], fragments: list[str]) -> None:
    # Integers beyond 64 bits reach Prefect's database as flow-run parameters and break its listing.
    with pytest.raises(ValueError) as err:
        ExperimentConfig.from_dict(data)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_the_bounds_themselves_are_accepted() -> None:
    config = ExperimentConfig.from_dict({
        "seed": MAX_SEED, "schedule": {"num_rounds": MAX_ROUNDS}, "federated": {"local": {"max_grad_norm": 1}},
    })  # fmt: skip
    assert (config.seed, config.schedule.num_rounds, config.federated.local.max_grad_norm) == (MAX_SEED, MAX_ROUNDS, 1)
