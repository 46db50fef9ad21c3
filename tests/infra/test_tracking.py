"""MLflow tracking: batching, exactly-once resume, params, artifacts; embedded SQLite and a real server."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import Metric

from fedprune_core.presets import preset
from fedprune_core.strategies import STRATEGIES
from infra.errors import TrackingUnreachableError
from infra.outage import OutageError
from infra.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    MARKER_METRIC,
    MAX_METRICS_PER_BATCH,
    Tracker,
    check_tracking_uri,
    experiment_url,
    flatten_params,
    pack_metric_batches,
    run_params,
    run_url,
)
from tests.servers import MlflowServer, free_port


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One embedded SQLite tracking store for this module (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-embedded') / 'mlflow.db'}"


def _experiment() -> str:
    return f"exp-{uuid.uuid4().hex[:8]}"


def _history(tracker: Tracker, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tracker.client.get_metric_history(tracker.run_id, key))


class CountingLogBatch:
    """Wraps `client.log_batch`, counting calls and optionally failing the n-th one."""

    def __init__(self, tracker: Tracker, fail_call: int | None = None) -> None:
        self.real, self.calls, self.fail_call = tracker.client.log_batch, 0, fail_call
        tracker.client.log_batch = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_call:
            raise ConnectionError("simulated network failure")
        return self.real(*args, **kwargs)


class LostAnswers:
    """Wraps `client.log_batch`: the calls numbered in `lose` reach the server, then their answer is
    lost (a connection reset), as when a server goes down between committing and answering."""

    def __init__(self, tracker: Tracker, lose: set[int]) -> None:
        self.real, self.calls, self.lose = tracker.client.log_batch, 0, lose
        tracker.client.log_batch = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        answer = self.real(*args, **kwargs)
        if self.calls in self.lose:
            raise ConnectionResetError(104, "Connection reset by peer")
        return answer


# --------------------------------------------------------------------------- pure helpers


def test_flatten_params_joins_nested_keys_with_dots() -> None:
    params = {
        "prune": {"sparsity": 0.5, "pattern": {"n": 2}},
        "lr": 1e-3,
        "ids": [1, 2],
        "none": None,
        "empty": {},
    }
    assert flatten_params(params) == {
        "prune.sparsity": "0.5",
        "prune.pattern.n": "2",
        "lr": "0.001",
        "ids": "[1, 2]",
        "none": "None",
    }


def test_batches_hold_whole_steps_with_their_marker_and_respect_the_limit() -> None:
    buffer = [Metric(f"m{i}", 1.0, 0, step) for step in range(300) for i in range(5)]
    buffer += [Metric(f"big{i}", 1.0, 0, 300) for i in range(1500)]  # one step larger than a batch
    batches = pack_metric_batches(buffer)
    assert all(len(batch) <= MAX_METRICS_PER_BATCH for batch in batches)
    assert sum(len(b) for b in batches) == len(buffer) + 301
    steps_per_batch = [{m.step for m in batch} for batch in batches]
    for earlier, later in zip(steps_per_batch, steps_per_batch[1:], strict=False):
        assert max(earlier) <= min(later)  # ascending, so the marker's max is a complete prefix
    for batch in batches:
        markers = {m.step for m in batch if m.key == MARKER_METRIC}
        complete = {m.step for m in batch} - ({300} if not markers else set())
        assert markers == complete  # every step finished in a batch carries its marker there
    assert [m.key for m in batches[-1]][-1] == MARKER_METRIC  # the split step's marker comes last


# --------------------------------------------------------------------------- embedded SQLite


def test_embedded_sqlite_run_params_metrics_artifacts(sqlite_uri: str) -> None:
    tracker = Tracker(sqlite_uri, _experiment(), run_name="embedded", flush_every=10)
    tracker.log_params({"cfg": {f"p{i:03d}": i for i in range(250)}, "seed": 1})  # 3 chunks of <= 100
    for step in range(25):
        tracker.log_metrics(step, {"loss": 1.0 / (step + 1)})
    tracker.log_artifact_bytes("reports/summary.json", b"{}")
    tracker.set_tags({"phase": "refine"})
    tracker.finish()
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["phase"] == "refine"
    assert len(run.data.params) == 251 and run.data.params["cfg.p007"] == "7"
    assert _history(tracker, "loss") == [(s, 1.0 / (s + 1)) for s in range(25)]
    assert tracker.last_logged_step() == 24
    artifacts_root = Path(sqlite_uri[len("sqlite:///") :]).parent / "artifacts"
    assert list(artifacts_root.rglob("summary.json"))  # next to the db, not in the cwd


def test_reopen_skips_identical_params_and_refuses_changed_ones(sqlite_uri: str) -> None:
    experiment = _experiment()
    first = Tracker(sqlite_uri, experiment)
    first.log_params({"a": {"b": 1}})
    first.finish("FAILED")
    again = Tracker(sqlite_uri, experiment, run_id=first.run_id)
    assert again.client.get_run(again.run_id).info.status == "RUNNING"
    again.log_params({"a": {"b": 1}, "c": 2})
    with pytest.raises(ValueError, match=r"param 'a.b'='5' differs from '1'"):
        again.log_params({"a": {"b": 5}})


def test_a_failed_flush_keeps_the_unsent_metrics_for_the_next_flush(sqlite_uri: str) -> None:
    tracker = Tracker(sqlite_uri, _experiment(), flush_every=10_000, outage_budget_s=0)  # no waiting
    for step in range(400):
        tracker.log_metrics(step, {"a": step, "b": 2 * step, "c": 0.0})  # 1600 with markers: 2 batches
    counter = CountingLogBatch(tracker, fail_call=2)
    with pytest.raises(OutageError, match="simulated network failure"):
        tracker.flush()
    assert 0 < tracker.last_logged_step() < 399
    tracker.flush()
    assert counter.calls == 3
    assert _history(tracker, "b") == [(s, 2.0 * s) for s in range(400)]
    assert [s for s, _ in _history(tracker, MARKER_METRIC)] == list(range(400))


def test_a_flush_rides_through_a_failed_batch_within_the_budget(sqlite_uri: str) -> None:
    tracker = Tracker(sqlite_uri, _experiment(), flush_every=10_000, outage_budget_s=30)
    for step in range(400):
        tracker.log_metrics(step, {"a": step, "b": 2 * step, "c": 0.0})
    counter = CountingLogBatch(tracker, fail_call=2)
    tracker.flush()  # the second batch fails once, is waited for and sent again
    assert counter.calls == 3
    assert [s for s, _ in _history(tracker, "b")] == list(range(400))
    assert [s for s, _ in _history(tracker, MARKER_METRIC)] == list(range(400))


def test_reserved_and_invalid_inputs_are_refused(sqlite_uri: str) -> None:
    tracker = Tracker(sqlite_uri, _experiment())
    with pytest.raises(ValueError, match="'round' is reserved"):
        tracker.log_metrics(1, {"round": 1.0})
    with pytest.raises(ValueError, match="step=-1 must be an int >= 0"):
        tracker.log_metrics(-1, {"x": 1.0})
    with pytest.raises(ValueError, match="status='DONE'"):
        tracker.finish("DONE")
    with pytest.raises(ValueError, match="does not exist"):
        Tracker(sqlite_uri, _experiment(), run_id="0" * 32)


def test_experiments_are_of_the_model_training_kind_new_or_first_used(sqlite_uri: str) -> None:
    created = _experiment()
    tracker = Tracker(sqlite_uri, created)
    assert tracker.client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    older = _experiment()
    older_id = tracker.client.create_experiment(older)  # as FedPrune created them before, untagged
    assert EXPERIMENT_KIND_TAG not in tracker.client.get_experiment(older_id).tags
    Tracker(sqlite_uri, older)
    assert tracker.client.get_experiment(older_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    chosen = _experiment()
    chosen_id = tracker.client.create_experiment(chosen, tags={EXPERIMENT_KIND_TAG: "genai_development"})
    Tracker(sqlite_uri, chosen)  # a kind someone chose is left alone
    assert tracker.client.get_experiment(chosen_id).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_ui_links_open_the_model_training_view() -> None:
    assert run_url("http://127.0.0.1:5000/", "3", "abc") == (
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert experiment_url("http://h:5000", "3") == "http://h:5000/#/experiments/3/runs?workflowType=machine_learning"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_run_params_hold_what_the_strategy_reads_and_name_the_phases(strategy: str) -> None:
    config = preset("tiny", {"strategy": strategy})
    params = flatten_params(run_params("tiny", "r1", config, {"checkpoint_every": 10}))
    assert params["preset"] == "tiny" and params["run_id"] == "r1" and params["options.checkpoint_every"] == "10"
    assert params["schedule.num_rounds"] == "8" and params["federated.clients_per_round"] == "2"
    sections = {key.split(".")[0] for key in params}
    assert sections & {"fed_dropout", "prunefl", "pruning"} == {
        "fedprune": {"pruning"}, "fedavg": set(), "fed_dropout": {"fed_dropout", "pruning"},
        "prunefl": {"prunefl", "pruning"}}[strategy]
    if strategy == "fedprune":  # the phases of preset tiny: 3 sparsify, 3 refine, 2 fine-tune rounds
        assert params["phases"] == "0=sparsify (rounds 1-3), 1=refine (rounds 4-6), 2=finetune (rounds 7-8)"
        assert params["schedule.refine_every"] == "1"
    else:
        assert "phases" not in params and "schedule.refine_every" not in params


def test_a_directory_is_stored_as_artifacts_under_its_path(sqlite_uri: str, tmp_path: Path) -> None:
    (tmp_path / "model" / "artifacts").mkdir(parents=True)
    (tmp_path / "model" / "MLmodel").write_text("flavors: {}\n")
    (tmp_path / "model" / "artifacts" / "w.bin").write_bytes(b"\x00\x01")
    tracker = Tracker(sqlite_uri, _experiment())
    tracker.log_artifact_dir("model", tmp_path / "model")
    listed = {a.path for a in tracker.client.list_artifacts(tracker.run_id, "model")}
    assert listed == {"model/MLmodel", "model/artifacts"}
    inner = tracker.client.list_artifacts(tracker.run_id, "model/artifacts")
    assert [a.path for a in inner] == ["model/artifacts/w.bin"]


# --------------------------------------------------------------------------- reachability


def test_check_tracking_uri_fails_fast_and_hides_credentials() -> None:
    uri = f"http://alice:s3cr3t@127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TrackingUnreachableError) as info:
        check_tracking_uri(uri)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert (
        "http://***@127.0.0.1" in message and "unreachable" in message and "FEDPRUNE_TRACKING_URI" in message
    )
    assert "s3cr3t" not in message and "alice" not in message


def test_check_tracking_uri_accepts_sqlite_and_creates_its_directory(tmp_path: Path) -> None:
    check_tracking_uri(f"sqlite:///{tmp_path / 'deep' / 'mlflow.db'}")
    assert (tmp_path / "deep").is_dir()
    with pytest.raises(ValueError, match="empty"):
        check_tracking_uri("")


# --------------------------------------------------------------------------- real server


@pytest.mark.integration
def test_server_batching_holds_one_value_per_step_per_key(mlflow_server: MlflowServer) -> None:
    check_tracking_uri(mlflow_server.tracking_uri)
    tracker = Tracker(mlflow_server.tracking_uri, _experiment(), run_name="batching", flush_every=200)
    counter = CountingLogBatch(tracker)
    start = time.monotonic()
    for step in range(1000):
        tracker.log_metrics(step, {f"m{i}": step + i / 10 for i in range(5)})
    tracker.finish()
    elapsed = time.monotonic() - start
    # 5 flushes of 200 steps x 6 metrics (5 + marker) = 1200 -> 2 batches each.
    assert counter.calls == 10, counter.calls
    for i in range(5):
        assert _history(tracker, f"m{i}") == [(s, s + i / 10) for s in range(1000)]
    assert tracker.last_logged_step() == 999
    print(f"\n1000 steps x 5 metrics -> {counter.calls} log_batch calls in {elapsed:.2f} s")


@pytest.mark.integration
def test_server_resume_after_a_crash_logs_each_step_exactly_once(mlflow_server: MlflowServer) -> None:
    experiment = _experiment()
    first = Tracker(mlflow_server.tracking_uri, experiment, flush_every=100)
    for step in range(350):  # steps 300..349 are still buffered when the process dies
        first.log_metrics(step, {"loss": 1.0 / (step + 1), "acc": step / 1000})
    resumed = Tracker(mlflow_server.tracking_uri, experiment, run_id=first.run_id, flush_every=100)
    assert resumed.last_logged_step() == 299
    for step in range(400):  # a deterministic rerun from the last checkpoint, here round 0
        resumed.log_metrics(step, {"loss": 1.0 / (step + 1), "acc": step / 1000})
    resumed.finish()
    assert _history(resumed, "loss") == [(s, 1.0 / (s + 1)) for s in range(400)]
    assert [s for s, _ in _history(resumed, "acc")] == list(range(400))


@pytest.mark.integration
def test_server_a_batch_whose_answer_was_lost_is_held_once(mlflow_server: MlflowServer) -> None:
    tracker = Tracker(mlflow_server.tracking_uri, _experiment(), flush_every=10_000, outage_budget_s=30)
    for step in range(400):
        tracker.log_metrics(step, {"a": step, "b": 2 * step, "c": 0.0})
    tracker.log_metrics(400, {f"big{i}": float(i) for i in range(1500)})  # larger than a batch
    # batches: steps 0-249, steps 250-399, 1000 of step 400 without its marker, the rest with it
    lost = LostAnswers(tracker, lose={1, 3})
    tracker.flush()
    # the first batch is not sent again (its marker is in the store); the third, markerless, is,
    # and the store keeps its rows once (same key, step, timestamp and value)
    assert lost.calls == 5
    assert [s for s, _ in _history(tracker, "a")] == list(range(400))
    assert [s for s, _ in _history(tracker, MARKER_METRIC)] == list(range(401))
    assert all(_history(tracker, f"big{i}") == [(400, float(i))] for i in (0, 999, 1000, 1499))


@pytest.mark.integration
def test_server_artifacts_and_figures_are_proxied_to_the_artifact_store(mlflow_server: MlflowServer) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    tracker = Tracker(mlflow_server.tracking_uri, _experiment())
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    tracker.log_figure("plots/sparsity.png", fig)
    tracker.log_artifact_bytes("model/README.txt", b"compact model")
    tracker.finish()
    listed = {a.path for a in tracker.client.list_artifacts(tracker.run_id, "plots")}
    assert listed == {"plots/sparsity.png"}
    assert list(mlflow_server.artifacts_dir.rglob("sparsity.png"))
    (readme,) = mlflow_server.artifacts_dir.rglob("README.txt")
    assert readme.read_bytes() == b"compact model"
