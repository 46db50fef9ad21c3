"""Client-train: one client trains its payload on its own data and uploads the update."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from prefect import get_run_logger, task
from prefect.logging.loggers import PrefectLogAdapter
from prefect.states import State

from fedprune_core.engine import train_client
from infra.cluster import local_ref, worker_name
from infra.errors import ClientDataError
from infra.runs import RunRef, open_run
from tasks.options import IO_RETRIES, retry_unless_outage, round_task

GRAD_SQ = "grad_sq:"
PLACEMENT_LOGGER = "prefect.task_runs.placement"
"""The task run's log at INFO for where it ran, on the console too: `infra.settings.task_runs_off_console`
keeps only Prefect's own task-run logger off it."""


def _placement_logger() -> logging.LoggerAdapter[logging.Logger]:
    logger = logging.getLogger(PLACEMENT_LOGGER)
    logger.setLevel(logging.INFO)
    run_logger = get_run_logger()
    return PrefectLogAdapter(logger, dict(getattr(run_logger, "extra", None) or {}))


def _worth_retrying(task: Any, task_run: Any, state: State[Any]) -> bool:
    """A client's unreadable data fails every try alike: leave it out at once. An outage past its
    budget is not retried either (`tasks.options.retry_unless_outage`); other errors may pass."""
    return not isinstance(state.data, ClientDataError) and retry_unless_outage(task, task_run, state)


@task(name="client-train", task_run_name=round_task("client-train", client=True),
      **{**IO_RETRIES, "retry_condition_fn": _worth_retrying})
def client_train(ref: RunRef, round_num: int, client_id: int, payload_key: str) -> dict[str, Any]:
    """Returns the update's key, the client's stats (loss, examples, time, memory, bytes) and where
    it ran (`placement`: the worker, and the bytes it read and wrote through storage).

    On a cluster worker the run is opened with the worker's own data (`infra.cluster.local_ref`).
    """
    run = open_run(local_ref(ref))
    payload = run.get(payload_key)
    outcome = train_client(
        run.data.workload, run.config, run.strategy, payload, run.data.clients[client_id], round_num, client_id,
    )
    upload = {**outcome.update, **{GRAD_SQ + k: v for k, v in (outcome.grad_sq or {}).items()}}
    key = run.put(round_num, f"update-{client_id:06d}", upload)
    placement = {"worker": worker_name(), "bytes_read": run.scratch.moved_bytes(payload_key),
                 "bytes_written": run.scratch.moved_bytes(key)}
    if placement["worker"] != "flow":
        _placement_logger().info("round %d client %d ran on worker %s (read %d bytes, wrote %d)", round_num,
                                 client_id, placement["worker"], placement["bytes_read"], placement["bytes_written"])
    return {"update_key": key, "placement": placement, **dataclasses.asdict(outcome.stats)}
