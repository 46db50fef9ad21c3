"""The local Prefect server, started so that a fast flow does not wait on its SQLite database.

    python -m infra.prefect_server server start --host 127.0.0.1 --port 4200

is `prefect server start` with two changes, both for the SQLite database a local server uses:

1. **Batched recording, no stored events** (`SERVER_ENV`). The server records each task run from
   the events the flow sends. Prefect 3.8.8's task-run recorder writes one transaction per event
   by default (7 task runs a round, 3 events each), and falls behind a flow that runs rounds in
   tens of milliseconds: 445 ms of recording per no-op round here. Batches of up to 200 events
   per transaction keep up. The UI shows a task run up to `flush_interval` (5 s) after it
   happened. The events themselves are not stored: they were about 60% of the database
   (`infra.prefect_retention`); task runs are recorded from them all the same.
2. **Write transactions take the write lock when they begin** (`BEGIN IMMEDIATE`). Prefect opens
   them `DEFERRED`: an API write that read first and then meets the recorder's commit fails at
   once with "database is locked" (SQLite cannot upgrade a stale read snapshot; the busy timeout
   does not apply), answers 503, and the client backs off 2, 4, 8, 16 s: the next segment's child
   flow run was created ~30 s late (Prefect issue #18934). `IMMEDIATE` makes such a writer wait
   its turn in the busy timeout instead. Reads outside transactions are unaffected (WAL).

`check_patchable` fails loudly if a Prefect upgrade moves what (2) replaces.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

SERVER_ENV: dict[str, str] = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
}
"""Server settings: record task runs in batches (Prefect's default: 1), and persist no events (see
`infra.prefect_retention`: they were most of the database; task runs are still recorded)."""


def check_patchable() -> Any:
    """Prefect's SQLite configuration class, after checking it still has what `patch_sqlite` wraps."""
    from prefect.server.database import configurations

    cls = configurations.AioSqliteConfiguration
    if not callable(getattr(cls, "begin_transaction", None)) or not hasattr(configurations, "SQLITE_BEGIN_MODE"):
        raise RuntimeError(
            "prefect.server.database.configurations.AioSqliteConfiguration.begin_transaction or SQLITE_BEGIN_MODE "
            "is gone: this Prefect version is not the pinned 3.8.8; update infra/prefect_server.py for it"
        )
    return cls


def patch_sqlite() -> None:
    """Make every write transaction of the server's SQLite database `BEGIN IMMEDIATE`."""
    cls = check_patchable()
    original: Callable[..., AbstractAsyncContextManager[Any]] = cls.begin_transaction
    if getattr(original, "_fedprune_immediate", False):
        return

    def begin_transaction(self: Any, session: Any, with_for_update: bool = False) -> AbstractAsyncContextManager[Any]:
        # For SQLite `with_for_update` only selects the BEGIN mode: True is IMMEDIATE.
        return original(self, session, with_for_update=True)

    begin_transaction._fedprune_immediate = True  # type: ignore[attr-defined]
    cls.begin_transaction = begin_transaction


def main() -> None:
    """`prefect` (the CLI, arguments as given) with the patch applied."""
    patch_sqlite()
    from prefect.cli import app

    sys.argv[0] = "prefect"
    app()


if __name__ == "__main__":
    main()
