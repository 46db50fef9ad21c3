"""The local Prefect server's SQLite write transactions begin IMMEDIATE (they wait for the lock)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from prefect.server.database import configurations

from infra.prefect_server import patch_sqlite


class _Session:
    """Records the BEGIN mode in force when a transaction starts."""

    def __init__(self) -> None:
        self.modes: list[str | None] = []

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[None]:
        self.modes.append(configurations.SQLITE_BEGIN_MODE.get())
        yield


async def _open(session: _Session, with_for_update: bool) -> None:
    config = configurations.AioSqliteConfiguration("sqlite+aiosqlite:///unused.db")
    async with config.begin_transaction(session, with_for_update=with_for_update):  # type: ignore[arg-type]
        pass


def test_every_write_transaction_begins_immediate_after_the_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    cls = configurations.AioSqliteConfiguration
    monkeypatch.setattr(cls, "begin_transaction", cls.begin_transaction)  # restored after the test
    session = _Session()
    asyncio.run(_open(session, with_for_update=False))
    assert session.modes == ["DEFERRED"]  # Prefect's own choice, the one that fails under contention
    patch_sqlite()
    patch_sqlite()  # idempotent: wraps once
    asyncio.run(_open(session, with_for_update=False))
    asyncio.run(_open(session, with_for_update=True))
    assert session.modes == ["DEFERRED", "IMMEDIATE", "IMMEDIATE"]
    assert configurations.SQLITE_BEGIN_MODE.get() is None  # reset after the transaction
