"""The Prefect server keeps every task run of a run's recent rounds and deletes older segments."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from prefect.settings import PREFECT_API_URL, temporary_settings

from infra.prefect_retention import expired_segments, segment_name, trim_segments
from tests.flows.conftest import Cli, cli_for


def _post(api: str, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(f"{api}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_segments_expire_once_old_enough_and_recorded() -> None:
    names = {i: segment_name("r1", first, first + 2) for i, first in enumerate((1, 4, 7, 10))}
    names |= {"other": segment_name("r10", 1, 3), "parent": "r1"}
    # 7-9 ended 3 rounds before 12: kept; 1-3 and 4-6 ended earlier and a later segment is recorded.
    assert expired_segments(names, "r1", ended=12, keep_rounds=4, recorded_from=10) == [0, 1]
    # Only what precedes the newest recorded segment is known to be recorded whole.
    assert expired_segments(names, "r1", ended=12, keep_rounds=4, recorded_from=4) == [0]
    assert expired_segments(names, "r1", ended=12, keep_rounds=4, recorded_from=None) == []
    assert expired_segments(names, "r1", ended=12, keep_rounds=0, recorded_from=10) == []
    assert expired_segments(names, "r1", ended=12, keep_rounds=100, recorded_from=10) == []


def _segments(api: str, run_id: str) -> dict[str, str]:
    runs = _post(api, "/flow_runs/filter", {"flow_runs": {"name": {"like_": f"{run_id}-rounds-"}}})
    return {r["name"]: r["id"] for r in runs}


def _aggregations(api: str, flow_run_id: str, rounds: int) -> int:
    """Aggregate task runs the server recorded for a segment, waiting (bounded) for all `rounds`."""
    deadline = time.monotonic() + 120  # recorded within seconds; more on a loaded machine
    while True:
        tasks = _post(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
        found = sum("aggregate" in t["name"] for t in tasks)
        if found >= rounds or time.monotonic() > deadline:
            return found
        time.sleep(1)


def test_a_run_deletes_only_old_recorded_segments_and_loses_no_task_run(
    cli: Cli, prefect_api: str
) -> None:
    done = cli_for(cli.home, prefect_api, FEDPRUNE_PREFECT_KEEP_ROUNDS="4")(
        "run", "--preset", "toy", "--run-id", "trim1", "--rounds-per-segment", "3"
    )
    assert done.returncode == 0, done.stderr
    segments = _segments(prefect_api, "trim1")
    assert {"trim1-rounds-7-9", "trim1-rounds-10-12"} <= set(segments)  # the last 4 rounds' segments are kept
    for name, flow_run_id in segments.items():  # and every segment still there has all its task runs
        first, last = (int(x) for x in name.rsplit("-", 2)[1:])
        assert _aggregations(prefect_api, flow_run_id, last - first + 1) == last - first + 1, name
    # Once recorded, what ended more than 4 rounds before round 12 goes (the run's next segment end would).
    # Prefect reads its settings once per process: an environment variable set now would be ignored.
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        trim_segments("trim1", 12, 4)
    assert sorted(_segments(prefect_api, "trim1")) == ["trim1-rounds-10-12", "trim1-rounds-7-9"]
