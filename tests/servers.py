"""Real throwaway servers for integration tests: SeaweedFS S3 and MLflow on loopback, free ports.

They are started with the same command-line builders and process runners as the local stack
(`infra.stack`), in temporary directories, and stopped (process group, SIGTERM then SIGKILL) when
the context exits. If the test process dies, Linux sends them SIGTERM (PR_SET_PDEATHSIG).

The ``restartable_*`` helpers also yield a `Restartable`, which a test stops (SIGTERM, or SIGKILL
for a crash) and starts again on the same ports and data directory; `Outage` does that from a
thread once a run reaches a given point, so the outage lands mid-run.
"""

from __future__ import annotations

import functools
import os
import random
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.settings import LOOPBACK
from infra.stack import (
    GRPC_OFFSET,
    SeaweedPorts,
    ServiceSpec,
    check_ports_free,
    mlflow_spec,
    prefect_spec,
    read_pid,
    seaweed_spec,
    start_service,
    stop_service,
    wait_healthy,
)
from infra.storage import S3Storage, make_s3_client

_PORT_RANGE = (10000, 22000)  # + GRPC_OFFSET stays below Linux's ephemeral range (32768+)
_taken: set[int] = set()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port(with_grpc: bool = False) -> int:
    """A free loopback port not handed out before in this process (and port + 10000 if `with_grpc`)."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(*_PORT_RANGE)
        wanted = (port, port + GRPC_OFFSET) if with_grpc else (port,)
        if not _taken.intersection(wanted) and all(_port_is_free(p) for p in wanted):
            _taken.update(wanted)
            return port
    raise RuntimeError(f"no free port pair found in {_PORT_RANGE}: free some loopback ports and rerun")


def free_seaweed_ports() -> SeaweedPorts:
    """Five free HTTP ports for ``weed mini``, each with its gRPC port (+ 10000) free too."""
    return SeaweedPorts(*(free_port(with_grpc=True) for _ in range(5)))


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint and the credentials it accepts (the secret is not in repr)."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    bucket: str
    region: str = "us-east-1"

    @functools.cached_property
    def client(self) -> Any:
        """A boto3 S3 client for this server (built once; boto3 clients are thread-safe)."""
        return make_s3_client(
            self.endpoint_url,
            self.region,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
        )

    def storage(self, prefix: str = "") -> S3Storage:
        """An `S3Storage` on this server's bucket under `prefix`."""
        return S3Storage(self.bucket, prefix, endpoint_url=self.endpoint_url, client=self.client)

    def env(self) -> dict[str, str]:
        """Variables that point boto3 and FedPrune settings at this server (includes the secret)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "FEDPRUNE_S3_ENDPOINT_URL": self.endpoint_url,
            "FEDPRUNE_STORAGE_URL": f"s3://{self.bucket}",
        }


@dataclass(frozen=True)
class MlflowServer:
    """A running MLflow tracking server (SQLite backend, artifacts in a local directory)."""

    tracking_uri: str
    artifacts_dir: Path
    log_path: Path


@dataclass(frozen=True)
class Restartable:
    """A service that a test stops and starts again: same command, ports and data directory."""

    spec: ServiceSpec
    run_dir: Path
    timeout_s: float = 60.0

    def start(self) -> None:
        """Start it and wait until it answers its health URL.

        Linux sends the parent-death signal when the starting *thread* ends, so a service started
        from another thread (`Outage`) goes without it; `restartable` still stops it on exit.
        """
        check_ports_free(self.spec)
        main = threading.current_thread() is threading.main_thread()
        pid = start_service(self.spec, self.run_dir, die_with_parent=main)
        wait_healthy(self.spec, pid, self.run_dir, self.timeout_s)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop it: SIGTERM, a clean shutdown (SIGKILL after 20 s), or SIGKILL at once, a crash."""
        pid = read_pid(self.run_dir, self.spec.name)
        if pid is not None and sig == signal.SIGKILL:
            os.killpg(pid, signal.SIGKILL)
        stop_service(self.run_dir, self.spec.name)


