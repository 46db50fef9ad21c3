"""MLflow tracking for long federated runs: batched, resumable, exactly once per step.

A `Tracker` talks to MLflow through `MlflowClient` only (no global `mlflow.start_run` state), so
it works from any thread or process, and it can reopen a run by id after a crash (DESIGN.md,
"Resume"). Metrics are buffered and sent with `log_batch` in batches of at most 1000. Each step
carries a marker metric ``round`` (value = step) in the same batch as the step's metrics, and a
step is never split across batches unless it alone exceeds a batch (then the marker goes last).
MLflow's SQL store commits one batch's metrics in one transaction, so ``round``'s latest value
is a step up to which everything was logged; on reopen, steps up to it are dropped, and a resumed
deterministic run ends with each step held exactly once.

Every request rides through an outage of the server (`infra.outage`): it waits, within the outage
budget, and is sent again. A metric batch whose connection dropped may have been committed
before: it is sent again only if the store's ``round`` marker is still short of the batch's last
step (and a batch without a marker, part of a step larger than a batch, holds the same rows
again, which MLflow's SQL store keeps once: same key, step, timestamp and value).
"""

from __future__ import annotations

import functools
import io
import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fedprune_core.config import ExperimentConfig
from fedprune_core.participation import one_line
from fedprune_core.schedule import PHASES, phase_spans
from fedprune_core.strategies import applicable_config, strategy_class
from infra.errors import TrackingUnreachableError, redact_url
from infra.outage import configured_budget_s, ride_through
from infra.storage import validate_key

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MARKER_METRIC = "round"
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
_TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
MLFLOW_HTTP_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
"""MLflow's client retries a failed request 7 times over about 4 minutes by default, silently; here
it retries for about 3 s and `infra.outage` waits out longer outages, with a waiting line, within
the run's outage budget. Set the variables to override."""
T = TypeVar("T")


def flatten_params(params: Mapping[str, Any], parent: str = "") -> dict[str, str]:
    """Flatten nested dicts to ``"a.b.c" -> str(value)``; lists and tuples become JSON.

    Args:
        params: e.g. ``{"prune": {"sparsity": 0.5}}``.
        parent: key prefix used in recursion.

    Returns:
        e.g. ``{"prune.sparsity": "0.5"}``. Empty dicts vanish.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{parent}.{key}" if parent else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, name))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(value)
        else:
            flat[name] = str(value)
    return flat


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def pack_metric_batches(buffer: list[Metric]) -> list[list[Metric]]:
    """Pack buffered metrics into `log_batch` batches, whole steps first, each step with its marker.

    Args:
        buffer: metrics in logging order (any steps).

    Returns:
        Batches of at most `MAX_METRICS_PER_BATCH` metrics, ascending by step; every step's
        ``round`` marker is in the batch that completes the step.
    """
    by_step: dict[int, list[Metric]] = {}
    for metric in buffer:
        by_step.setdefault(metric.step, []).append(metric)
    batches: list[list[Metric]] = []
    current: list[Metric] = []
    for step in sorted(by_step):
        entries = by_step[step] + [Metric(MARKER_METRIC, float(step), by_step[step][-1].timestamp, step)]
        if current and len(current) + len(entries) > MAX_METRICS_PER_BATCH:
            batches.append(current)
            current = []
        while len(entries) > MAX_METRICS_PER_BATCH:
            batches.append(entries[:MAX_METRICS_PER_BATCH])
            entries = entries[MAX_METRICS_PER_BATCH:]
        current.extend(entries)
    if current:
        batches.append(current)
    return batches


RUN_ID_TAG = "fedprune.run_id"  # every FedPrune MLflow run carries its FedPrune run id here
PHASE_TAG = "fedprune.phase"
"""Tag of a run with phases: the phase of its last checkpointed round (sparsify, refine, finetune)."""
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
"""MLflow 3's kind of an experiment: "custom_model_development" is its model-training view (runs,
metrics, artifacts), not the GenAI one (traces, evaluations). The Tracker sets it on the experiments
it creates and on the first use of one without it; MLflow 3.17's UI shows the view a browser last
chose (GenAI at first, whatever the tag says) unless the address says which, as `experiment_url`'s
and `run_url`'s do."""
ML_VIEW_QUERY = "workflowType=machine_learning"
"""What a UI address says to open MLflow 3.17's model-training view."""


