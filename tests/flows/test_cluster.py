"""Clients on a real Dask cluster on loopback: a `dask scheduler` and three `fedprune worker` processes,
each with its own FEDPRUNE_HOME holding only its clients of the `test` speech corpus, payloads and
updates through the session's SeaweedFS. Over TLS: tests/flows/test_cluster_tls.py."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from fedprune_core.presets import preset
from fedprune_core.rng import sample_clients
from infra.speech_data import read_index
from tests.flows.cluster import (
    OVERRIDES,
    OWNER,
    ROUNDS,
    WORKERS,
    Cluster,
    base_env,
    check_run_on_cluster,
    flow_cli,
    latest_round,
    mlflow_run,
    placement,
    reference,
    run_args,
    running_cluster,
    speakers_on_disk,
    start_workers,
    stop,
)
from tests.flows.conftest import Cli
from tests.flows.helpers import final_state, weights_hash
from tests.servers import S3Server

pytestmark = pytest.mark.integration
__all__ = ["base_env", "reference"]  # fixtures


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, base_env: dict[str, str]) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster"), base_env) as running:
        start_workers(running)
        yield running


def test_clients_train_on_their_own_workers_and_the_flow_equals_simulate(
    cluster: Cluster, reference: str, tmp_path: Path, base_env: dict[str, str], seaweed_s3: S3Server,
    prefect_api: str,
) -> None:
    cli, prefix = flow_cli(tmp_path, base_env, seaweed_s3)
    done = check_run_on_cluster(cluster, cli, prefix, "on-cluster", reference, seaweed_s3)

    # Each worker's home holds its own clients' audio and nothing else; the flow's home holds none.
    speakers = list(read_index(next((cluster.home("w0") / "data").glob("*"))).get("splits", {})["train"])
    for name in WORKERS:
        own = {speakers[c] for c, owner in OWNER.items() if owner == name}
        assert speakers_on_disk(cluster.home(name)) == {"train": own}, name
    assert "train" not in speakers_on_disk(cli.home)
    log = cluster.log("w1").read_text()
    assert "client 2 ran on worker w1" in log

    # Workers read S3 with their own credentials: the secret is in no task parameter (Prefect's task
    # and flow runs), no log line (the flow's, the workers', Prefect's) and no MLflow record.
    secret = seaweed_s3.secret_access_key
    task_runs = prefect_records(prefect_api, "task_runs")
    assert "r000001-client-train-c" in task_runs  # the records are there, named by round and client
    for text in (done.stdout + done.stderr, *(cluster.log(n).read_text() for n in WORKERS), task_runs,
                 prefect_records(prefect_api, "flow_runs"), prefect_records(prefect_api, "logs")):
        assert secret not in text
    mlflow, run = mlflow_run(cli.home, "on-cluster")
    assert secret not in json.dumps([run.data.params, run.data.tags])
    for artifact in ("config.json", "placement.csv"):
        assert secret not in Path(mlflow.download_artifacts(run.info.run_id, artifact)).read_text()


def prefect_records(api: str, kind: str) -> str:
    """Every record of `kind` ("flow_runs", "task_runs", "logs") the Prefect server holds, as JSON text."""
    pages, offset = [], 0
    while True:
        page = httpx.post(f"{api}/{kind}/filter", json={"limit": 200, "offset": offset}, timeout=30).json()
        if not page:
            return "".join(json.dumps(p) for p in pages)
        pages += page
        offset += len(page)


def test_a_run_stops_before_round_1_naming_the_clients_no_worker_serves(
    cluster: Cluster, tmp_path: Path, base_env: dict[str, str], seaweed_s3: S3Server
) -> None:
    cli, _ = flow_cli(tmp_path, base_env, seaweed_s3)
    done = cli("run", "--preset", "toy", "--run-id", "toy", "--task-runner", "dask", "--dask-address",
               cluster.address)
    assert done.returncode != 0
    assert f"no worker of the Dask cluster at '{cluster.address}' serves clients 4-7 (of 0-7)" in done.stderr


def test_a_run_killed_mid_round_resumes_on_the_same_cluster_bit_identical(
    cluster: Cluster, reference: str, tmp_path: Path, base_env: dict[str, str], seaweed_s3: S3Server
) -> None:
    cli, prefix = flow_cli(tmp_path, base_env, seaweed_s3)
    proc = cli.popen(*run_args(cluster, "killed"))
    deadline = time.monotonic() + 400
    while latest_round(prefix, seaweed_s3, "killed") < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # inside round 3
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= latest_round(prefix, seaweed_s3, "killed") < ROUNDS
    resumed = cli("resume", "killed", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert weights_hash(final_state(seaweed_s3.storage(prefix=prefix), "killed").weights) == reference
    rows = placement(cli.home, "killed")
    assert all(r["worker"] == OWNER[int(r["client"])] for r in rows), rows
    assert {int(r["round"]) for r in rows} == set(range(1, ROUNDS + 1))


def test_a_worker_killed_mid_run_leaves_its_client_out_and_the_run_goes_on(
    cluster: Cluster, tmp_path: Path, base_env: dict[str, str], seaweed_s3: S3Server
) -> None:
    """The last test of the module: it kills w2, the only worker of client 3."""
    cli, prefix = flow_cli(tmp_path, base_env, seaweed_s3)
    rounds = 6
    args = [a.replace(f"schedule.num_rounds={ROUNDS}", f"schedule.num_rounds={rounds}")
            for a in run_args(cluster, "lossy")]
    proc = cli.popen(*args)
    deadline = time.monotonic() + 400
    while latest_round(prefix, seaweed_s3, "lossy") < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    stop(cluster.workers["w2"], signal.SIGKILL)
    killed_after = latest_round(prefix, seaweed_s3, "lossy")
    assert proc.wait(600) == 0
    sampled = {r: sample_clients(4, 3, preset("tiny", OVERRIDES).seed, r) for r in range(1, rounds + 1)}
    rows = placement(cli.home, "lossy")
    done = {(int(r["round"]), int(r["client"])) for r in rows}
    later = [r for r in range(killed_after + 2, rounds + 1) if 3 in sampled[r]]
    assert later, "client 3 must be sampled after its worker is gone"
    for r in later:  # its rounds aggregate the other two clients
        assert (r, 3) not in done and {(r, c) for c in sampled[r] if c != 3} <= done
    client = MlflowClient(f"sqlite:///{cli.home / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fedprune").experiment_id],
                                "tags.`fedprune.run_id` = 'lossy'")
    table = Path(client.download_artifacts(run.info.run_id, "participation.csv")).read_text()
    for r in later:
        assert f"{r},3,left_out," in table
    assert "no worker serves" in table


@pytest.mark.parametrize(("args", "message"), [
    (("worker", "--scheduler", "tcp://10.0.0.5:8786", "--clients", "0"), "is plain TCP to a non-loopback host"),
    (("worker", "--scheduler", "tcp://127.0.0.1:1", "--clients", "0-4", "--corpus", "test"),
     "names 4, but the data has clients 0-3"),
    (("worker", "--scheduler", "tls://10.0.0.5:8786", "--clients", "0"), "DASK_DISTRIBUTED__COMM__TLS__WORKER__CERT"),
    (("run", "--preset", "toy", "--task-runner", "dask", "--dask-address", "10.0.0.5:8786"),
     "is plain TCP to a non-loopback host"),
    (("run", "--preset", "toy", "--dask-address", "tcp://127.0.0.1:1"), "needs task_runner='dask'"),
])
def test_bad_cluster_input_exits_2_naming_the_rule(cli: Cli, args: tuple[str, ...], message: str) -> None:
    done = cli(*args)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr
