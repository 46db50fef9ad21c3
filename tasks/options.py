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
