"""A real Dask cluster on loopback for flow tests: `dask scheduler` and `fedprune worker` processes.

Each process runs in its own session (killed by process group on exit) with its own log file; a
worker has its own FEDPRUNE_HOME. Nothing is mocked: the flow reaches the scheduler over TCP or
TLS, the workers hold their clients' data and read payloads from the test's S3 server.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.config
import distributed  # noqa: F401 - loads Dask's distributed defaults before `dask.config.set`
import pytest
import torch
from mlflow.tracking import MlflowClient

from fedprune_core.presets import preset
from fedprune_core.rng import sample_clients
from fedprune_core.simulate import simulate
from infra.checkpoint import CheckpointStore
from infra.cluster import connect, served_clients
from infra.errors import ClusterError
from infra.workloads import load
from tests.flows.conftest import Cli
from tests.flows.helpers import final_state, weights_hash
from tests.servers import S3Server, free_port

ROOT = Path(__file__).parents[2]


def start(argv: list[str], env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A process in its own session, output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(argv, env=dict(env), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal the process's group, then SIGKILL it if it has not gone in 10 s."""
    if proc.poll() is None:
        with _gone_ok():
            os.killpg(proc.pid, sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with _gone_ok():
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextmanager
def _gone_ok() -> Iterator[None]:
    try:
        yield
    except ProcessLookupError:
        pass


@dataclass
class Cluster:
    """A scheduler, its workers (name -> process) and their homes, sharing one base environment."""

    address: str
    base: Path
    env: dict[str, str]
    scheduler: subprocess.Popen[bytes]
    client_env: dict[str, str] = field(default_factory=dict)
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    clients: dict[str, str] = field(default_factory=dict)

    def home(self, name: str) -> Path:
        return self.base / name / "home"

    def log(self, name: str) -> Path:
        return self.base / name / "log.txt"

    def add_worker(self, name: str, clients: str, corpus: str | None = "test",
                   env: Mapping[str, str] | None = None, *extra: str) -> subprocess.Popen[bytes]:
        """Start `fedprune worker` NAME for CLIENTS with its own FEDPRUNE_HOME."""
        argv = [sys.executable, "-m", "flows.cli", "worker", "--scheduler", self.address, "--clients", clients,
                "--name", name, "--nthreads", "1", *extra]
        if corpus:
            argv += ["--corpus", corpus]
        proc = start(argv, {**self.env, **(env or {}), "FEDPRUNE_HOME": str(self.home(name))}, self.log(name))
        self.workers[name], self.clients[name] = proc, clients
        return proc

    def served(self, timeout_s: float = 5) -> dict[int, list[str]]:
        """Asked as a client of the cluster, with `client_env`'s Dask settings (its TLS certificate)."""
        with dask.config.set(dask_settings(self.client_env)), connect(self.address, timeout_s) as client:
            return served_clients(client)

    def wait_served(self, clients: set[int], timeout_s: float = 240) -> dict[int, list[str]]:
        """Wait until every client in `clients` has a worker (corpus synthesis included)."""
        deadline = time.monotonic() + timeout_s
        while True:
            served = self.served()
            if clients <= set(served):
                return served
            dead = {n: p.returncode for n, p in self.workers.items() if p.poll() is not None}
            if dead or time.monotonic() > deadline:
                logs = {n: self.log(n).read_text()[-2000:] for n in self.workers}
                raise AssertionError(f"clients {clients - set(served)} not served; exited: {dead}; logs: {logs}")
            time.sleep(0.5)

    def stop(self) -> None:
        for proc in self.workers.values():
            stop(proc)
        stop(self.scheduler)


def dask_settings(env: Mapping[str, str]) -> dict[str, object]:
    """The Dask configuration a process with the DASK_* variables of `env` reads, as dotted keys."""

    def flat(tree: Mapping[str, object], parent: str = "") -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in tree.items():
            name = f"{parent}.{key}" if parent else key
            out.update(flat(value, name) if isinstance(value, Mapping) else {name: value})
        return out

    return flat(dask.config.collect_env(dict(env)))


@contextmanager
def running_cluster(
    base: Path, env: Mapping[str, str], scheduler_env: Mapping[str, str] | None = None,
    client_env: Mapping[str, str] | None = None,
) -> Iterator[Cluster]:
    """A `dask scheduler` on a free loopback port, ``tls://`` when `scheduler_env` holds Dask's TLS
    settings (then `client_env` holds the test's own); workers are added with `Cluster.add_worker`."""
    port = free_port()
    tls = bool(scheduler_env)
    address = f"{'tls' if tls else 'tcp'}://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
            "--no-dashboard", *(["--protocol", "tls"] if tls else [])]
    scheduler = start(argv, {**env, **(scheduler_env or {})}, base / "scheduler" / "log.txt")
    cluster = Cluster(address, base, dict(env), scheduler, dict(client_env or {}))
    try:
        _wait_scheduler(cluster)
        yield cluster
    finally:
        cluster.stop()


