"""Outages mid-run: storage (SeaweedFS), MLflow and the Prefect API stop and come back.

Each run is a real `fedprune run` against dedicated servers that a thread (`tests.servers.Outage`)
stops once the run has committed round 10 and starts again, on the same port and data, seconds
later. The run waits the outage out and ends with the final weights of an uninterrupted run and
each MLflow step logged once; an outage longer than the budget stops it with one line, resumable.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from infra.stack import read_pid, stop_service
from tests.flows.conftest import Cli, cli_for
from tests.flows.helpers import final_state, weights_hash
from tests.servers import Outage, S3Server, free_port, restartable_mlflow, restartable_prefect, restartable_seaweed

pytestmark = pytest.mark.integration

ROUNDS = 40
ARGS = ("--preset", "toy", "--set", f"schedule.num_rounds={ROUNDS}", "--rounds-per-segment", "10",
        "--checkpoint-every", "5")
DOWN_S = 12
OUTAGE_AT = 10  # the outage begins once this round is committed


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> str:
    """The final weights' hash of the same run without an outage (local storage, embedded MLflow)."""
    cli = cli_for(tmp_path_factory.mktemp("uninterrupted") / "home", prefect_api)
    done = cli("run", *ARGS, "--run-id", "whole")
    assert done.returncode == 0, done.stderr[-3000:]
    return weights_hash(final_state(cli.home, "whole").weights)


def local_latest(home: Path, run_id: str) -> Callable[[], int]:
    """The run's committed round in local storage (-1 before the first)."""
    path = home / "storage" / "fedprune" / run_id / "LATEST"
    return lambda: json.loads(path.read_text())["round"] if path.exists() else -1


def s3_latest(server: S3Server, run_id: str) -> Callable[[], int]:
    """The run's committed round in the server's bucket (-1 before the first, or while it is down)."""

    def latest() -> int:
        try:
            body = server.client.get_object(Bucket=server.bucket, Key=f"fedprune/{run_id}/LATEST")["Body"].read()
        except Exception:
            return -1
        return int(json.loads(body)["round"])

    return latest


