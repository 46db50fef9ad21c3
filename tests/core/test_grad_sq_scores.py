"""Federated Pruning scored from the clients' true squared gradients (`grad_sq` score sources).

The reference squared gradients are computed here with torch directly: the same initial weights,
the same batches (`batch_indices` with the client's (seed, round, client) generator), the gradient
of each step by `torch.autograd.grad`, and the optimizer's update of each step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch

from fedprune_core.config import ExperimentConfig
from fedprune_core.engine import ClientOutcome, ServerState, dispatch, init_state, train_client
from fedprune_core.masks import num_pruned
from fedprune_core.rng import generator_for
from fedprune_core.schedule import sparsity_at
from fedprune_core.simulate import simulate
from fedprune_core.strategies import make_strategy
from fedprune_core.strategies.fedprune import GRAD_SQ
from fedprune_core.submodel import payload_nbytes
from fedprune_core.toy import ToyWorkload
from fedprune_core.training import LocalTrainingConfig, batch_indices

TOY = ToyWorkload()  # Linear(16, 32) -> Linear(32, 32) -> Linear(32, 4)
PARAM_ENTRIES = 16 * 32 + 32 + 32 * 32 + 32 + 32 * 4 + 4  # 1732 float32 entries, no running statistics
WEIGHTS = ("0.weight", "2.weight", "4.weight")  # the prunable parameters ("*weight")
CLIENTS = [TOY.make_clients(1, 16, 0)[0], TOY.make_clients(2, 24, 0)[1]]  # 16 and 24 examples: unequal weights


def _config(optimizer: str = "sgd", **pruning: Any) -> ExperimentConfig:
    lr = 0.1 if optimizer == "sgd" else 0.01
    return ExperimentConfig.from_dict({
        "strategy": "fedprune",
        "pruning": {"pattern": "unstructured", "sparsity": 0.5, "allocation": "uniform",
                    "score_source": "grad_sq", "score_norm": "l2", **pruning},
        "schedule": {"num_rounds": 6, "sparsify_rounds": 2, "ramp": "linear", "refine_rounds": 2,
                     "refine_every": 1},
        "federated": {"clients_per_round": 2, "eval_every": 3,
                      "local": {"steps": 4, "batch_size": 6, "lr": lr, "optimizer": optimizer}},
    })  # fmt: skip


@functools.cache
def _run(config: ExperimentConfig) -> tuple[list[ServerState], list[dict[str, float]]]:
    """The state after each round, and the history, of `config` on `CLIENTS`."""
    states: list[ServerState] = []
    history = simulate(TOY, CLIENTS, config, on_round=lambda state, _: states.append(state)).history
    return states, history


def _states(config: ExperimentConfig, rounds: int) -> list[ServerState]:
    return _run(config)[0][:rounds]


def _true_grad_sq(weights: dict[str, torch.Tensor], examples: list[Any], local: LocalTrainingConfig,
                  seed: int, round_num: int, client_id: int) -> dict[str, torch.Tensor]:
    """Σ over the client's local steps of the squared loss gradient, in float64, by plain torch."""
    model = TOY.build_model()
    model.load_state_dict(weights)
    params = dict(model.named_parameters())
    step = _optimizer_step(list(params.values()), local)
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for batch in batch_indices(len(examples), local, generator_for(seed, round_num, client_id, "batches")):
        loss = TOY.loss_fn(model, TOY.collate([examples[i] for i in batch]))
        grads = torch.autograd.grad(loss, list(params.values()))
        for (name, p), g in zip(params.items(), grads, strict=True):
            total[name] += g.double() ** 2
            p.grad = g
        step()
    return total


def _optimizer_step(params: list[torch.nn.Parameter], local: LocalTrainingConfig) -> Callable[[], object]:
    """One step of the client's optimizer on `params`' `.grad`: plain SGD by hand, or torch's Adam."""
    if local.optimizer == "adam":
        return torch.optim.Adam(params, lr=local.lr, betas=(0.9, 0.999)).step

    def sgd() -> None:
        with torch.no_grad():
            for p in params:
                assert p.grad is not None
                p.sub_(local.lr * p.grad)

    return sgd


