"""Initialize: the round-0 state (seeded model or a warm start, then strategy set-up such as PruneFL's
initial pruning)."""

from __future__ import annotations

from prefect import task

from infra.runs import RunRef, open_run
from tasks.options import IO_RETRIES, round_task


@task(name="initialize", task_run_name=round_task("initialize", round_num=0), **IO_RETRIES)
def initialize(ref: RunRef, mlflow_run_id: str) -> str:
    """Commits round 0 and returns its state key."""
    run = open_run(ref)
    state = run.strategy.initialize(run.initial_state(), run.data.workload, run.data.clients)
    return run.commit(state, {"phase": "init", "seed": run.config.seed, "mlflow_run_id": mlflow_run_id})
