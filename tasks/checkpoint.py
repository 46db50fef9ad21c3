"""Checkpoint: commit a round's state atomically, apply retention, drop covered work objects."""

from __future__ import annotations

from typing import Any

from prefect import task

from fedprune_core.participation import RoundParticipation
from fedprune_core.schedule import phase_at
from infra.runs import RunRef, open_run
from tasks.options import IO_RETRIES, round_task


@task(name="checkpoint", task_run_name=round_task("checkpoint"), **IO_RETRIES)
def checkpoint(
    ref: RunRef, round_num: int, state_key: str, mlflow_run_id: str, left_out: list[RoundParticipation] | None = None
) -> str:
    """Returns the committed state's key (the next round reads from it). `left_out`: the rounds since the
    previous checkpoint that left a client out, kept in the manifest."""
    run = open_run(ref)
    meta: dict[str, Any] = {
        "phase": phase_at(max(round_num, 1), run.config.schedule),
        "seed": run.config.seed,
        "mlflow_run_id": mlflow_run_id,
    }
    if left_out:
        meta["left_out"] = [p.to_json() for p in left_out]
    return run.commit(run.state(state_key, round_num), meta)
