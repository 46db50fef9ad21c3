"""Mask: the global masks in force during a round."""

from __future__ import annotations

from prefect import task

from infra.runs import RunRef, open_run
from tasks.options import IO_RETRIES, round_task

MASKS = "masks"
"""The work object of a round's masks (read again by the checkpoint that covers the round)."""


@task(name="mask", task_run_name=round_task("mask"), **IO_RETRIES)
def mask(ref: RunRef, round_num: int, state_key: str, scores_key: str) -> str:
    """Returns the key of the round's masks."""
    run = open_run(ref)
    masks = run.strategy.mask(run.state(state_key, round_num - 1), run.get(scores_key), round_num)
    return run.put(round_num, MASKS, masks)
