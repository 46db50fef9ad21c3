"""Aggregate: masked FedAvg of the round's updates into the new server state, plus round metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import task

from fedprune_core.engine import ClientOutcome, ClientStats
from fedprune_core.engine import aggregate as aggregate_round
from fedprune_core.participation import RoundParticipation
from fedprune_core.simulate import round_metrics
from infra.runs import RunRef, open_run
from tasks.client_train import GRAD_SQ, Trained
from tasks.options import IO_RETRIES, round_task


@dataclass(frozen=True)
class Aggregated:
    """What the aggregate task returns.

    Attributes:
        state_key: the storage key of the round's new server state.
        metrics: the round's metrics (`fedprune_core.simulate.round_metrics`).
    """

    state_key: str
    metrics: dict[str, float]


def _outcome(upload: dict[str, Any], stats: ClientStats) -> ClientOutcome:
    update = {k: v for k, v in upload.items() if not k.startswith(GRAD_SQ)}
    grad_sq = {k.removeprefix(GRAD_SQ): v for k, v in upload.items() if k.startswith(GRAD_SQ)}
    return ClientOutcome(stats.client_id, update, stats.num_examples, stats.mean_loss, stats.wall_time_s,
                         stats.peak_memory_bytes, stats.bytes_down, stats.bytes_up, stats.params_down,
                         grad_sq or None, stats.flops, stats.dense_flops)


@task(name="aggregate", task_run_name=round_task("aggregate"), **IO_RETRIES)
def aggregate(
    ref: RunRef,
    round_num: int,
    state_key: str,
    scores_key: str | None,
    masks_key: str | None,
    clients: list[Trained],
    participation: RoundParticipation,
) -> Aggregated:
    """The new state and the round's metrics (scores_key, masks_key None: the state's scores and masks).

    `clients` are the results of `participation.done`; a round that left a client out is recorded
    first, so a resumed run trains the same clients in it.
    """
    run = open_run(ref)
    run.record_participation(participation)
    stats = [c.stats for c in clients]
    outcomes = [_outcome(run.get(c.update_key), c.stats) for c in clients]
    previous = run.state(state_key, round_num - 1)
    state = aggregate_round(
        run.strategy, run.config, previous, run.get_or(scores_key, previous.scores),
        run.get_or(masks_key, previous.masks), outcomes, round_num,
    )
    metrics = round_metrics(round_num, run.config, run.strategy, state, stats, len(participation.sampled))
    return Aggregated(run.put(round_num, "state", state.flat()), metrics)