def _expected_round_1(config: ExperimentConfig) -> dict[str, torch.Tensor]:
    """FedAvg-weighted mean of the clients' true squared gradients in round 1 (every client holds every entry)."""
    weights = init_state(TOY, config.seed).weights
    sums = [_true_grad_sq(weights, examples, config.federated.local, config.seed, 1, c)
            for c, examples in enumerate(CLIENTS)]
    n = [len(examples) for examples in CLIENTS]
    return {name: (n[0] * sums[0][name] + n[1] * sums[1][name]) / sum(n) for name in WEIGHTS}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fedprune_grad_sq_is_the_weighted_mean_of_the_true_squared_gradients(optimizer: str) -> None:
    config = _config(optimizer)
    state = _states(config, 1)[0]
    expected = _expected_round_1(config)
    for name in WEIGHTS:
        torch.testing.assert_close(state.extra[GRAD_SQ + name].double(), expected[name], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fedprune_grad_sq_masks_keep_the_entries_of_largest_true_squared_gradient(optimizer: str) -> None:
    config = _config(optimizer)
    first, second = _states(config, 2)
    expected = _expected_round_1(config)
    target = sparsity_at(2, config.schedule, config.pruning.sparsity)
    assert target > 0
    for name in WEIGHTS:
        mask, truth = second.masks[name], expected[name]
        assert int((~mask).sum()) == num_pruned(mask.numel(), target)
        # round 2's masks rank round 1's squared gradients: every kept entry's true g² is at least
        # every pruned entry's (the only freedom is among entries of equal g²)
        assert float(truth[mask].min()) >= float(truth[~mask].max()) * (1 - 1e-5)
        assert torch.equal(second.scores[name], first.extra[GRAD_SQ + name])  # l2: the score is grad_sq itself


def test_weight_x_grad_sq_scores_are_the_weights_times_the_squared_gradients() -> None:
    l2, l1 = (_states(_config(score_source="weight_x_grad_sq", score_norm=norm), 2) for norm in ("l2", "l1"))
    for name in WEIGHTS:
        w, g2 = l2[0].weights[name], l2[0].extra[GRAD_SQ + name]
        torch.testing.assert_close(l2[1].scores[name], w.square() * g2)
        torch.testing.assert_close(l1[1].scores[name], w.abs() * g2.sqrt())


def test_grad_sq_scores_accumulate_over_the_rounds_an_entry_was_trained() -> None:
    states = _states(_config(), 4)
    for before, after in zip(states[1:], states[2:], strict=False):  # rounds 2 -> 3 -> 4: masks in force
        for name in WEIGHTS:
            trained = before.masks[name]
            # round r + 1's scores: round r's scores plus round r's squared gradients where trained
            expected = before.scores[name] + torch.where(trained, before.extra[GRAD_SQ + name], 0.0)
            assert torch.equal(after.scores[name], expected)
            # clients send no squared gradient of a pruned entry: the server's mean there is 0
            assert not before.extra[GRAD_SQ + name][~trained].any()


def test_a_resumed_grad_sq_run_ends_where_an_uninterrupted_one_does() -> None:
    config = _config()
    whole = _run(config)[0][-1]
    first = simulate(TOY, CLIENTS, config.replace({"schedule": {"num_rounds": 3, "refine_rounds": 1}}))
    # the state a checkpoint stores and a resume restores: its flat tensors, through from_flat
    restored = ServerState.from_flat(first.state.round_num, first.state.flat())
    rest = simulate(TOY, CLIENTS, config, state=restored)
    assert any(k.startswith(f"extra/{GRAD_SQ}") for k in rest.state.flat())
    flat_a, flat_b = whole.flat(), rest.state.flat()
    assert flat_a.keys() == flat_b.keys() and all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a)


# --- bytes_up: everything a client sends ---------------------------------------------------------


def _outcome(config: ExperimentConfig, state: ServerState, round_num: int, client_id: int) -> ClientOutcome:
    strategy = make_strategy(config, TOY.build_model())
    payload = dispatch(strategy, state, state.masks, round_num, client_id)
    return train_client(TOY, config, strategy, payload, CLIENTS[client_id], round_num, client_id)


def test_bytes_up_counts_the_squared_gradients_of_the_held_entries() -> None:
    config = _config()
    states = _states(config, 2)
    # round 1 trains dense: the update and the squared gradients are both every float32 entry
    assert _run(config)[1][0]["bytes_up"] == 2 * (PARAM_ENTRIES * 4 + PARAM_ENTRIES * 4)
    # round 3 trains round 2's masks: values and squared gradients of the held entries only
    held = PARAM_ENTRIES - sum(int((~states[1].masks[n]).sum()) for n in WEIGHTS)
    outcome = _outcome(config, states[1], 3, 0)
    assert outcome.grad_sq is not None and payload_nbytes(outcome.grad_sq) == held * 4
    assert outcome.bytes_up == payload_nbytes(outcome.update) + held * 4 == 2 * held * 4


def test_sliced_patterns_upload_the_squared_gradients_of_their_blocks() -> None:
    config = _config(pattern="column")
    state = _states(config, 2)[1]
    assert any(not m.all() for m in state.masks.values())
    outcome = _outcome(config, state, 3, 1)
    assert outcome.grad_sq is not None
    # the same blocks (and values) as the update, no indices: one float32 per held entry
    assert {k: v.shape for k, v in outcome.grad_sq.items()} == {k: v.shape for k, v in outcome.update.items()}
    assert outcome.bytes_up == 2 * payload_nbytes(outcome.update) < 2 * PARAM_ENTRIES * 4


def test_a_strategy_that_reads_no_squared_gradients_uploads_none() -> None:
    config = _config(score_source="weight").replace({"federated": {"local": {"track_grad_sq": True}}})
    outcome = _outcome(config, init_state(TOY, config.seed), 1, 0)
    assert outcome.grad_sq is None and outcome.bytes_up == PARAM_ENTRIES * 4


def test_prunefl_bytes_up_counts_its_dense_squared_gradients() -> None:
    config = _config().replace({"strategy": "prunefl", "prunefl": {
        "reconfig_every": 2, "initial_max_steps": 4, "initial_reconfig_every": 2, "initial_samples": 16}})
    strategy = make_strategy(config, TOY.build_model())
    state = strategy.initialize(init_state(TOY, config.seed), TOY, CLIENTS)
    pruned = sum(int((~m).sum()) for m in state.masks.values())
    assert pruned > 0  # a sub-model goes down, dense squared gradients come up
    outcome = _outcome(config, state, 1, 0)
    assert payload_nbytes(outcome.update) == (PARAM_ENTRIES - pruned) * 4
    assert outcome.bytes_up == (PARAM_ENTRIES - pruned) * 4 + PARAM_ENTRIES * 4
