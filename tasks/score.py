"""Score: importance scores for a round from the previous round's state."""

from __future__ import annotations

from prefect import task

from infra.runs import RunRef, open_run
from tasks.options import IO_RETRIES, round_task


@task(name="score", task_run_name=round_task("score"), **IO_RETRIES)
def score(ref: RunRef, round_num: int, state_key: str) -> str:
    """Returns the key of the round's scores."""
    run = open_run(ref)
    scores = run.strategy.score(run.state(state_key, round_num - 1), round_num)
    return run.put(round_num, "scores", scores)
