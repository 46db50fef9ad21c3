"""Client-train: one client trains its payload on its own data and uploads the update."""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import task
from prefect.states import State

from fedprune_core.engine import train_client
from infra.errors import ClientDataError
from infra.runs import RunRef, open_run
from tasks.options import IO_RETRIES, retry_unless_outage

GRAD_SQ = "grad_sq:"


def _worth_retrying(task: Any, task_run: Any, state: State[Any]) -> bool:
    """A client's unreadable data fails every try alike: leave it out at once. An outage past its
    budget is not retried either (`tasks.options.retry_unless_outage`); other errors may pass."""
    return not isinstance(state.data, ClientDataError) and retry_unless_outage(task, task_run, state)


@task(name="client-train", task_run_name="client-train-r{round_num}-c{client_id}",
      **{**IO_RETRIES, "retry_condition_fn": _worth_retrying})
def client_train(ref: RunRef, round_num: int, client_id: int, payload_key: str) -> dict[str, Any]:
    """Returns the update's key and the client's stats (loss, examples, time, memory, bytes)."""
    run = open_run(ref)
    outcome = train_client(
        run.data.workload, run.config, run.strategy, run.get(payload_key),
        run.data.clients[client_id], round_num, client_id,
    )
    upload = {**outcome.update, **{GRAD_SQ + k: v for k, v in (outcome.grad_sq or {}).items()}}
    key = run.put(round_num, f"update-{client_id:06d}", upload)
    return {"update_key": key, **dataclasses.asdict(outcome.stats)}
