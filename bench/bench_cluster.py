"""Clients on a Dask cluster against the thread task runner: per-round time of the same rounds.

A loopback cluster of three `fedprune worker` processes (one thread each, each its own
FEDPRUNE_HOME holding only its clients) runs the client-train tasks; the server's steps stay in
the flow's process, payloads and updates go through the run's storage. The same rounds run with
the thread task runner (everything in one process, work objects in memory). Per-round time is
taken from when each round logged its metrics, from round 2 to the last (start-up left out). Workloads: `toy` with 8
clients a round, and `tiny` (the speech Conformer-Transducer) with its preset's 2 clients a round
and with all 4 of its corpus's clients.
Target at `tiny`: cluster / threads <= 1.2.

    .venv/bin/python bench/bench_cluster.py
    .venv/bin/python bench/bench_cluster.py --rounds 16 --toy-rounds 25

Runs against the local Prefect server (started on demand as the CLI does, stopped after if it
started it); runs, tracking and storage go to a scratch folder (FEDPRUNE_STORAGE_URL, e.g. the
stack's S3, to measure through S3), the speech corpus cache of the flow's process is the CLI's.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from infra.settings import apply_quiet_defaults

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
apply_quiet_defaults(os.environ)  # as the CLI runs flows
_SCRATCH = Path(tempfile.mkdtemp(prefix="fedprune-bench-cluster-"))
os.environ.setdefault("FEDPRUNE_STORAGE_URL", (_SCRATCH / "storage").as_uri())
os.environ.setdefault("FEDPRUNE_TRACKING_URI", f"sqlite:///{_SCRATCH}/mlflow.db")
ROOT = Path(__file__).resolve().parents[1]
WORKERS = {"toy": ("0-2", "3-5", "6-7"), "tiny": ("0-1", "2", "3")}
CORPUS = {"toy": None, "tiny": "test"}


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def loopback_cluster(workload: str, port: int) -> Iterator[str]:
    """A `dask scheduler` and three `fedprune worker`s on 127.0.0.1; yields the scheduler's address."""
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    base = Path(tempfile.mkdtemp(prefix=f"cluster-{workload}-", dir=_SCRATCH))
    procs = [_start([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port",
                     str(port), "--no-dashboard"], env, base / "scheduler.log")]
    try:
        for i, clients in enumerate(WORKERS[workload]):
            argv = [sys.executable, "-m", "flows.cli", "worker", "--scheduler", address, "--clients", clients,
                    "--name", f"w{i}", "--nthreads", "1"]
            corpus = CORPUS[workload]
            procs.append(_start(argv + (["--corpus", corpus] if corpus else []),
                                {**env, "FEDPRUNE_HOME": str(base / f"w{i}")}, base / f"w{i}.log"))
        _wait_served(address, 8 if workload == "toy" else 4)
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _wait_served(address: str, clients: int) -> None:
    from infra.cluster import check_served, connect, served_clients
    from infra.errors import ClusterError

    deadline = time.monotonic() + 300
    while True:
        try:
            with connect(address, 5) as client:
                check_served(served_clients(client), clients, address)
            return
        except ClusterError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flow_run(preset: str, overrides: dict[str, Any], tag: str, address: str | None) -> dict[str, Any]:
    """One run of the experiment flow (the cluster's task runner when `address` is given)."""
    from flows.experiment import experiment

    options: dict[str, Any] = {"task_runner": "dask", "dask_address": address} if address else {}
    result: dict[str, Any] = experiment(preset=preset, overrides=overrides,
                                        run_id=f"bench-{tag}-{int(time.time() * 1000)}", rounds_per_segment=100,
                                        checkpoint_every=10, **options)
    return result


def _now(_: int) -> float:
    return time.time()


