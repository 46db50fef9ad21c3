"""Options every task shares: results are small references, so nothing is cached or persisted."""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE

NO_PERSIST: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}
"""Prefect persists and caches no task result: tensors stay in FedPrune's storage."""

IO_RETRIES: dict[str, Any] = {**NO_PERSIST, "retries": 2, "retry_delay_seconds": 1}
"""For tasks whose storage I/O can fail transiently; every task is idempotent."""
