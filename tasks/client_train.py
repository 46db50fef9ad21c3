"""Client-train: a worker's clients of a round each train their payload on their own data and upload
their update.

One task trains a cohort: the round's clients that one worker takes (on a cluster, the clients one
worker serves; otherwise one of `max_workers` groups). Prefect's cost is per task run, so a round
costs the same few task runs at 8 clients or 128 (`bench/bench_orchestration.py`). Each client is
trained exactly as alone (seeded by (seed, round, client)); a client that fails is reported with
its reason and the others in its cohort still count (`fedprune_core.participation`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

from prefect import get_run_logger, task
from prefect.logging.loggers import PrefectLogAdapter
from prefect.states import State

from fedprune_core.engine import ClientStats, train_client
from fedprune_core.participation import one_line
from infra.cluster import Placement, format_clients, local_ref, worker_name
from infra.errors import ClientDataError
from infra.outage import find_outage
from infra.runs import Run, RunRef, open_run
from tasks.options import IO_RETRIES, retry_unless_outage

GRAD_SQ = "grad_sq:"
PLACEMENT_LOGGER = "prefect.task_runs.placement"
"""The task run's log at INFO for where it ran, on the console too: `infra.settings.task_runs_off_console`
keeps only Prefect's own task-run logger off it."""


@dataclass(frozen=True)
class Trained:
    """What a client-train task returns: a reference and small numbers, no tensor.

    Attributes:
        update_key: the storage key of the client's uploaded update (with its squared gradients
            under `GRAD_SQ` when the strategy tracks them).
        stats: the client's loss, examples, time, memory and payload bytes.
        placement: where the task ran and the bytes it read and wrote through storage.
    """

    update_key: str
    stats: ClientStats
    placement: Placement


@dataclass(frozen=True)
class Cohort:
    """What a client-train task returns: its clients that trained, and those that failed.

    Attributes:
        trained: one `Trained` per client that finished, in client order.
        failed: (client id, the reason as one line) per client that failed.
    """

    trained: tuple[Trained, ...]
    failed: tuple[tuple[int, str], ...]


def _placement_logger() -> logging.LoggerAdapter[logging.Logger]:
    logger = logging.getLogger(PLACEMENT_LOGGER)
    logger.setLevel(logging.INFO)
    run_logger = get_run_logger()
    return PrefectLogAdapter(logger, dict(getattr(run_logger, "extra", None) or {}))


def _worth_retrying(task: Any, task_run: Any, state: State[Any]) -> bool:
    """A task fails as a whole only when its run cannot be opened (a client's own failure is reported
    in its `Cohort`): retry it, unless an outage outlasted its budget (`tasks.options.retry_unless_outage`)."""
    return not isinstance(state.data, ClientDataError) and retry_unless_outage(task, task_run, state)


def cohort_name(parameters: dict[str, Any]) -> str:
    """The task run's name (`tasks.options.round_task`'s scheme): the round, the step and its clients,
    e.g. ``r000040-client-train-c0-3,7``."""
    return f"r{parameters['round_num']:06d}-client-train-c{format_clients(sorted(parameters['payloads']))}"


# Prefect calls a `task_run_name` callable with the parameters when it has an argument named `parameters`;
# its protocol type also holds a classmethod no plain function has, hence the cast.
@task(name="client-train", task_run_name=cast(Any, cohort_name),
      **{**IO_RETRIES, "retry_condition_fn": _worth_retrying})
def client_train(ref: RunRef, round_num: int, payloads: dict[int, str]) -> Cohort:
    """Trains each client of `payloads` (client id -> its payload's key) and uploads its update (on a
    cluster worker, opening the run with the worker's own data: `infra.cluster.local_ref`).

    A client whose training fails (its data unreadable, its payload missing, ...) is reported in
    `Cohort.failed`; an outage past its budget fails the whole task (the run stops, resumable).
    """
    run = open_run(local_ref(ref))
    trained: list[Trained] = []
    failed: list[tuple[int, str]] = []
    for client_id, payload_key in sorted(payloads.items()):
        try:
            trained.append(_train_one(run, round_num, client_id, payload_key))
        except Exception as error:
            if find_outage(error) is not None:
                raise
            failed.append((client_id, one_line(error)))
    return Cohort(tuple(trained), tuple(failed))


def _train_one(run: Run, round_num: int, client_id: int, payload_key: str) -> Trained:
    payload = run.get(payload_key)
    outcome = train_client(
        run.data.workload, run.config, run.strategy, payload, run.data.clients[client_id], round_num, client_id,
    )
    upload = {**outcome.update, **{GRAD_SQ + k: v for k, v in (outcome.grad_sq or {}).items()}}
    key = run.put(round_num, f"update-{client_id:06d}", upload)
    placement = Placement(worker_name(), run.scratch.moved_bytes(payload_key), run.scratch.moved_bytes(key))
    if placement.worker != "flow":
        _placement_logger().info("round %d client %d ran on worker %s (read %d bytes, wrote %d)", round_num,
                                 client_id, placement.worker, placement.bytes_read, placement.bytes_written)
    return Trained(key, outcome.stats, placement)
