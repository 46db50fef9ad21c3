"""The in-process reference loop on the toy workload: deterministic, resumable, following the schedule."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedprune_core.config import ExperimentConfig
from fedprune_core.engine import ServerState
from fedprune_core.masks import num_pruned
from fedprune_core.schedule import PHASES, phase_at, sparsity_at
from fedprune_core.simulate import SimulationResult, simulate
from fedprune_core.strategies import make_strategy
from fedprune_core.toy import ToyWorkload

TOY = ToyWorkload()  # Linear(16, 32) -> Linear(32, 32) -> Linear(32, 4)
CLIENTS = TOY.make_clients(4, 16, 0)
EVAL = TOY.make_clients(1, 20, 99)[0]


def _config(strategy: str = "fedprune", **pruning: Any) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "strategy": strategy,
        "pruning": {"pattern": "column", "sparsity": 0.5, "allocation": "uniform", **pruning},
        "schedule": {"num_rounds": 6, "sparsify_rounds": 2, "ramp": "linear", "refine_rounds": 2,
                     "refine_every": 1},
        "federated": {"clients_per_round": 2, "eval_every": 3,
                      "local": {"steps": 2, "batch_size": 8, "lr": 0.1}},
    })  # fmt: skip


def _deterministic(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """Metrics without the clients' wall-clock times."""
    return [{k: v for k, v in h.items() if "time" not in k} for h in history]


def _same_state(a: ServerState, b: ServerState) -> bool:
    groups_a, groups_b = a.groups(), b.groups()
    return a.round_num == b.round_num and all(
        groups_a[g].keys() == groups_b[g].keys()
        and all(torch.equal(groups_a[g][n], groups_b[g][n]) for n in groups_a[g])
        for g in groups_a
    )


@pytest.fixture(scope="module")
def run() -> SimulationResult:
    return simulate(TOY, CLIENTS, _config(), EVAL)


def test_two_runs_are_bit_identical(run: SimulationResult) -> None:
    again = simulate(TOY, CLIENTS, _config(), EVAL)
    assert _same_state(run.state, again.state)
    assert _deterministic(run.history) == _deterministic(again.history)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(run: SimulationResult) -> None:
    config = _config()
    first = simulate(TOY, CLIENTS, config.replace({"schedule": {"num_rounds": 3, "refine_rounds": 1}}), EVAL)
    assert first.state.round_num == 3
    rest = simulate(TOY, CLIENTS, config, EVAL, state=first.state)
    assert _same_state(rest.state, run.state)
    assert _deterministic(first.history + rest.history) == _deterministic(run.history)


def test_history_follows_the_schedule(run: SimulationResult) -> None:
    config = _config()
    assert [h["round"] for h in run.history] == [1, 2, 3, 4, 5, 6]
    for h in run.history:
        r = int(h["round"])
        assert h["phase"] == PHASES.index(phase_at(r, config.schedule))
        # every layer prunes whole columns: realized sparsity is exact per layer, so overall it is too
        target = sparsity_at(r, config.schedule, 0.5)
        shapes = [(32, 16), (32, 32), (4, 32)]  # (rows, columns) of the three weights
        pruned = sum(num_pruned(cols, target) * rows for rows, cols in shapes)
        assert h["sparsity"] == pytest.approx(pruned / sum(rows * cols for rows, cols in shapes))
        assert h["bytes_down"] > h["bytes_up"] > 0  # indices travel down only
    assert "eval_accuracy" in run.history[2] and "eval_accuracy" in run.history[5]
    assert "eval_accuracy" not in run.history[0]
    assert run.history[-1]["bytes_up"] < run.history[0]["bytes_up"]  # the submodel shrank


def test_on_round_sees_every_state_and_masks_are_frozen_in_finetune() -> None:
    seen: list[tuple[ServerState, dict[str, float]]] = []
    simulate(TOY, CLIENTS, _config(pattern="unstructured"), on_round=lambda s, m: seen.append((s, m)))
    assert [s.round_num for s, _ in seen] == [1, 2, 3, 4, 5, 6]
    finetune = [s for s, _ in seen if s.round_num > 4]
    assert all(torch.equal(s.masks[n], seen[3][0].masks[n]) for s in finetune for n in s.masks)


def test_fedavg_has_no_masks() -> None:
    result = simulate(TOY, CLIENTS, _config("fedavg"))
    assert result.state.masks == {} and all(h["sparsity"] == 0.0 for h in result.history)


def test_client_params_is_the_mean_number_of_floats_a_client_downloads(run: SimulationResult) -> None:
    dense = 16 * 32 + 32 + 32 * 32 + 32 + 32 * 4 + 4  # the toy MLP's weights and biases
    for h in simulate(TOY, CLIENTS, _config("fedavg")).history:
        assert h["client_params"] == dense and h["bytes_down"] == 2 * 4 * dense  # 2 clients, float32
    pruned = run.history[-1]  # column pruning at 50%: fewer floats, plus int32 indices in bytes_down
    assert pruned["client_params"] < 0.75 * dense and 2 * 4 * pruned["client_params"] < pruned["bytes_down"]


def test_more_clients_per_round_than_clients_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"clients_per_round=2 exceeds the 1 clients available"):
        simulate(TOY, CLIENTS[:1], _config())


@pytest.mark.parametrize(
    ("strategy", "changes"),
    [
        ("fedprune", {}),
        ("fedprune", {"pruning": {"score_source": "gradient"}}),
        ("fedprune", {"pruning": {"score_source": "grad_sq"}}),
        ("fedavg", {}),
        ("fed_dropout", {}),
        ("prunefl", {"prunefl": {"reconfig_every": 2, "initial_max_steps": 4, "initial_reconfig_every": 2}}),
    ],
)
def test_rounds_that_keep_masks_would_score_and_mask_nothing_new(strategy: str, changes: dict[str, Any]) -> None:
    """The flow skips the score and mask tasks of `keeps_masks` rounds: computing them anyway gives the state's own."""
    config = _config(strategy).replace(changes)
    strategy_ = make_strategy(config, TOY.build_model())
    states: list[ServerState] = []
    simulate(TOY, CLIENTS, config, on_round=lambda state, _: states.append(state))
    kept = []
    for state in states[:-1]:
        r = state.round_num + 1
        if strategy_.keeps_masks(r):
            kept.append(r)
            scores = strategy_.score(state, r)
            assert scores.keys() == state.scores.keys()
            assert all(torch.equal(scores[n], state.scores[n]) for n in scores), f"round {r}: scores moved"
            masks = strategy_.mask(state, scores, r)
            assert masks.keys() == state.masks.keys()
            assert all(torch.equal(masks[n], state.masks[n]) for n in masks), f"round {r}: masks moved"
    if strategy in ("fedprune", "prunefl"):  # both re-mask in some rounds and keep masks in others
        assert 0 < len(kept) < config.schedule.num_rounds - 1, kept
    else:
        assert kept == list(range(2, config.schedule.num_rounds + 1))
