"""Dispatch: the payload one client downloads (the pruned submodel)."""

from __future__ import annotations

from prefect import task

from fedprune_core.engine import dispatch as make_payload
from infra.runs import RunRef, open_run
from tasks.options import IO_RETRIES


@task(name="dispatch", **IO_RETRIES)
def dispatch(ref: RunRef, round_num: int, state_key: str, masks_key: str, client_id: int) -> str:
    """Returns the key of the client's payload."""
    run = open_run(ref)
    state = run.state(state_key, round_num - 1)
    payload = make_payload(run.strategy, state, run.get(masks_key), round_num, client_id)
    return run.put(round_num, f"payload-{client_id:06d}", payload)
