"""How much of a run the Prefect server keeps: every task run of the recent rounds, not of all rounds.

A round records about ten task runs in Prefect's database, each with three states: 35-50 KiB a
round (measured: `bench/bench_orchestration.py --db`), over a gigabyte for a 30,000-round run.
After each segment (a child flow run of `rounds_per_segment` rounds) the experiment flow deletes
the segments that ended more than `FEDPRUNE_PREFECT_KEEP_ROUNDS` rounds (default 100) before the
segment that just ended, once the server has recorded all their task runs (`expired_segments`):
the Prefect UI shows every task run of at least the last `FEDPRUNE_PREFECT_KEEP_ROUNDS` rounds
(usually that plus one or two segments), and the database stops growing once the first segments
are gone (deleted rows' pages are reused). Deleting a flow run
deletes its task runs, their states and its logs (Prefect's own cascade). What is deleted is
recorded elsewhere: metrics in MLflow, who trained in each round in the run's storage.
``FEDPRUNE_PREFECT_KEEP_ROUNDS=0`` keeps every segment.

FedPrune's Prefect servers (the embedded default and the stack's) also do not persist events
(`infra.prefect_server.SERVER_ENV`): the events of task-run state changes were about 60% of the
database; task runs are recorded from the same events before they would be persisted.
"""

from __future__ import annotations

import logging
import re
from typing import Any

LOG = logging.getLogger(__name__)


def segment_name(run_id: str, first: int, last: int) -> str:
    """The flow-run name of the segment of rounds `first`..`last` of `run_id`."""
    return f"{run_id}-rounds-{first}-{last}"


def parse_segment(run_id: str, name: str) -> tuple[int, int] | None:
    """(first, last) round of a segment flow-run name of `run_id`; None for another name."""
    match = re.fullmatch(rf"{re.escape(run_id)}-rounds-(\d+)-(\d+)", name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def expired_segments(
    names: dict[Any, str], run_id: str, ended: int, keep_rounds: int, recorded_from: int | None
) -> list[Any]:
    """The ids of the segments of `run_id` to delete now.

    A segment is deleted when it ended more than `keep_rounds` rounds before round `ended`, and the
    server has recorded all its task runs. The server records task runs from the flow's events in
    the order they were sent, so a segment is fully recorded once a task run of a later segment
    is: `recorded_from` is the first round of the newest segment with a recorded task run (None:
    none yet). Deleting a segment before then would make the server's recording of its late task
    runs fail, and with them the other task runs recorded in the same batch.

    Args:
        names: flow-run id -> flow-run name (other runs' names are ignored).
        run_id: the run.
        ended: the last round of the segment that just ended.
        keep_rounds: rounds to keep whole (0: keep every segment).
        recorded_from: see above.
    """
    if keep_rounds == 0 or recorded_from is None:
        return []
    expired = []
    for flow_run_id, name in names.items():
        rounds = parse_segment(run_id, name)
        if rounds and rounds[1] <= ended - keep_rounds and rounds[1] < recorded_from:
            expired.append(flow_run_id)
    return expired


def trim_segments(run_id: str, ended: int, keep_rounds: int) -> int:
    """Delete the finished segments of `run_id` older than the kept window (`expired_segments`).

    Housekeeping: a failure is logged as a warning and never stops the run (the next segment's end
    tries again). Returns the number of segments deleted.
    """
    if keep_rounds == 0:
        return 0
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterName,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import TaskRunSort

    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    name=FlowRunFilterName(like_=f"{run_id}-rounds-"),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED])),
                )
            )
            names = {r.id: r.name for r in runs if parse_segment(run_id, r.name)}
            if not names:
                return 0
            newest = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(names))),
                sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=1,
            )
            newest_name = names.get(newest[0].flow_run_id) if newest and newest[0].flow_run_id else None
            recorded = parse_segment(run_id, newest_name) if newest_name else None
            expired = expired_segments(names, run_id, ended, keep_rounds, recorded[0] if recorded else None)
            for flow_run_id in expired:
                client.delete_flow_run(flow_run_id)
    except Exception as error:  # noqa: BLE001 - housekeeping must not stop a run
        LOG.warning("could not delete old segments of run %s from the Prefect server (%s): will retry", run_id, error)
        return 0
    return len(expired)