def experiment_url(ui_url: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's runs, in the model-training view (`ML_VIEW_QUERY`).

    Args:
        ui_url: where the MLflow UI is served, e.g. ``http://127.0.0.1:5000``.
    """
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{ML_VIEW_QUERY}"


def run_url(ui_url: str, experiment_id: str, mlflow_run_id: str) -> str:
    """The MLflow UI page of a run, in the model-training view (`ML_VIEW_QUERY`)."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{mlflow_run_id}?{ML_VIEW_QUERY}"


def strategy_phases(config: ExperimentConfig) -> list[tuple[str, int, int]]:
    """The run's phases (name, first round, last round); none for a strategy that does not read
    the schedule (FedAvg, Federated Dropout, PruneFL), whose rounds are all alike."""
    if "schedule" not in strategy_class(config.strategy).config_keys:
        return []
    return phase_spans(config.schedule)


def run_params(preset: str, run_id: str, config: ExperimentConfig, options: Mapping[str, Any]) -> dict[str, Any]:
    """A run's MLflow params: its preset and id, the configuration its strategy reads
    (`applicable_config`: no `prunefl.*` in a Federated Pruning run), its orchestration options
    and, for a run with phases, ``phases``: what each value of the `phase` metric stands for,
    e.g. ``"0=sparsify (rounds 1-3), 1=refine (rounds 4-6), 2=finetune (rounds 7-8)"``."""
    params = {"preset": preset, "run_id": run_id, **applicable_config(config), "options": dict(options)}
    if phases := strategy_phases(config):
        params["phases"] = ", ".join(f"{PHASES.index(n)}={n} (rounds {a}-{b})" for n, a, b in phases)
    return params


def find_run(client: MlflowClient, experiment: str, run_id: str) -> str | None:
    """The MLflow run id of FedPrune run `run_id` (tag `RUN_ID_TAG`) in MLflow experiment
    `experiment`, the newest if several; None when the experiment or the run does not exist."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    matches = client.search_runs([found.experiment_id], f"tags.`{RUN_ID_TAG}` = '{run_id}'", max_results=1,
                                 order_by=["attributes.start_time DESC"])
    return matches[0].info.run_id if matches else None


def fail_unfinished_starts(tracking_uri: str, experiment: str, run_id: str) -> list[str]:
    """End as FAILED the MLflow runs of FedPrune run `run_id` still RUNNING from starts that died before
    they committed round 0 (a kill, a lost machine); call it only when the run has nothing committed.

    Returns:
        The MLflow run ids ended.
    """
    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    query = f"tags.`{RUN_ID_TAG}` = '{run_id}' and attributes.status = 'RUNNING'"
    runs = client.search_runs([found.experiment_id], query)
    for run in runs:
        client.set_tag(run.info.run_id, FAILURE_TAG, "the start died before it committed round 0; started again")
        client.set_terminated(run.info.run_id, status="FAILED")
    return [run.info.run_id for run in runs]


@functools.lru_cache(maxsize=8)
def mlflow_client(tracking_uri: str) -> MlflowClient:
    """One MLflow client per tracking URI and process: each run segment's `Tracker` reuses it
    (a new client opens its store again, ~0.1 s for a SQLite file). Sets `MLFLOW_HTTP_DEFAULTS`
    where the environment does not."""
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return MlflowClient(tracking_uri=tracking_uri)


FAILURE_TAG = "fedprune.failure"
"""Tag of a FAILED or KILLED run: why it stopped (removed when the run is resumed)."""


class Tracker:
    """One MLflow run, created or reopened by id, with buffered exactly-once metric logging.

    Args:
        tracking_uri: ``sqlite:///abs/mlflow.db`` (embedded) or ``http://host:port`` (server).
        experiment: MLflow experiment name; created if missing.
        run_name: display name of a new run.
        run_id: reopen this run instead of creating one (resume).
        tags: tags of a newly created run (set at creation, so a run that fails early has them).
        flush_every: send buffered metrics once this many distinct steps are buffered.
        artifact_location: artifact root of a newly created experiment; for a sqlite URI it
            defaults to ``<db dir>/artifacts``, for a server the server decides.
        outage_budget_s: how long a request waits for an unreachable server; None reads
            FEDPRUNE_OUTAGE_BUDGET_S (default 300 s).

    Raises:
        OutageError: the server did not answer within the outage budget.
        TrackingUnreachableError: a sqlite URI whose directory cannot be created.
        ValueError: bad arguments, or `run_id` belongs to another experiment.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        flush_every: int = 200,
        artifact_location: str | None = None,
        tags: Mapping[str, str] | None = None,
        outage_budget_s: float | None = None,
    ) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every={flush_every} must be >= 1: pass e.g. 200 steps")
        self.tracking_uri = tracking_uri
        self.outage_budget_s = configured_budget_s() if outage_budget_s is None else outage_budget_s
        self._ride(lambda: check_tracking_uri(tracking_uri))
        self.flush_every = flush_every
        self.client = mlflow_client(tracking_uri)
        self.experiment_id = self._experiment_id(experiment, artifact_location)
        self.run_id = self._open_run(run_id, run_name, dict(tags or {}))
        self._resume_step = self.last_logged_step()
        self._params = dict(self._ride(lambda: self.client.get_run(self.run_id)).data.params)
        self._buffer: list[Metric] = []
        self._buffered_steps: set[int] = set()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Tracker(run_id={self.run_id!r}, tracking_uri={redact_url(self.tracking_uri)!r})"

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """FINISHED; or, on an error, FAILED (KILLED on Ctrl-C) with the error's first line as the
        `fedprune.failure` tag. Buffered metrics are not sent then: they belong to rounds after the
        last checkpoint, which a resumed run computes and logs again. A failure to reach the server
        then is not raised over the run's own error."""
        if exc is None:
            self.finish("FINISHED")
            return
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        reason = one_line(exc, limit=500)
        try:
            self.client.set_tag(self.run_id, FAILURE_TAG, reason)  # not waited for: the run is stopping
            self.client.set_terminated(self.run_id, status=status)
        except Exception:  # noqa: BLE001 - the run's own error is the one to report
            pass

    def _ride(self, call: Callable[[], T]) -> T:
        return ride_through(f"MLflow {redact_url(self.tracking_uri)}", call, self.outage_budget_s, "mlflow")

    # ----------------------------------------------------------------- opening

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        experiment = self._ride(lambda: self.client.get_experiment_by_name(name))
        if experiment is None:
            location = artifact_location or _default_artifact_location(self.tracking_uri)
            kind = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            try:
                return self._ride(lambda: self.client.create_experiment(name, location, tags=kind))
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                # created concurrently, or by a try whose answer an outage lost
                experiment = self._ride(lambda: self.client.get_experiment_by_name(name))
                assert experiment is not None
        if experiment.lifecycle_stage != "active":
            raise ValueError(
                f"MLflow experiment {name!r} is deleted at {redact_url(self.tracking_uri)}: runs need an "
                "active experiment; restore it (mlflow experiments restore) or use another experiment name"
            )
        experiment_id: str = experiment.experiment_id
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # created before FedPrune set it, or by someone else
            self._ride(lambda: self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND))
        return experiment_id

    def _open_run(self, run_id: str | None, run_name: str | None, tags: dict[str, str]) -> str:
        if run_id is None:
            new_id: str = self._ride(
                lambda: self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            ).info.run_id
            return new_id
        try:
            run = self._ride(lambda: self.client.get_run(run_id))
        except MlflowException:
            raise ValueError(
                f"run_id={run_id!r} does not exist at {redact_url(self.tracking_uri)}: pass the id of an "
                "existing run to resume it, or run_id=None to start a new one"
            ) from None
        if run.info.experiment_id != self.experiment_id:
            raise ValueError(
                f"run_id={run_id!r} belongs to experiment id {run.info.experiment_id}, not "
                f"{self.experiment_id}: resume it under its own experiment name"
            )
        if run.info.status != "RUNNING":
            self._ride(lambda: self.client.update_run(run_id, status="RUNNING"))
            if FAILURE_TAG in run.data.tags:
                self._ride(lambda: self.client.delete_tag(run_id, FAILURE_TAG))
        return run_id

    # ----------------------------------------------------------------- logging

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) parameters as ``a.b.c`` keys, 100 per batch; same value again is skipped.

        Raises:
            ValueError: a parameter already logged on this run with a different value.
        """
        new: dict[str, str] = {}
        for key, value in flatten_params(params).items():
            old = self._params.get(key)
            if old is None:
                new[key] = value
            elif old != value:
                raise ValueError(
                    f"param {key!r}={value!r} differs from {old!r} already logged on run {self.run_id}: "
                    "MLflow params are immutable; resume with the same config or start a new run"
                )
        for chunk in _chunks(sorted(new.items()), MAX_PARAMS_PER_BATCH):
            batch = [Param(k, v) for k, v in chunk]  # the same value again is no error: resent as is
            self._ride(functools.partial(self.client.log_batch, self.run_id, params=batch, synchronous=True))
            self._params.update(chunk)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Buffer metrics of one step; steps already held by a reopened run are dropped silently.

        Args:
            step: the round (>= 0).
            metrics: name -> value; the name ``round`` is reserved for the step marker.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} must be an int >= 0: pass the round number")
        if MARKER_METRIC in metrics:
            raise ValueError(
                f"metric name {MARKER_METRIC!r} is reserved for the step marker: rename it, "
                "e.g. 'round_time_s'"
            )
        if step <= self._resume_step or not metrics:
            return
        now = int(time.time() * 1000)
        with self._lock:
            self._buffer.extend(Metric(key, float(value), now, step) for key, value in metrics.items())
            self._buffered_steps.add(step)
            full = len(self._buffered_steps) >= self.flush_every
        if full:
            self.flush()

    def flush(self) -> None:
        """Send all buffered metrics; what fails to send stays buffered for the next flush."""
        with self._flush_lock:
            with self._lock:
                pending, self._buffer = self._buffer, []
                self._buffered_steps = set()
            batches = pack_metric_batches(pending)
            for sent, batch in enumerate(batches):
                try:
                    self._send_metrics(batch)
                except Exception:
                    self._requeue(batches[sent:])
                    raise

    def _send_metrics(self, batch: list[Metric]) -> None:
        """`log_batch`, riding through an outage; not sent again once it is in the store."""
        markers = [m.step for m in batch if m.key == MARKER_METRIC]
        tries = 0

        def send() -> None:
            nonlocal tries
            tries += 1
            if tries > 1 and markers and self._stored_step() >= max(markers):
                return  # committed before the connection dropped
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

        self._ride(send)

    def _requeue(self, batches: list[list[Metric]]) -> None:
        unsent = [m for batch in batches for m in batch if m.key != MARKER_METRIC]
        with self._lock:
            self._buffer = unsent + self._buffer
            self._buffered_steps = {m.step for m in self._buffer}

    def last_logged_step(self) -> int:
        """Highest step whose metrics the tracking store holds completely (-1 if none).

        Reads the ``round`` marker from the store; steps still buffered are not counted.
        """
        return self._ride(self._stored_step)

    def _stored_step(self) -> int:
        value = self.client.get_run(self.run_id).data.metrics.get(MARKER_METRIC)
        return -1 if value is None else int(value)

    def metric_history(self, key: str) -> list[Metric]:
        """Every value logged for metric `key` on this run (any order)."""
        return list(self._ride(lambda: self.client.get_metric_history(self.run_id, key)))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags, 100 per batch."""
        items = sorted((k, str(v)) for k, v in tags.items())
        for chunk in _chunks(items, MAX_TAGS_PER_BATCH):
            batch = [RunTag(k, v) for k, v in chunk]
            self._ride(functools.partial(self.client.log_batch, self.run_id, tags=batch, synchronous=True))

    def log_artifact_bytes(self, path: str, data: bytes) -> None:
        """Store `data` as run artifact `path` (e.g. ``"plots/sparsity.json"``)."""
        relative = PurePosixPath(validate_key(path))
        with tempfile.TemporaryDirectory(prefix="fedprune-artifact-") as tmp:
            local = Path(tmp) / relative.name
            local.write_bytes(data)
            parent = None if str(relative.parent) == "." else str(relative.parent)
            self._ride(lambda: self.client.log_artifact(self.run_id, str(local), artifact_path=parent))

    def log_artifact_dir(self, path: str, local_dir: Path) -> None:
        """Store the files under `local_dir` as run artifacts under `path` (e.g. ``"model"``)."""
        prefix = validate_key(path)
        self._ride(lambda: self.client.log_artifacts(self.run_id, str(local_dir), artifact_path=prefix))

    def log_figure(self, path: str, fig: Figure) -> None:
        """Save a matplotlib figure as artifact `path`; the format follows the suffix (default png)."""
        fmt = PurePosixPath(path).suffix.lstrip(".") or "png"
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, bbox_inches="tight")
        self.log_artifact_bytes(path, buffer.getvalue())

    def finish(self, status: str = "FINISHED") -> None:
        """Flush and mark the run terminated (`status`: FINISHED, FAILED or KILLED)."""
        if status not in _TERMINAL_STATUSES:
            raise ValueError(f"status={status!r} must be one of {_TERMINAL_STATUSES}: pass e.g. 'FINISHED'")
        self.flush()
        self._ride(lambda: self.client.set_terminated(self.run_id, status=status))