@contextmanager
def restartable(spec: ServiceSpec, run_dir: Path, timeout_s: float = 60.0) -> Iterator[Restartable]:
    """Start `spec` as a `Restartable`; stop it, whatever state the test left it in, on exit."""
    service = Restartable(spec, run_dir, timeout_s)
    service.start()
    try:
        yield service
    finally:
        stop_service(run_dir, spec.name)


@contextmanager
def running_service(spec: ServiceSpec, run_dir: Path, timeout_s: float = 60.0) -> Iterator[int]:
    """Start `spec`, wait until it answers, yield its pid; stop it on exit."""
    with restartable(spec, run_dir, timeout_s):
        pid = read_pid(run_dir, spec.name)
        assert pid is not None, f"{spec.name} answered but its pid file names no live process"
        yield pid


class Outage(threading.Thread):
    """Once `ready()` holds, stops `service`, keeps it down `down_s` seconds, then starts it again.

    Runs in a thread next to the run under test; `join` re-raises what went wrong in it (e.g. the
    run finished before `ready()` ever held). `down_at` and `back_at` are ``time.monotonic()``
    readings: when it was stopped and when it answered again.
    """

    def __init__(self, service: Restartable, ready: Callable[[], bool], down_s: float,
                 sig: signal.Signals = signal.SIGTERM, timeout_s: float = 300.0) -> None:
        super().__init__(daemon=True, name=f"outage-{service.spec.name}")
        self.service, self.ready, self.down_s, self.sig, self.timeout_s = service, ready, down_s, sig, timeout_s
        self.down_at = self.back_at = float("nan")
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + self.timeout_s
            while not self.ready():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the outage of {self.service.spec.name} never began: ready() stayed False")
                time.sleep(0.05)
            self.down_at = time.monotonic()
            self.service.stop(self.sig)
            time.sleep(self.down_s)
            self.service.start()
            self.back_at = time.monotonic()
        except BaseException as error:  # handed to the test thread by join()
            self.error = error

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error

    @property
    def seconds_down(self) -> float:
        """From the stop until the service answered again."""
        return self.back_at - self.down_at


@contextmanager
def restartable_seaweed(base: Path, bucket: str = "fedprune-test") -> Iterator[tuple[S3Server, Restartable]]:
    """A ``weed mini`` S3 server under `base` with fresh random credentials and `bucket` created."""
    ports = free_seaweed_ports()
    server = S3Server(f"http://{LOOPBACK}:{ports.s3}", "fedprune-test", secrets.token_hex(16), bucket)
    spec = seaweed_spec(base / "data", ports, (server.access_key_id, server.secret_access_key), (bucket,))
    with restartable(spec, base) as service:
        server.storage().ensure_bucket()
        yield server, service


@contextmanager
def running_seaweed(base: Path, bucket: str = "fedprune-test") -> Iterator[S3Server]:
    """A ``weed mini`` S3 server under `base` with fresh random credentials and `bucket` created."""
    with restartable_seaweed(base, bucket) as (server, _):
        yield server


@contextmanager
def restartable_mlflow(base: Path) -> Iterator[tuple[MlflowServer, Restartable]]:
    """An ``mlflow server`` under `base`: SQLite backend, artifacts in ``base/artifacts``, 1 worker."""
    port = free_port()
    artifacts = base / "artifacts"
    spec = mlflow_spec(base, port, f"sqlite:///{base / 'mlflow.db'}", str(artifacts), workers=1)
    with restartable(spec, base) as service:
        yield MlflowServer(spec.url, artifacts, base / "mlflow.log"), service


@contextmanager
def running_mlflow(base: Path) -> Iterator[MlflowServer]:
    """An ``mlflow server`` under `base`: SQLite backend, artifacts in ``base/artifacts``, 1 worker."""
    with restartable_mlflow(base) as (server, _):
        yield server


@contextmanager
def restartable_prefect(base: Path) -> Iterator[tuple[str, Restartable]]:
    """A `prefect server start` under `base` on a free port; yields its API URL and the service."""
    spec = prefect_spec(base / "home", free_port())
    with restartable(spec, base, timeout_s=120) as service:
        yield f"{spec.url}/api", service
