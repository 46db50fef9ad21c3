"""A client's budget: FLOPs of a step against dense, and time and bytes to a target (`fedprune_core.budget`)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from fedprune_core.budget import Reached, reached, step_flops
from fedprune_core.config import ExperimentConfig
from fedprune_core.engine import client_step_flops, dispatch, init_state, round_masks
from fedprune_core.simulate import simulate
from fedprune_core.strategies import make_strategy
from fedprune_core.toy import ToyWorkload

TOY = ToyWorkload()  # Linear(16, 32) -> Linear(32, 32) -> Linear(32, 4)
CLIENTS = TOY.make_clients(3, 16, 0)
BATCH = 8
# One SGD step on a batch of 8, 2 FLOPs per multiply-accumulate: the forward products, the weight
# gradients (as many), and the input gradients of the second and third layers (the data needs none).
DENSE_STEP = 2 * BATCH * ((16 * 32 + 32 * 32 + 32 * 4) * 2 + 32 * 32 + 32 * 4)


def _config(strategy: str, **sections: Any) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "strategy": strategy, "model": "toy", **sections,
        "schedule": {"num_rounds": 4, "sparsify_rounds": 1, "refine_rounds": 0},
        "federated": {"clients_per_round": 2, "eval_every": 2, "local": {"steps": 2, "batch_size": BATCH, "lr": 0.1}},
    })


def _flops(config: ExperimentConfig, round_num: int = 1) -> tuple[int, int]:
    strategy = make_strategy(config, TOY.build_model())
    state = strategy.initialize(init_state(TOY, config.seed), TOY, CLIENTS)
    _, masks = round_masks(strategy, state, round_num)
    payload = dispatch(strategy, state, masks, round_num, 0)
    return client_step_flops(TOY, config, strategy, payload, CLIENTS[0], round_num, 0)


def test_step_flops_counts_the_products_of_a_step() -> None:
    layer = nn.Linear(3, 5)
    x = torch.ones(4, 3)
    assert step_flops(lambda: layer(x).sum().backward()) == 2 * 4 * 3 * 5 * 2  # forward + weight gradient


def test_dense_fedavg_client_costs_the_dense_step() -> None:
    assert _flops(_config("fedavg")) == (DENSE_STEP, DENSE_STEP)


def test_a_structured_half_size_sub_model_costs_half_the_dense_step() -> None:
    """Federated Dropout at rate 0.5 (rows): every Linear keeps half its rows, a physically smaller block."""
    flops, dense = _flops(_config("fed_dropout", fed_dropout={"rate": 0.5}))
    assert dense == DENSE_STEP
    assert flops == DENSE_STEP // 2 and flops / dense < 1


def test_an_unstructured_masked_model_costs_the_dense_step() -> None:
    """Masked entries are zeros in dense tensors: the dense products still run."""
    config = _config("fedprune", pruning={"sparsity": 0.5, "pattern": "unstructured"})
    strategy = make_strategy(config, TOY.build_model())
    _, masks = round_masks(strategy, init_state(TOY, 0), 1)
    assert any(not bool(m.all()) for m in masks.values())  # really masked
    flops, dense = _flops(config)
    assert flops == dense == DENSE_STEP


def test_simulate_logs_flops_in_the_rounds_that_evaluate() -> None:
    history = simulate(TOY, CLIENTS, _config("fed_dropout"), TOY.make_clients(1, 8, 9)[0]).history
    counted = [int(row["round"]) for row in history if "client_flops" in row]
    assert counted == [2, 4]
    assert all(row["client_flops"] / row["dense_flops"] == 0.5 for row in history if "client_flops" in row)


HISTORY = [
    {"round": 1.0, "client_time_s_max": 2.0, "bytes_down": 100.0, "bytes_up": 50.0},
    {"round": 2.0, "client_time_s_max": 3.0, "bytes_down": 100.0, "bytes_up": 50.0, "eval_wer": 0.6,
     "eval_accuracy": 0.5},
    {"round": 3.0, "client_time_s_max": 1.5, "bytes_down": 80.0, "bytes_up": 40.0},
    {"round": 4.0, "client_time_s_max": 1.0, "bytes_down": 80.0, "bytes_up": 40.0, "eval_wer": 0.3,
     "eval_accuracy": 0.75},
]


def test_reached_is_the_first_evaluated_round_at_the_target_with_time_and_bytes_so_far() -> None:
    assert reached(HISTORY, "eval_wer", 0.6) == Reached(2, 5.0, 300.0)
    assert reached(HISTORY, "eval_wer", 0.5) == Reached(4, 7.5, 540.0)
    assert reached(HISTORY, "eval_accuracy", 0.7) == Reached(4, 7.5, 540.0)  # higher is better
    assert reached(HISTORY, "eval_accuracy", 0.5) == Reached(2, 5.0, 300.0)


def test_reached_sums_modelled_round_time_only_when_every_round_has_it() -> None:
    modelled = [{**row, "modelled_round_time_s": 0.5} for row in HISTORY]
    assert reached(modelled, "eval_wer", 0.5) == Reached(4, 7.5, 540.0, 2.0)
    assert reached([HISTORY[0], *modelled[1:]], "eval_wer", 0.5) == Reached(4, 7.5, 540.0, None)


def test_reached_is_none_when_never_reached_and_rejects_unknown_metrics() -> None:
    assert reached(HISTORY, "eval_wer", 0.29) is None
    assert reached([], "eval_wer", 1.0) is None
    with pytest.raises(ValueError, match=r"metric='train_loss' takes no target: use one of eval_wer"):
        reached(HISTORY, "train_loss", 0.1)


def test_target_is_an_optional_non_negative_number() -> None:
    assert ExperimentConfig().target is None
    assert ExperimentConfig.from_dict({"target": 0.3}).target == 0.3
    with pytest.raises(ValueError, match=r"target=-0.1 must be >= 0 \(a WER fraction or an accuracy\)"):
        ExperimentConfig.from_dict({"target": -0.1})
    with pytest.raises(ValueError, match=r"config key 'target'='low' must be float \| None"):
        ExperimentConfig.from_dict({"target": "low"})
