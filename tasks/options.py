"""Options every task shares: results are small references, so nothing is cached or persisted."""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE

from infra.outage import find_outage

NO_PERSIST: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}
"""Prefect persists and caches no task result: tensors stay in FedPrune's storage."""


def retry_unless_outage(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's `retry_condition_fn`: retry a failed task, but not one whose service stayed down past
    the outage budget (`infra.outage`): it waited already, and the run stops, resumable."""
    error = state.data
    return not (isinstance(error, BaseException) and find_outage(error) is not None)


IO_RETRIES: dict[str, Any] = {**NO_PERSIST, "retries": 2, "retry_delay_seconds": 1,
                              "retry_condition_fn": retry_unless_outage}
"""For tasks whose storage I/O can fail transiently; every task is idempotent."""


def round_task(step: str, client: bool = False, round_num: int | None = None) -> str:
    """The task-run name of `step` in a round: ``r{round:06d}-{step}``, plus ``-c{client}`` for a client's
    step, e.g. ``r000040-client-train-c2``, ``r000114-aggregate``. Names sort by round in the Prefect UI,
    with the round as storage writes it (``rounds/<round:06d>/``); a task outside the rounds is named by its
    step alone (``finalize``, ``sweep-report``), a sweep's run by its id (``variant-<run_id>``).

    Args:
        step: the task's name.
        client: add the task's `client_id` parameter.
        round_num: a fixed round (initialize: 0) instead of the task's `round_num` parameter.

    Returns:
        A template Prefect fills from the task's parameters.
    """
    prefix = "r{round_num:06d}" if round_num is None else f"r{round_num:06d}"
    return f"{prefix}-{step}" + ("-c{client_id}" if client else "")
