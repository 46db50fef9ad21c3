"""The `store` fixture: every backend of the root `storage` fixture, bare and behind the cache."""

from __future__ import annotations

import pytest

from infra.storage import CachingStorage, Storage


@pytest.fixture(params=["plain", "cached"])
def store(request: pytest.FixtureRequest, storage: Storage) -> Storage:
    """Each backend of the `storage` fixture, bare and behind a `CachingStorage`."""
    return storage if request.param == "plain" else CachingStorage(storage, cacheable=lambda key: True)
