"""Batch norm running statistics are part of the federated state: clients upload them, the server
averages them (never optimizes or prunes them) and evaluates with them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedprune_core.config import ExperimentConfig
from fedprune_core.engine import aggregate, dispatch, evaluate, init_state, masked_weights, round_masks, train_client
from fedprune_core.simulate import simulate
from fedprune_core.strategies import make_strategy
from fedprune_core.toy import ToyWorkload
from fedprune_core.training import is_running_stat, model_state

STATS = ("1.running_mean", "1.running_var")


@dataclass(frozen=True)
class BatchNormWorkload(ToyWorkload):
    """Linear -> BatchNorm1d -> ReLU -> Linear, on inputs far from zero mean and unit variance."""

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Linear(self.in_dim, self.width),
            nn.BatchNorm1d(self.width),
            nn.ReLU(),
            nn.Linear(self.width, self.classes),
        )

    def make_clients(self, num_clients: int, per_client: int, seed: int) -> list[list[tuple[torch.Tensor, int]]]:
        return [[(5.0 + 3.0 * x, y) for x, y in c] for c in super().make_clients(num_clients, per_client, seed)]


WORKLOAD = BatchNormWorkload()
CLIENTS = WORKLOAD.make_clients(4, 16, 0)


def _config(**federated: object) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "pruning": {"pattern": "column", "sparsity": 0.5, "allocation": "uniform"},
        "schedule": {"num_rounds": 4, "sparsify_rounds": 1, "ramp": "linear", "refine_rounds": 0},
        "federated": {"clients_per_round": 2, "eval_every": 4,
                      "local": {"steps": 2, "batch_size": 8, "lr": 0.1}, **federated},
    })  # fmt: skip


def test_model_state_holds_parameters_and_running_statistics_only() -> None:
    state = model_state(WORKLOAD.build_model())
    params = {n for n, _ in WORKLOAD.build_model().named_parameters()}
    assert set(state) == params | set(STATS)  # num_batches_tracked is not federated
    assert all(is_running_stat(n) for n in STATS) and not any(is_running_stat(n) for n in params)


@pytest.mark.parametrize("server", [{}, {"server_lr": 0.5, "server_momentum": 0.9}])
def test_the_server_averages_the_clients_running_statistics(server: dict[str, float]) -> None:
    config = _config(**server)
    strategy = make_strategy(config, WORKLOAD.build_model())
    state = strategy.initialize(init_state(WORKLOAD, config.seed), WORKLOAD, CLIENTS)
    scores, masks = round_masks(strategy, state, 1)
    outcomes = [
        train_client(WORKLOAD, config, strategy, dispatch(strategy, state, masks, 1, c), CLIENTS[c], 1, c)
        for c in (0, 2)
    ]
    for o in outcomes:  # uploaded, and moved towards the data's statistics
        assert not torch.equal(o.update["1.running_mean"], state.weights["1.running_mean"])
    after = aggregate(strategy, config, state, scores, masks, outcomes, 1)
    n = [o.num_examples for o in outcomes]
    for name in STATS:  # example-weighted mean; a server optimizer step would move it elsewhere
        expected = sum(o.update[name] * k for o, k in zip(outcomes, n, strict=True)) / sum(n)
        torch.testing.assert_close(after.weights[name], expected)
        assert name not in after.masks


def test_evaluation_uses_the_federated_statistics() -> None:
    state = simulate(WORKLOAD, CLIENTS, _config(), CLIENTS[0]).state
    assert state.weights["1.running_var"].mean() > 2.0  # from inputs of std 3: not the initial ones
    model = WORKLOAD.build_model()
    model.load_state_dict(masked_weights(state), strict=False)
    model.eval()
    x, y = WORKLOAD.collate(CLIENTS[0])
    with torch.no_grad():
        by_hand = float(F.cross_entropy(model(x), y))
        model.get_submodule("1").reset_running_stats()
        with_initial_stats = float(F.cross_entropy(model(x), y))
    assert evaluate(WORKLOAD, state, CLIENTS[0])["loss"] == pytest.approx(by_hand)
    assert by_hand != pytest.approx(with_initial_stats)
