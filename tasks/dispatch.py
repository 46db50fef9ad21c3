"""Dispatch: the payloads the round's clients download (their pruned submodels)."""

from __future__ import annotations

from prefect import task

from fedprune_core.engine import dispatch as make_payload
from infra.runs import RunRef, open_run
from tasks.options import IO_RETRIES


@task(name="dispatch", **IO_RETRIES)
def dispatch(
    ref: RunRef, round_num: int, state_key: str, masks_key: str | None, clients: list[int]
) -> dict[int, str]:
    """Returns the key of each client's payload (masks_key None: the state's masks stay in force)."""
    run = open_run(ref)
    state = run.state(state_key, round_num - 1)
    masks = run.get_or(masks_key, state.masks)
    return {
        c: run.put(round_num, f"payload-{c:06d}", make_payload(run.strategy, state, masks, round_num, c))
        for c in clients
    }
