"""The reference loop: a whole federated experiment in one process, no orchestration.

Any strategy, any torch model (through a `Workload`), any list of client datasets. Every random
choice is seeded from (experiment seed, round, client), so two calls with the same arguments
return bit-identical weights; the Prefect flow is tested against this function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedprune_core.config import ExperimentConfig
from fedprune_core.engine import (
    ClientStats,
    ServerState,
    Strategy,
    Workload,
    aggregate,
    dispatch,
    evaluate,
    init_state,
    overall_sparsity,
    round_masks,
    train_client,
)
from fedprune_core.rng import sample_clients
from fedprune_core.schedule import PHASES, phase_at
from fedprune_core.strategies import make_strategy


@dataclass(frozen=True)
class SimulationResult:
    """Final server state and one metrics dict per round."""

    state: ServerState
    history: list[dict[str, float]] = field(default_factory=list)


def round_metrics(
    round_num: int, config: ExperimentConfig, strategy: Strategy, state: ServerState, outcomes: Sequence[ClientStats]
) -> dict[str, float]:
    """The per-round metrics every runner logs (the flow logs exactly these)."""
    examples = sum(o.num_examples for o in outcomes)
    return {
        "phase": float(PHASES.index(phase_at(round_num, config.schedule))),
        "sparsity": overall_sparsity(state.masks, strategy.specs),
        "train_loss": sum(o.mean_loss * o.num_examples for o in outcomes) / max(examples, 1),
        "bytes_down": float(sum(o.bytes_down for o in outcomes)),
        "bytes_up": float(sum(o.bytes_up for o in outcomes)),
        "client_time_s_max": max(o.wall_time_s for o in outcomes),
        "client_time_s_mean": sum(o.wall_time_s for o in outcomes) / len(outcomes),
        "client_peak_memory_bytes": float(max(o.peak_memory_bytes for o in outcomes)),
    }


def should_evaluate(round_num: int, config: ExperimentConfig) -> bool:
    """Evaluate every `eval_every` rounds and at the last round."""
    return round_num % config.federated.eval_every == 0 or round_num == config.schedule.num_rounds


def simulate(
    workload: Workload,
    client_data: Sequence[Sequence[Any]],
    config: ExperimentConfig,
    eval_data: Sequence[Any] | None = None,
    state: ServerState | None = None,
    on_round: Callable[[ServerState, dict[str, float]], None] | None = None,
) -> SimulationResult:
    """Run `config` from `state` (default: a fresh round-0 state) to the last round.

    Args:
        workload: builds, trains and evaluates the model.
        client_data: one sequence of examples per client; client ids are the indices.
        config: the experiment.
        eval_data: examples to evaluate on (skipped when None).
        state: a state to continue from (its `round_num` is the last completed round).
        on_round: called after every round with the new state and its metrics.
    """
    if config.federated.clients_per_round > len(client_data):
        raise ValueError(
            f"clients_per_round={config.federated.clients_per_round} exceeds the {len(client_data)} clients "
            "available: lower clients_per_round or add clients"
        )
    strategy = make_strategy(config, workload.build_model())
    if state is None:
        state = strategy.initialize(init_state(workload, config.seed), workload, client_data)
    history: list[dict[str, float]] = []
    for r in range(state.round_num + 1, config.schedule.num_rounds + 1):
        scores, masks = round_masks(strategy, state, r)
        outcomes = [
            train_client(workload, config, strategy, dispatch(strategy, state, masks, r, c), client_data[c], r, c)
            for c in sample_clients(len(client_data), config.federated.clients_per_round, config.seed, r)
        ]
        state = aggregate(strategy, config, state, scores, masks, outcomes, r)
        metrics = round_metrics(r, config, strategy, state, [o.stats for o in outcomes])
        if eval_data is not None and should_evaluate(r, config):
            metrics.update({f"eval_{k}": v for k, v in evaluate(workload, state, eval_data).items()})
        history.append({"round": float(r), **metrics})
        if on_round is not None:
            on_round(state, metrics)
    return SimulationResult(state, history)
