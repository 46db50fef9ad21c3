"""A run's status record: written while it runs and when it ends, read back by `fedprune runs list`."""

from __future__ import annotations

import time

import pytest

from infra.checkpoint import CheckpointStore
from infra.run_status import (
    LEASE_S,
    LEGACY_FINISHED,
    RunStatus,
    StatusWriter,
    active_writer,
    evaluation_text,
    list_statuses,
    read_status,
    table,
)
from infra.storage import Storage

CONFIG = {"experiment": {"strategy": "fedprune", "schedule": {"num_rounds": 8}}, "preset": "toy", "options": {}}


def start(run_id: str = "r1", committed: int | None = None) -> RunStatus:
    now = time.time()
    return RunStatus("exp", run_id, "running", committed or 0, committed, 8, now, now, strategy="fedprune",
                     preset="toy")


def make_run(storage: Storage, run_id: str = "r1") -> CheckpointStore:
    store = CheckpointStore(storage, "exp", run_id)
    store.write_config(CONFIG)
    return store


def test_a_run_that_ends_is_finished_with_its_last_round_and_evaluation(storage: Storage) -> None:
    make_run(storage)
    with StatusWriter(storage, start(), heartbeat_s=60) as writer:
        assert active_writer("exp", "r1") is writer
        writer.progress(3, {"train_loss": 1.0, "eval_wer": 0.5, "eval_cer": 0.25})
        writer.progress(4, {"train_loss": 0.9})  # no evaluation: the last one stays
        writer.committed(4)
    assert active_writer("exp", "r1") is None
    status = read_status(storage, "exp", "r1")
    assert status is not None
    assert (status.state, status.round_num, status.committed) == ("finished", 4, 4)
    assert status.evaluation == {"eval_wer": 0.5, "eval_cer": 0.25}
    assert status.error is None


@pytest.mark.parametrize(("error", "state", "reason"), [
    (ValueError("disk full\nmore detail"), "failed", "ValueError: disk full"),
    (KeyboardInterrupt(), "interrupted", None),
])
def test_a_run_stopped_by_an_error_or_ctrl_c_says_so(storage: Storage, error: BaseException, state: str,
                                                     reason: str | None) -> None:
    make_run(storage)
    with pytest.raises(type(error)), StatusWriter(storage, start(), heartbeat_s=60) as writer:
        writer.committed(2)
        raise error
    status = read_status(storage, "exp", "r1")
    assert status is not None and status.state == state and status.committed == 2
    if reason is None:
        assert status.error is None
    else:
        assert status.error is not None and status.error.startswith(reason) and "\n" not in status.error


def test_the_heartbeat_renews_the_lease_and_a_lapsed_lease_reads_interrupted(storage: Storage) -> None:
    make_run(storage)
    with StatusWriter(storage, start(), heartbeat_s=0.05):
        first = read_status(storage, "exp", "r1")
        time.sleep(0.5)
        later = read_status(storage, "exp", "r1")
        assert first is not None and later is not None and later.updated > first.updated
        (listed,) = list_statuses(storage)
        assert listed.state == "running"
        (stale,) = list_statuses(storage, now=later.updated + LEASE_S + 1)  # the process died without a word
        assert stale.state == "interrupted"


def test_a_resumed_run_keeps_its_start_time_and_last_evaluation(storage: Storage) -> None:
    make_run(storage)
    with StatusWriter(storage, start(), heartbeat_s=60) as writer:
        writer.progress(2, {"eval_accuracy": 0.75})
    first = read_status(storage, "exp", "r1")
    assert first is not None
    time.sleep(0.01)
    with StatusWriter(storage, start(committed=2), heartbeat_s=60):
        pass
    again = read_status(storage, "exp", "r1")
    assert again is not None
    assert again.started == first.started and again.updated > first.updated
    assert again.evaluation == {"eval_accuracy": 0.75}


def test_runs_stored_before_the_record_existed_read_finished_or_interrupted(storage: Storage) -> None:
    done = make_run(storage, "done")
    make_run(storage, "stopped")
    done.put_artifact(LEGACY_FINISHED, b"model")
    statuses = {s.run_id: s for s in list_statuses(storage)}
    assert statuses["done"].state == "finished" and statuses["done"].rounds == 8
    assert statuses["stopped"].state == "interrupted" and statuses["stopped"].committed is None


def test_the_table_shows_status_round_of_n_evaluation_start_and_why_a_run_failed() -> None:
    now = time.mktime((2026, 5, 1, 9, 30, 0, 0, 0, -1))
    rows = [
        RunStatus("exp", "a", "running", 7, 5, 10, now, now, {"eval_wer": 0.4321, "eval_cer": 0.2}),
        RunStatus("exp", "b", "failed", 7, 5, 10, now, now, error="OutageError: S3 unreachable"),
        RunStatus("exp", "c", "interrupted", 7, 5, 10, 0.0, 0.0, {"eval_accuracy": 1.0, "eval_loss": 0.1}),
    ]
    lines = table(rows).splitlines()
    assert lines[0].split() == ["EXPERIMENT", "RUN", "STATUS", "ROUND", "LAST", "EVALUATION", "STARTED", "NOTE"]
    assert lines[1].split() == ["exp", "a", "running", "7/10", "WER", "43.2%", "CER", "20.0%", "2026-05-01", "09:30"]
    assert lines[2].split()[:4] == ["exp", "b", "failed", "5/10"]  # where a resume starts
    assert lines[2].endswith("OutageError: S3 unreachable")
    assert lines[3].split() == ["exp", "c", "interrupted", "5/10", "accuracy", "1", "-"]
    column = lines[0].index("STATUS")  # aligned: every status starts under its header
    assert [line[column:].split()[0] for line in lines] == ["STATUS", "running", "failed", "interrupted"]


def test_evaluation_text_prefers_wer_and_says_when_there_is_none() -> None:
    assert evaluation_text({"eval_wer": 0.1, "eval_loss": 3.0}) == "WER 10.0%"
    assert evaluation_text({}) == "-"