def task_latency(address: str, tasks: int = 12) -> tuple[float, float]:
    """Median seconds from submitting a task to having its result, one at a time on a warm cluster:
    a no-op Prefect task placed on a client's worker through prefect-dask, and a plain Dask task."""
    from prefect import flow, task
    from prefect.context import FlowRunContext
    from prefect_dask import DaskTaskRunner

    from infra.cluster import placed_on
    from tasks.options import NO_PERSIST

    noop = task(name="noop", **NO_PERSIST)(_now)

    @flow(name="bench-task-latency", task_runner=DaskTaskRunner(address=address))
    def latencies() -> tuple[float, float]:
        prefect_s, dask_s = [], []
        client = FlowRunContext.get().task_runner.client  # type: ignore[union-attr]
        for i in range(tasks):
            start = time.perf_counter()
            with placed_on([i % 8]):
                noop.submit(i).result()
            prefect_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            client.submit(_now, i, pure=False).result()
            dask_s.append(time.perf_counter() - start)
        return statistics.median(prefect_s[2:]), statistics.median(dask_s[2:])

    return latencies()


def per_round(preset: str, overrides: Any, rounds: int, tag: str, address: str | None) -> float:
    """Seconds a round: from the time each round logged its metrics, between round 2 and the last
    (the first round's warm-up and the run's start and end left out; checkpoints included)."""
    from mlflow.tracking import MlflowClient

    from infra.settings import Settings

    run = flow_run(preset, overrides(rounds), tag, address)
    history = MlflowClient(Settings().tracking_uri).get_metric_history(run["mlflow_run_id"], "train_loss")
    logged = {m.step: m.timestamp / 1000 for m in history}
    seconds = (logged[rounds] - logged[2]) / (rounds - 2)
    print(f"  {tag}: rounds 2-{rounds} in {logged[rounds] - logged[2]:.2f} s -> {seconds:.3f} s/round", flush=True)
    return seconds


def schedule(clients_per_round: int | None) -> Any:
    def overrides(rounds: int) -> dict[str, Any]:
        federated: dict[str, Any] = {"eval_every": 10_000}
        if clients_per_round:
            federated["clients_per_round"] = clients_per_round
        return {"schedule": {"num_rounds": rounds, "sparsify_rounds": 1, "refine_rounds": 1, "refine_every": 1},
                "federated": federated}

    return overrides


def run_benchmarks(args: argparse.Namespace) -> None:
    rows = []
    latency = None
    cases = (("toy", 8, args.toy_rounds, None), ("tiny", None, args.rounds, 1.2), ("tiny", 4, args.rounds, 1.2))
    for workload, clients, rounds, target in cases:
        overrides = schedule(clients)
        flow_run(workload, overrides(2), f"{workload}-threads-warm-up", None)  # imports, data, MLflow tables
        threads = per_round(workload, overrides, rounds, f"{workload}-threads", None)
        with loopback_cluster(workload, _free_port()) as address:
            flow_run(workload, overrides(2), f"{workload}-cluster-warm-up", address)  # workers import and load
            cluster = per_round(workload, overrides, rounds, f"{workload}-cluster", address)
            if latency is None:
                latency = task_latency(address)
        label = f"{workload}, {clients or 'preset'} clients a round"
        rows.append((label, f"{threads:.3f}", f"{cluster:.3f}", f"{cluster / threads:.2f}",
                     f"<= {target}" if target else "-"))
    print("\n| workload | threads s/round | cluster (3 workers) s/round | cluster / threads | target |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if latency is not None:
        print(f"\nOne task, submitted to its result on the warm cluster (median): a no-op Prefect task placed on a "
              f"client's worker {latency[0] * 1000:.0f} ms, a plain Dask task {latency[1] * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=16, help="tiny: rounds of each run")
    parser.add_argument("--toy-rounds", type=int, default=25, help="toy: rounds of each run")
    args = parser.parse_args()

    from infra.prefect_api import prefect_api_for_script
    from infra.settings import Settings

    with prefect_api_for_script(Settings()) as url:
        print(f"Prefect API: {url}", flush=True)
        run_benchmarks(args)


if __name__ == "__main__":
    main()
