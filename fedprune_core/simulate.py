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
    ClientOutcome,
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
    should_evaluate,
    train_client,
)
from fedprune_core.participation import (
    RoundFailedError,
    RoundParticipation,
    decide,
    min_clients,
    one_line,
    round_failed_message,
)
from fedprune_core.rng import sample_clients
from fedprune_core.schedule import PHASES, phase_at
from fedprune_core.strategies import make_strategy
from fedprune_core.types import MaskDict


@dataclass(frozen=True)
class SimulationResult:
    """Final server state, one metrics dict per round, and the rounds that left a client out."""

    state: ServerState
    history: list[dict[str, float]] = field(default_factory=list)
    left_out: list[RoundParticipation] = field(default_factory=list)


def round_metrics(
    round_num: int,
    config: ExperimentConfig,
    strategy: Strategy,
    state: ServerState,
    outcomes: Sequence[ClientStats],
    sampled: int | None = None,
) -> dict[str, float]:
    """The per-round metrics every runner logs (the flow logs exactly these).

    `sampled` is how many clients were sampled (default: as many as took part); `clients_done` of
    them were aggregated, `clients_left_out` failed or missed the deadline. `bytes_down` and
    `bytes_up` are summed over the clients that took part; `client_params` is the mean number of
    float entries a client downloaded (the parameters it held). In the rounds that count FLOPs
    (evaluated ones, `should_evaluate`), `client_flops` is a client's FLOPs per local step (the mean
    over the round's clients) and `dense_flops` the dense model's on the same batches
    (`fedprune_core.engine.client_step_flops`).
    """
    examples = sum(o.num_examples for o in outcomes)
    sampled = len(outcomes) if sampled is None else sampled
    return {
        "clients_done": float(len(outcomes)),
        "clients_left_out": float(sampled - len(outcomes)),
        "phase": float(PHASES.index(phase_at(round_num, config.schedule))),
        "sparsity": overall_sparsity(state.masks, strategy.specs),
        "train_loss": sum(o.mean_loss * o.num_examples for o in outcomes) / max(examples, 1),
        "bytes_down": float(sum(o.bytes_down for o in outcomes)),
        "bytes_up": float(sum(o.bytes_up for o in outcomes)),
        "client_params": sum(o.params_down for o in outcomes) / len(outcomes),
        "client_time_s_max": max(o.wall_time_s for o in outcomes),
        "client_time_s_mean": sum(o.wall_time_s for o in outcomes) / len(outcomes),
        "client_peak_memory_bytes": float(max(o.peak_memory_bytes for o in outcomes)),
    } | _flops(outcomes) | strategy.metrics(state)


def _flops(outcomes: Sequence[ClientStats]) -> dict[str, float]:
    if not all(o.dense_flops for o in outcomes):  # not counted this round
        return {}
    return {"client_flops": sum(o.flops for o in outcomes) / len(outcomes),
            "dense_flops": sum(o.dense_flops for o in outcomes) / len(outcomes)}


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
    left_out: list[RoundParticipation] = []
    for r in range(state.round_num + 1, config.schedule.num_rounds + 1):
        scores, masks = round_masks(strategy, state, r)
        sampled = sample_clients(len(client_data), config.federated.clients_per_round, config.seed, r)
        outcomes, participation = _train_round(workload, config, strategy, state, masks, client_data, r, sampled)
        state = aggregate(strategy, config, state, scores, masks, outcomes, r)
        metrics = round_metrics(r, config, strategy, state, [o.stats for o in outcomes], len(sampled))
        if not participation.complete:
            left_out.append(participation)
        if eval_data is not None and should_evaluate(r, config):
            metrics.update({f"eval_{k}": v for k, v in evaluate(workload, state, eval_data).items()})
        history.append({"round": float(r), **metrics})
        if on_round is not None:
            on_round(state, metrics)
    return SimulationResult(state, history, left_out)


def _train_round(
    workload: Workload,
    config: ExperimentConfig,
    strategy: Strategy,
    state: ServerState,
    masks: MaskDict,
    client_data: Sequence[Sequence[Any]],
    round_num: int,
    sampled: list[int],
) -> tuple[list[ClientOutcome], RoundParticipation]:
    """Train the sampled clients under the client-failure policy (`fedprune_core.participation`)."""
    outcomes: dict[int, ClientOutcome] = {}
    pending = list(sampled)
    failed: dict[int, str] = {}
    for _ in range(config.federated.round_tries):
        failed = {}
        for c in pending:
            try:
                payload = dispatch(strategy, state, masks, round_num, c)
                outcomes[c] = train_client(workload, config, strategy, payload, client_data[c], round_num, c)
            except Exception as error:  # noqa: BLE001 - any client failure leaves that client out
                failed[c] = one_line(error)
        decided = decide(round_num, sampled, list(outcomes), failed, config.federated)
        if decided is not None:
            return [outcomes[c] for c in decided.done], decided
        pending = sorted(failed)
    needed = min_clients(config.federated)
    raise RoundFailedError(round_failed_message(round_num, failed, len(outcomes), needed, config.federated.round_tries))
