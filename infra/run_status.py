"""A run's status in its storage: running, finished, failed or interrupted, read in milliseconds.

``<experiment>/<run_id>/status.json`` is written by the experiment flow (`StatusWriter`):
- when the run starts or resumes: "running", with where it starts;
- every `HEARTBEAT_S` while it runs (a thread), with the last round done, the last committed round
  and the last evaluation's metrics; its `updated` time is the run's lease;
- when it ends: "finished", "failed" (with the error's first line) or "interrupted" (Ctrl-C).
A process that dies without a word (SIGKILL, a lost machine) leaves "running" with an `updated` time
older than `LEASE_S`: `RunStatus.state_at` reads it as "interrupted". A run stored before this record
existed counts as finished when its compact model is stored, else as interrupted.

Nothing here imports torch or MLflow: `fedprune runs list` reads one small JSON object per run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from types import TracebackType
from typing import Any

from infra.checkpoint import CheckpointStore, find_runs
from infra.errors import StorageKeyError
from infra.storage import Storage, get_json, put_json

STATUS_OBJECT = "status.json"
HEARTBEAT_S = 10.0
"""How often a running run rewrites its status record."""
LEASE_S = 60.0
"""A "running" record older than this belongs to a process that died: the run is interrupted."""
FINAL_WRITE_S = 10.0
"""How long the end of a run waits for its last status write."""
STATES: tuple[str, ...] = ("running", "finished", "failed", "interrupted")
EVAL_PREFIX = "eval_"
LEGACY_FINISHED = "compact_model.safetensors"
"""The artifact finalize stores: a run without a status record that has it ran to its end."""


@dataclass(frozen=True)
class RunStatus:
    """One run's status record.

    Attributes:
        experiment, run_id: the run.
        state: one of `STATES`, as last written.
        round_num: the last round done (0 before round 1).
        committed: the last committed round (where a resume starts); None before round 0.
        rounds: the run's rounds in all (N).
        started: when the run first started (Unix seconds; kept across resumes).
        updated: when the record was written (Unix seconds): the lease of a running run.
        evaluation: the last evaluation's metrics (``eval_wer``, ``eval_cer``, ...); {} before one.
        strategy, preset: what the run trains.
        error: why a failed run stopped (one line); None otherwise.
    """

    experiment: str
    run_id: str
    state: str
    round_num: int
    committed: int | None
    rounds: int
    started: float
    updated: float
    evaluation: dict[str, float] = field(default_factory=dict)
    strategy: str = ""
    preset: str = ""
    error: str | None = None

    def state_at(self, now: float) -> str:
        """The state at Unix time `now`: a "running" record whose lease ran out is "interrupted"."""
        if self.state == "running" and now - self.updated > LEASE_S:
            return "interrupted"
        return self.state

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunStatus:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def status_key(experiment: str, run_id: str) -> str:
    """``<experiment>/<run_id>/status.json``."""
    return f"{experiment}/{run_id}/{STATUS_OBJECT}"


def read_status(storage: Storage, experiment: str, run_id: str) -> RunStatus | None:
    """The run's status record, or None when it has none (or an unreadable one)."""
    try:
        return RunStatus.from_json(get_json(storage, status_key(experiment, run_id)))
    except (StorageKeyError, ValueError, TypeError, KeyError):
        return None


def list_statuses(storage: Storage, experiment: str | None = None, now: float | None = None) -> list[RunStatus]:
    """Every run in `storage` (of `experiment`, or all) with its status, sorted by experiment and run id.

    A record whose lease ran out reads "interrupted"; a run without a record gets one made from its
    storage (`LEGACY_FINISHED`, ``LATEST``). Runs are read concurrently (a few ms each on S3).
    """
    now = time.time() if now is None else now
    runs = find_runs(storage, experiment)
    with ThreadPoolExecutor(max_workers=16) as pool:
        found = list(pool.map(lambda run: _status_of(storage, *run), runs))
    return [replace(s, state=s.state_at(now)) for s in found]


def _status_of(storage: Storage, experiment: str, run_id: str) -> RunStatus:
    status = read_status(storage, experiment, run_id)
    if status is not None:
        return status
    store = CheckpointStore(storage, experiment, run_id)
    config = store.read_config()
    latest = store.latest_round()
    finished = storage.exists(store.artifact_key(LEGACY_FINISHED))
    return RunStatus(experiment, run_id, "finished" if finished else "interrupted", latest or 0, latest,
                     int(config["experiment"]["schedule"]["num_rounds"]), 0.0, 0.0,
                     strategy=config["experiment"].get("strategy", ""), preset=config.get("preset", ""))