def assert_each_step_once(tracking_uri: str, run_id: str) -> None:
    """One MLflow run for `run_id`; per-round metrics at every round, no step of any metric twice."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("fedprune")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], f"tags.`fedprune.run_id` = '{run_id}'")
    assert len(runs) == 1, "one MLflow run per FedPrune run"
    steps = {key: [m.step for m in client.get_metric_history(runs[0].info.run_id, key)]
             for key in runs[0].data.metrics}
    for key in ("train_loss", "sparsity", "round"):
        assert sorted(steps[key]) == list(range(1, ROUNDS + 1)), key
    for key, logged in steps.items():
        assert len(logged) == len(set(logged)), f"{key} holds a step twice: {sorted(logged)}"


def run_through(cli: Cli, run_id: str, outage: Outage) -> str:
    """`fedprune run` while `outage` happens; returns its stderr after checking it finished cleanly."""
    outage.start()
    done = cli("run", *ARGS, "--run-id", run_id, timeout=600)
    outage.join()
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    return done.stderr


def test_storage_outage_is_waited_out(tmp_path: Path, prefect_api: str, uninterrupted: str) -> None:
    with restartable_seaweed(tmp_path / "seaweed") as (s3, service):
        cli = cli_for(tmp_path / "home", prefect_api, **s3.env())
        stderr = run_through(cli, "s3-down", Outage(service, lambda: s3_latest(s3, "s3-down")() >= OUTAGE_AT, DOWN_S))
        assert f"waiting for storage s3://{s3.bucket} (unreachable since" in stderr
        assert "answers again after" in stderr
        assert weights_hash(final_state(s3.storage(), "s3-down").weights) == uninterrupted
    assert_each_step_once(f"sqlite:///{cli.home / 'mlflow.db'}", "s3-down")


def test_mlflow_outage_is_waited_out(tmp_path: Path, prefect_api: str, uninterrupted: str) -> None:
    with restartable_mlflow(tmp_path / "mlflow") as (mlflow, service):
        cli = cli_for(tmp_path / "home", prefect_api, FEDPRUNE_TRACKING_URI=mlflow.tracking_uri)
        latest = local_latest(cli.home, "mlflow-down")
        stderr = run_through(cli, "mlflow-down", Outage(service, lambda: latest() >= OUTAGE_AT, DOWN_S))
        assert f"waiting for MLflow {mlflow.tracking_uri} (unreachable since" in stderr
        assert weights_hash(final_state(cli.home, "mlflow-down").weights) == uninterrupted
        assert_each_step_once(mlflow.tracking_uri, "mlflow-down")


@pytest.mark.parametrize("client_retries", [None, "1"], ids=["prefect-client-retries", "flow-run-again"])
def test_prefect_api_killed_and_restarted(tmp_path: Path, uninterrupted: str, client_retries: str | None) -> None:
    """With Prefect's default client retries (about a minute) the flow rides a short outage through
    itself; with one retry its flow run fails, and the CLI waits for the API and runs it again."""
    retries = {"PREFECT_CLIENT_MAX_RETRIES": client_retries} if client_retries else {}
    with restartable_prefect(tmp_path / "prefect") as (api, service):
        cli = cli_for(tmp_path / "home", api, **retries)
        latest = local_latest(cli.home, "api-down")
        stderr = run_through(cli, "api-down", Outage(service, lambda: latest() >= OUTAGE_AT, DOWN_S, signal.SIGKILL))
    if client_retries:
        assert f"the Prefect API at {api} went away" in stderr and f"waiting for Prefect API {api}" in stderr
    assert weights_hash(final_state(cli.home, "api-down").weights) == uninterrupted
    assert_each_step_once(f"sqlite:///{cli.home / 'mlflow.db'}", "api-down")


def test_the_on_demand_prefect_server_is_started_again_when_it_died(tmp_path: Path, uninterrupted: str) -> None:
    """No PREFECT_API_URL: the CLI's own server is killed mid-run and nobody restarts it but the CLI."""
    cli = cli_for(tmp_path / "home", "", FEDPRUNE_PREFECT_PORT=str(free_port()), PREFECT_CLIENT_MAX_RETRIES="1")
    del cli.env["PREFECT_API_URL"]
    stack_dir = cli.home / "stack"
    latest = local_latest(cli.home, "ours")

    def crash_when_ready() -> None:
        while latest() < OUTAGE_AT:
            time.sleep(0.05)
        pid = read_pid(stack_dir, "prefect")
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)

    crash = threading.Thread(target=crash_when_ready, daemon=True)
    crash.start()
    try:
        done = cli("run", *ARGS, "--run-id", "ours", timeout=600)
        crash.join(timeout=5)
        assert done.returncode == 0, done.stderr[-4000:]
        assert "went away" in done.stderr and read_pid(stack_dir, "prefect") is not None  # started again
        assert "Traceback" not in done.stderr, done.stderr[-4000:]
    finally:
        stop_service(stack_dir, "prefect")
    assert weights_hash(final_state(cli.home, "ours").weights) == uninterrupted
    assert_each_step_once(f"sqlite:///{cli.home / 'mlflow.db'}", "ours")


def test_an_outage_past_the_budget_stops_resumably(tmp_path: Path, prefect_api: str, uninterrupted: str) -> None:
    run_id = f"too-long-{uuid.uuid4().hex[:6]}"
    with restartable_seaweed(tmp_path / "seaweed") as (s3, service):
        cli = cli_for(tmp_path / "home", prefect_api, **s3.env())
        outage = Outage(service, lambda: s3_latest(s3, run_id)() >= OUTAGE_AT, 30)
        outage.start()
        stopped = cli("run", *ARGS, "--run-id", run_id, "--outage-budget", "8")
        assert stopped.returncode == 1, stopped.stderr[-4000:]
        errors = [line for line in stopped.stderr.splitlines() if line.startswith("error:") or "| ERROR" in line]
        assert len(errors) == 1 and errors[0].startswith("error: storage s3://"), errors
        assert "longer than the outage budget of 8 s" in errors[0] and f"`fedprune resume {run_id}`" in errors[0]
        assert "Traceback" not in stopped.stderr + stopped.stdout, stopped.stderr[-4000:]
        outage.join()
        assert 10 <= s3_latest(s3, run_id)() < ROUNDS
        resumed = cli("resume", run_id)
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        assert weights_hash(final_state(s3.storage(), run_id).weights) == uninterrupted
    assert_each_step_once(f"sqlite:///{cli.home / 'mlflow.db'}", run_id)
