"""Dispatch: the payloads the round's clients download (their pruned submodels)."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task

from fedprune_core.engine import dispatch as make_payload
from fedprune_core.participation import RoundParticipation
from infra.runs import RunRef, open_run
from tasks.options import IO_RETRIES, round_task


@dataclass(frozen=True)
class Dispatched:
    """A round's payloads.

    Attributes:
        payloads: client -> key of the payload it downloads.
        recorded: who took part when this round ran before and left a client out (a resumed run):
            only those clients get a payload, so the round ends as it did. None: a fresh round.
    """

    payloads: dict[int, str]
    recorded: RoundParticipation | None


@task(name="dispatch", task_run_name=round_task("dispatch"), **IO_RETRIES)
def dispatch(
    ref: RunRef, round_num: int, state_key: str, masks_key: str | None, clients: list[int]
) -> Dispatched:
    """The payloads of the sampled `clients` (masks_key None: the state's masks stay in force)."""
    run = open_run(ref)
    state = run.state(state_key, round_num - 1)
    masks = run.get_or(masks_key, state.masks)
    recorded = run.recorded_participation(round_num)
    chosen = list(recorded.done) if recorded is not None else clients
    payloads = {
        c: run.put(round_num, f"payload-{c:06d}", make_payload(run.strategy, state, masks, round_num, c))
        for c in chosen
    }
    return Dispatched(payloads, recorded)