class StatusWriter:
    """Keeps a run's status record while the run runs (a context manager around the run).

    On enter it writes "running" (keeping `started` and the last evaluation of an earlier start) and
    starts a thread that writes the record every `heartbeat_s`; `progress` and `committed` update what
    the next write holds (`committed` wakes the thread). On exit the thread writes "finished",
    "interrupted" (KeyboardInterrupt, or a cancellation that is not an `Exception`) or "failed" with
    the error's first line, and stops. Writes never raise into the run and the exit waits at most
    `FINAL_WRITE_S` for the last one (storage may be what stopped the run): an unwritten end leaves
    "running", which reads "interrupted" once its lease runs out.

    Args:
        storage: the run's storage.
        start: the record to begin with (its state, updated and error are set here).
        heartbeat_s: seconds between writes while running.
        latest_committed: reads the run's newest committed round from its checkpoints; on an exit
            that is not "finished" the record takes it (a stop may fall between a commit and `committed`).
    """

    def __init__(
        self, storage: Storage, start: RunStatus, heartbeat_s: float = HEARTBEAT_S,
        latest_committed: Callable[[], int | None] | None = None,
    ) -> None:
        earlier = read_status(storage, start.experiment, start.run_id)
        if earlier is not None and earlier.started:
            start = replace(start, started=earlier.started, evaluation=start.evaluation or earlier.evaluation)
        self.storage = storage
        self.heartbeat_s = heartbeat_s
        self._status = replace(start, state="running", error=None)
        self._key = status_key(start.experiment, start.run_id)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._latest_committed = latest_committed
        self._thread = threading.Thread(target=self._beat, name=f"status-{start.run_id}", daemon=True)

    @property
    def status(self) -> RunStatus:
        """The record as it stands (written at the next heartbeat)."""
        with self._lock:
            return self._status

    def __enter__(self) -> StatusWriter:
        self._write()  # before the thread starts: the only writer now
        _ACTIVE[(self._status.experiment, self._status.run_id)] = self
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _ACTIVE.pop((self._status.experiment, self._status.run_id), None)
        if exc is None:
            state, error = "finished", None
        elif isinstance(exc, Exception):
            from fedprune_core.participation import one_line  # torch is loaded in a running flow anyway

            state, error = "failed", one_line(exc)
        else:
            state, error = "interrupted", None
        committed = self._status.committed
        if state != "finished" and self._latest_committed is not None:
            try:
                committed = self._latest_committed() or committed
            except Exception:  # noqa: BLE001 - the record must still be written; storage may be what failed
                pass
        with self._lock:
            self._status = replace(self._status, state=state, error=error, committed=committed,
                                   round_num=max(committed or 0, self._status.round_num))
            self._stopping = True
        self._wake.set()
        self._thread.join(FINAL_WRITE_S)

    def progress(self, round_num: int, metrics: Mapping[str, float]) -> None:
        """Round `round_num` is done with `metrics` (its evaluation's, if it had one, are kept)."""
        evaluation = {k: float(v) for k, v in metrics.items() if k.startswith(EVAL_PREFIX)}
        with self._lock:
            self._status = replace(self._status, round_num=round_num,
                                   evaluation=evaluation or self._status.evaluation)

    def committed(self, round_num: int) -> None:
        """Round `round_num` is committed: written now, so a listing names where a resume starts."""
        with self._lock:
            self._status = replace(self._status, committed=round_num,
                                   round_num=max(round_num, self._status.round_num))
        self._wake.set()

    def _beat(self) -> None:
        while True:
            self._wake.wait(self.heartbeat_s)
            self._wake.clear()
            with self._lock:
                stopping = self._stopping  # read before the write: a stop asked during it gets one more
            self._write()
            if stopping:
                return

    def _write(self) -> None:
        with self._lock:
            self._status = replace(self._status, updated=time.time())
            record = self._status.to_json()
        try:
            put_json(self.storage, self._key, record)
        except Exception:  # noqa: BLE001 - e.g. a storage outage: the next heartbeat tries again
            pass


_ACTIVE: dict[tuple[str, str], StatusWriter] = {}
"""The writers of the runs this process runs: the experiment flow and its segments share a process."""


def active_writer(experiment: str, run_id: str) -> StatusWriter | None:
    """The `StatusWriter` of a run this process runs (the experiment flow's), or None (a segment run
    on its own)."""
    return _ACTIVE.get((experiment, run_id))


def evaluation_text(evaluation: Mapping[str, float]) -> str:
    """The last evaluation in a few characters: WER (and CER) when measured, else the workload's metrics."""
    if "eval_wer" in evaluation:
        cer = f" CER {100 * evaluation['eval_cer']:.1f}%" if "eval_cer" in evaluation else ""
        return f"WER {100 * evaluation['eval_wer']:.1f}%{cer}"
    shown = [f"{k.removeprefix(EVAL_PREFIX)} {v:.4g}" for k, v in evaluation.items() if k != "eval_loss"]
    return " ".join(shown) or "-"


TABLE_HEADER = ("EXPERIMENT", "RUN", "STATUS", "ROUND", "LAST EVALUATION", "STARTED", "NOTE")


def table(statuses: list[RunStatus]) -> str:
    """The statuses as aligned columns (`TABLE_HEADER`): ROUND is the last round done of a running or
    finished run, the last committed one (where a resume starts) of a failed or interrupted one."""
    rows = [TABLE_HEADER] + [_row(s) for s in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEADER) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip() for r in rows)


def _row(status: RunStatus) -> tuple[str, ...]:
    done = status.round_num if status.state in ("running", "finished") else status.committed or 0
    started = datetime.fromtimestamp(status.started).strftime("%Y-%m-%d %H:%M") if status.started else "-"
    return (status.experiment, status.run_id, status.state, f"{done}/{status.rounds}",
            evaluation_text(status.evaluation), started, status.error or "")