def _wait_scheduler(cluster: Cluster, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cluster.served()
            return
        except ClusterError:
            if cluster.scheduler.poll() is not None or time.monotonic() > deadline:
                log = (cluster.base / "scheduler" / "log.txt").read_text()[-3000:]
                raise AssertionError(f"the scheduler did not start: {log}") from None
            time.sleep(0.3)


# --------------------------------------------------------------------------- the tests' run

ROUNDS = 4
OVERRIDES = {
    "schedule": {"num_rounds": ROUNDS, "sparsify_rounds": 2, "refine_rounds": 1},
    "federated": {"clients_per_round": 3, "min_clients": 2, "eval_every": 100, "local": {"steps": 1}},
}
SETS = ("--set", f"schedule.num_rounds={ROUNDS}", "--set", "schedule.sparsify_rounds=2", "--set",
        "schedule.refine_rounds=1", "--set", "federated.clients_per_round=3", "--set", "federated.min_clients=2",
        "--set", "federated.eval_every=100", "--set", "federated.local.steps=1")
WORKERS = {"w0": "0-1", "w1": "2", "w2": "3"}
OWNER = {0: "w0", 1: "w0", 2: "w1", 3: "w2"}
SAMPLED = {r: sample_clients(4, 3, preset("tiny", OVERRIDES).seed, r) for r in range(1, ROUNDS + 1)}


@pytest.fixture(scope="module")
def base_env(prefect_api: str, seaweed_s3: S3Server) -> dict[str, str]:
    """What every process of the tests gets: the Prefect API, this checkout, S3 credentials."""
    env = {**os.environ, **seaweed_s3.env(), "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(ROOT),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"}
    for key in ("FEDPRUNE_HOME", "FEDPRUNE_STORAGE_URL", "FEDPRUNE_TRACKING_URI"):
        env.pop(key, None)
    return env


def start_workers(cluster: Cluster, env: Mapping[str, str] | None = None) -> None:
    """The three workers of `WORKERS`, each with its own home and `env` (e.g. its TLS settings)."""
    for name, clients in WORKERS.items():
        cluster.add_worker(name, clients, "test", env)
    cluster.wait_served(set(OWNER))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`simulate`'s final weights for the same configuration, on the whole corpus in one process, with
    one torch thread like each worker process (Dask's nanny sets OMP_NUM_THREADS=1): torch's CPU
    kernels sum in an order that depends on their thread count."""
    config = preset("tiny", OVERRIDES)
    data = load(config.model, config.corpus, config.seed, str(tmp_path_factory.mktemp("reference")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return weights_hash(simulate(data.workload, data.clients, config).state.weights)
    finally:
        torch.set_num_threads(threads)


def flow_cli(tmp_path: Path, base_env: dict[str, str], seaweed_s3: S3Server) -> tuple[Cli, str]:
    """A `fedprune` runner with its own home (MLflow there) and a fresh S3 prefix; returns it and the prefix."""
    prefix = f"cluster-{uuid.uuid4().hex[:8]}"
    env = {**base_env, "FEDPRUNE_HOME": str(tmp_path / "home"),
           "FEDPRUNE_STORAGE_URL": f"s3://{seaweed_s3.bucket}/{prefix}"}
    return Cli(tmp_path / "home", env), prefix


def run_args(cluster: Cluster, run_id: str) -> tuple[str, ...]:
    return ("run", "--preset", "tiny", *SETS, "--run-id", run_id, "--task-runner", "dask", "--dask-address",
            cluster.address, "--checkpoint-every", "2", "--rounds-per-segment", "2")


def mlflow_run(home: Path, run_id: str) -> tuple[MlflowClient, Any]:
    """The MLflow client of a flow's home and the run of `run_id`."""
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fedprune").experiment_id],
                                f"tags.`fedprune.run_id` = '{run_id}'")
    return client, run


def placement(home: Path, run_id: str) -> list[dict[str, str]]:
    """The run's placement.csv rows."""
    client, run = mlflow_run(home, run_id)
    return list(csv.DictReader(io.StringIO(Path(client.download_artifacts(run.info.run_id, "placement.csv"))
                                           .read_text())))


def speakers_on_disk(home: Path) -> dict[str, set[str]]:
    """Split -> the speaker folders under the home's corpus."""
    (root,) = [p.parent for p in (home / "data").glob("*/index.json")]
    return {split.name: {p.name for p in split.iterdir()} for split in root.iterdir() if split.is_dir()}


def latest_round(storage_prefix: str, seaweed_s3: S3Server, run_id: str) -> int:
    try:
        return CheckpointStore(seaweed_s3.storage(prefix=storage_prefix), "fedprune", run_id).latest_round() or 0
    except Exception:  # noqa: BLE001 - not created yet
        return -1


def check_run_on_cluster(cluster: Cluster, cli: Cli, prefix: str, run_id: str, reference: str,
                         seaweed_s3: S3Server) -> subprocess.CompletedProcess[str]:
    """Run the tests' configuration on `cluster`: it must end at `simulate`'s weights, every client
    trained on its own worker, and the bytes of each task's objects must match the bytes metrics.
    Returns the finished `fedprune run`."""
    done = cli(*run_args(cluster, run_id), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = final_state(seaweed_s3.storage(prefix=prefix), run_id)
    assert state.round_num == ROUNDS
    assert weights_hash(state.weights) == reference, done.stderr[-5000:]

    rows = placement(cli.home, run_id)
    assert {(int(r["round"]), int(r["client"])) for r in rows} == {(r, c) for r, s in SAMPLED.items() for c in s}
    assert all(r["worker"] == OWNER[int(r["client"])] for r in rows), rows
    # What crossed: each client read its payload object and wrote its update object, whose tensor
    # bytes are the bytes_down / bytes_up metrics; the rest is the safetensors header.
    for r in rows:
        assert 0 < int(r["bytes_read"]) - int(r["bytes_down"]) <= 16384, r
        assert 0 < int(r["bytes_written"]) - int(r["bytes_up"]) <= 16384, r
    mlflow, run = mlflow_run(cli.home, run_id)
    down = {m.step: m.value for m in mlflow.get_metric_history(run.info.run_id, "bytes_down")}
    assert down == {r: float(sum(int(x["bytes_down"]) for x in rows if int(x["round"]) == r)) for r in SAMPLED}
    return done