def _default_artifact_location(tracking_uri: str) -> str | None:
    db = sqlite_path(tracking_uri)
    return (db.parent / "artifacts").as_uri() if db is not None else None


def sqlite_path(tracking_uri: str) -> Path | None:
    """Absolute database path of a ``sqlite:///`` URI, or None for other URIs."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///") :]).expanduser().resolve()


def check_tracking_uri(uri: str, timeout_s: float = 3.0) -> None:
    """Fail fast, with a clear message, if MLflow cannot be reached at `uri`.

    http(s): one GET of ``/health`` (`timeout_s`); any answer below 500 counts as reachable.
    ``sqlite:///path``: the database's directory is created if needed. Other schemes pass.

    Raises:
        TrackingUnreachableError: naming the URI (credentials redacted), the rule and the fix.
        ValueError: an empty URI.
    """
    if not uri:
        raise ValueError("tracking_uri='' is empty: pass sqlite:///abs/path/mlflow.db or http://host:5000")
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        _check_http(uri, timeout_s)
    elif (db := sqlite_path(uri)) is not None:
        _check_sqlite_dir(uri, db)


def _check_http(uri: str, timeout_s: float) -> None:
    shown = redact_url(uri)
    fix = (
        "start it (`fedprune stack up` runs one on 127.0.0.1:5000) or unset FEDPRUNE_TRACKING_URI to use "
        "the embedded sqlite store"
    )
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError as error:
        if error.code < 500:
            return
        reason = f"HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        reason = str(getattr(error, "reason", error)) or type(error).__name__
    raise TrackingUnreachableError(  # caused by a ConnectionError: an outage (`infra.outage`) mid-run
        f"MLflow server at {shown} is unreachable ({reason}): tracking needs a running server at "
        f"FEDPRUNE_TRACKING_URI; {fix}"
    ) from ConnectionError(reason)


def _check_sqlite_dir(uri: str, db: Path) -> None:
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TrackingUnreachableError(
            f"tracking uri {uri} needs directory {db.parent}, which cannot be created ({error.strerror}): "
            "point FEDPRUNE_TRACKING_URI at sqlite:///<writable dir>/mlflow.db"
        ) from None
