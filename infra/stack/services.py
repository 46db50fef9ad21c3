"""The services of the local stack: Prefect server + UI on PostgreSQL, MLflow server + UI,
SeaweedFS S3, a Prefect worker, all on 127.0.0.1; and the stack's commands (`stack_up`, `stack_status`,
`stack_down`) and environment (`stack_env`, `write_stack_env`).

The builders (`prefect_spec`, `mlflow_spec`, `seaweed_spec`) also make the throwaway servers of
the integration tests; `infra.stack.process` runs them. `stack_up` is idempotent (running services
are left alone) and waits until each service answers its health URL. When this home's Prefect
port was taken by a process that is not a Prefect server, the free port its server was started on
instead is remembered in ``<home>/stack/prefect.port.json`` (`local_prefect_port`), so later runs,
`stack status` and `stack_env` find that server.

SeaweedFS runs as ``weed mini`` (master, volume, filer and S3 in one process) bound to loopback,
with WebDAV, Iceberg and Lance off and telemetry off. It opens the S3, master, volume, filer and
admin ports given, and each of them + 10000 for gRPC. Its S3 API accepts the credentials in
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of its environment.

MLflow's server runs with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: its background job runner
(a Huey worker pool used by GenAI features) is not needed for tracking and costs ~8 processes.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from infra.errors import StackError
from infra.prefect_server import SERVER_ENV
from infra.settings import LOOPBACK, Settings
from infra.stack.postgres import connection_url, ensure_database, init_data, postgres_spec
from infra.stack.process import (
    ServiceSpec,
    ServiceStatus,
    _http_ok,
    fingerprint,
    running_or_started,
    service_status,
    started_as,
    stop_service,
    wait_healthy,
)
from infra.storage import S3Storage, check_reachable, make_s3_client

GRPC_OFFSET = 10000


@dataclass(frozen=True)
class SeaweedPorts:
    """HTTP ports of ``weed mini``; each also binds port + 10000 for gRPC."""

    s3: int = 8333
    master: int = 9333
    volume: int = 9340
    filer: int = 8888
    admin: int = 23646

    def __post_init__(self) -> None:
        for name, port in self.named().items():
            if not 1 <= port <= 65535 - GRPC_OFFSET:
                raise ValueError(
                    f"seaweed {name} port={port} must be in [1, {65535 - GRPC_OFFSET}] because weed also "
                    f"binds port + {GRPC_OFFSET} for gRPC: pick a lower port"
                )
        if len(set(self.all())) != len(self.all()):
            raise ValueError(
                f"seaweed ports {self.named()} must all differ (gRPC ports included): pick others"
            )

    def named(self) -> dict[str, int]:
        """HTTP ports by component."""
        return {
            "s3": self.s3,
            "master": self.master,
            "volume": self.volume,
            "filer": self.filer,
            "admin": self.admin,
        }

    def all(self) -> tuple[int, ...]:
        """Every port weed binds: HTTP and gRPC."""
        http = tuple(self.named().values())
        return http + tuple(port + GRPC_OFFSET for port in http)


# --------------------------------------------------------------------------- command lines


def _venv_tool(name: str) -> str:
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        raise StackError(
            f"executable {name!r} not found next to {sys.executable} nor on PATH: the local stack needs it; "
            "install the project environment (make setup)"
        )
    return found


def prefect_spec(prefect_home: Path, port: int, host: str = LOOPBACK, database_url: str | None = None) -> ServiceSpec:
    """Prefect server + UI; its database is SQLite under `prefect_home`, or `database_url`.

    Started through `infra.prefect_server`: `prefect server start` with batched task-run
    recording, no stored events, and SQLite write transactions that wait for the lock instead of
    failing (see there).

    Args:
        prefect_home: PREFECT_HOME of the server (settings; the SQLite database when no `database_url`).
        port: API and UI port; the API is at ``http://host:port/api``.
        host: interface to bind (loopback by default).
        database_url: e.g. the stack's PostgreSQL (`infra.stack.postgres.connection_url`; holds a password).
    """
    env = {
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "true",
        "PREFECT_UI_API_URL": f"http://{host}:{port}/api",  # else the UI asks the API on the default port
        **SERVER_ENV,
    }
    redact: tuple[str, ...] = ()
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        redact = (database_url, urlsplit(database_url).password or "")
    argv = (sys.executable, "-m", "infra.prefect_server", "server", "start", "--host", host, "--port", str(port))
    url = f"http://{host}:{port}"
    return ServiceSpec("prefect", argv, env, url, f"{url}/api/health", prefect_home, (port,), redact)


def mlflow_spec(
    workdir: Path,
    port: int,
    backend_store_uri: str,
    artifacts_destination: str,
    s3_endpoint_url: str | None = None,
    aws_credentials: tuple[str, str] | None = None,
    workers: int = 1,
    host: str = LOOPBACK,
) -> ServiceSpec:
    """MLflow tracking server + UI that proxies artifacts to `artifacts_destination`.

    Args:
        workdir: working directory (logs of the server itself go to the service log).
        port: HTTP port.
        backend_store_uri: e.g. ``sqlite:////abs/mlflow.db``.
        artifacts_destination: a local directory or ``s3://bucket/`` URI.
        s3_endpoint_url: S3 endpoint for an s3 destination (sets MLFLOW_S3_ENDPOINT_URL).
        aws_credentials: (access key id, secret) for the S3 destination.
        workers: uvicorn worker processes.
        host: interface to bind.
    """
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if s3_endpoint_url:
        env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint_url
        env["AWS_DEFAULT_REGION"] = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    if aws_credentials:
        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = aws_credentials
    argv = (
        _venv_tool("mlflow"), "server", "--host", host, "--port", str(port), "--workers", str(workers),
        "--backend-store-uri", backend_store_uri, "--artifacts-destination", artifacts_destination,
    )  # fmt: skip
    url = f"http://{host}:{port}"
    redact = (aws_credentials[1],) if aws_credentials else ()
    return ServiceSpec("mlflow", argv, env, url, f"{url}/health", workdir, (port,), redact)


def seaweed_spec(
    data_dir: Path,
    ports: SeaweedPorts,
    aws_credentials: tuple[str, str],
    buckets: Sequence[str] = (),
    host: str = LOOPBACK,
) -> ServiceSpec:
    """SeaweedFS ``weed mini`` serving S3 on ``ports.s3``, data under `data_dir`.

    Args:
        data_dir: volume and metadata directory.
        ports: the HTTP ports of its components (gRPC = + 10000).
        aws_credentials: (access key id, secret) the S3 API accepts.
        buckets: buckets created at startup.
        host: interface to bind and advertise.
    """
    argv = [
        _venv_tool("weed"), "mini", f"-dir={data_dir}", f"-ip={host}", f"-ip.bind={host}",
        f"-s3.port={ports.s3}", f"-master.port={ports.master}", f"-volume.port={ports.volume}",
        f"-filer.port={ports.filer}", f"-admin.port={ports.admin}", "-admin.ui=false", "-webdav=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
    ]  # fmt: skip
    if buckets:
        argv.append(f"-bucket={','.join(buckets)}")
    access_key_id, secret = aws_credentials
    env = {"AWS_ACCESS_KEY_ID": access_key_id, "AWS_SECRET_ACCESS_KEY": secret}
    url = f"http://{host}:{ports.s3}"
    return ServiceSpec("seaweed", tuple(argv), env, url, f"{url}/healthz", data_dir, ports.all(), (secret,))


def answers_as_prefect(url: str) -> bool:
    """Whether a Prefect server answers at `url` (``http://host:port``): its health endpoint says ``true``."""
    return _http_ok(f"{url}/api/health", timeout_s=2.0, body=b"true")


# --------------------------------------------------------------------------- the stack


def _credentials(settings: Settings) -> tuple[str, str]:
    return settings.aws_access_key_id, settings.aws_secret_access_key.get_secret_value()


def seaweed_ports(settings: Settings) -> SeaweedPorts:
    """The stack's SeaweedFS ports from `settings`."""
    return SeaweedPorts(
        s3=settings.s3_port,
        master=settings.seaweed_master_port,
        volume=settings.seaweed_volume_port,
        filer=settings.seaweed_filer_port,
        admin=settings.seaweed_admin_port,
    )


def stack_specs(settings: Settings) -> dict[str, ServiceSpec]:
    """The services of the local stack, in start order: seaweed, postgres, mlflow, prefect, worker."""
    stack = settings.stack_dir
    s3_url = f"http://{LOOPBACK}:{settings.s3_port}"
    buckets = (settings.stack_bucket, settings.mlflow_artifacts_bucket)
    return {
        "seaweed": seaweed_spec(stack / "seaweed", seaweed_ports(settings), _credentials(settings), buckets),
        "postgres": postgres_spec(stack, settings.postgres_port),
        "mlflow": mlflow_spec(
            stack,
            settings.mlflow_port,
            f"sqlite:///{stack / 'mlflow.db'}",
            f"s3://{settings.mlflow_artifacts_bucket}/",
            s3_endpoint_url=s3_url,
            aws_credentials=_credentials(settings),
            workers=2,
        ),
        "prefect": prefect_spec(settings.home / "prefect", local_prefect_port(settings),
                                database_url=connection_url(stack, settings.postgres_port)),
        "worker": worker_spec(settings),
    }


WORK_POOL = "fedprune-process"
REPO_DIR = Path(__file__).resolve().parents[2]


def worker_spec(settings: Settings) -> ServiceSpec:
    """A Prefect process worker on the `fedprune-process` pool, pointed at the whole stack.

    It runs deployments from this checkout (prefect.yaml's pull step reads FEDPRUNE_REPO_DIR)
    with the stack's S3 storage and MLflow server.
    """
    env = {
        **stack_env(settings),
        "PREFECT_HOME": str(settings.home / "prefect"),
        "PREFECT_WORKER_WEBSERVER_HOST": LOOPBACK,
        "PREFECT_WORKER_WEBSERVER_PORT": str(settings.worker_port),
        "FEDPRUNE_REPO_DIR": str(REPO_DIR),
    }
    argv = (_venv_tool("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process", "--with-healthcheck")
    url = f"http://{LOOPBACK}:{settings.worker_port}"
    _, secret = _credentials(settings)
    return ServiceSpec("worker", argv, env, url, f"{url}/health", REPO_DIR, (settings.worker_port,), (secret,))


def stack_status(settings: Settings) -> dict[str, ServiceStatus]:
    """Status of each stack service, by name."""
    return {name: service_status(spec, settings.stack_dir) for name, spec in stack_specs(settings).items()}


def stack_up(settings: Settings, timeout_s: float = 120.0) -> dict[str, ServiceStatus]:
    """Start the services that are not running, wait until all answer, create the S3 buckets.

    Idempotent: services already running are left alone, except the CLI's on-demand Prefect server
    (on SQLite, `infra.prefect_api`), which is stopped and replaced by the stack's, on PostgreSQL.
    On failure the services that did start keep running (see `stack_status`; `stack_down` stops
    them).

    Raises:
        StackError: a port is taken, or a service exits or does not answer (names its log file).
    """
    run_dir = settings.stack_dir
    specs = stack_specs(settings)
    init_data(run_dir / "postgres", run_dir)
    if started_as(run_dir, "prefect") not in (None, fingerprint(specs["prefect"])):
        stop_service(run_dir, "prefect")  # the CLI's on-demand server (SQLite): the stack's runs on PostgreSQL
    pids = {"postgres": running_or_started(specs["postgres"], run_dir)}
    wait_healthy(specs["postgres"], pids["postgres"], run_dir, timeout_s)  # Prefect needs its database first
    ensure_database(run_dir, settings.postgres_port)
    pids |= {name: running_or_started(spec, run_dir) for name, spec in specs.items() if name != "postgres"}
    for name, spec in specs.items():
        wait_healthy(spec, pids[name], run_dir, timeout_s)
    _ensure_buckets(settings)
    return stack_status(settings)


PREFECT_PORT_FILE = "prefect.port.json"
"""In the stack dir: {"configured": FEDPRUNE_PREFECT_PORT, "port": the port this home's server uses instead}."""


def local_prefect_port(settings: Settings) -> int:
    """The port of this home's Prefect server: `settings.prefect_port`, or the one remembered for it.

    A port is remembered (`remember_prefect_port`) when the configured one was taken by something
    that is not a Prefect server; it applies while FEDPRUNE_PREFECT_PORT stays what it was then.
    """
    try:
        record = json.loads((settings.stack_dir / PREFECT_PORT_FILE).read_text())
    except (OSError, ValueError):
        return settings.prefect_port
    if not isinstance(record, dict) or record.get("configured") != settings.prefect_port:
        return settings.prefect_port
    port = record.get("port")
    return port if isinstance(port, int) and 1 <= port <= 65535 else settings.prefect_port


def remember_prefect_port(settings: Settings, port: int) -> Path:
    """Record that this home's Prefect server uses `port` instead of `settings.prefect_port`; returns the file."""
    path = settings.stack_dir / PREFECT_PORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"configured": settings.prefect_port, "port": port}) + "\n")
    return path


def _ensure_buckets(settings: Settings) -> None:
    access_key_id, secret = _credentials(settings)
    client = make_s3_client(
        f"http://{LOOPBACK}:{settings.s3_port}", access_key_id=access_key_id, secret_access_key=secret
    )
    for bucket in (settings.stack_bucket, settings.mlflow_artifacts_bucket):
        check_reachable(S3Storage(bucket, client=client), create_bucket=True)


def stack_down(settings: Settings, timeout_s: float = 20.0) -> list[str]:
    """Stop the stack's services (prefect, mlflow, then seaweed); return the names stopped."""
    order: list[str] = list(reversed(stack_specs(settings)))
    return [name for name in order if stop_service(settings.stack_dir, name, timeout_s)]


def stack_env(settings: Settings) -> dict[str, str]:
    """Variables a user exports to run FedPrune against the local stack.

    Contains AWS_SECRET_ACCESS_KEY (the stack's S3 secret): never print or log the result.
    """
    access_key_id, secret = _credentials(settings)
    prefect_api = f"http://{LOOPBACK}:{local_prefect_port(settings)}/api"
    return {
        "FEDPRUNE_HOME": str(settings.home),
        "FEDPRUNE_STORAGE_URL": f"s3://{settings.stack_bucket}",
        "FEDPRUNE_S3_ENDPOINT_URL": f"http://{LOOPBACK}:{settings.s3_port}",
        "FEDPRUNE_TRACKING_URI": f"http://{LOOPBACK}:{settings.mlflow_port}",
        "FEDPRUNE_PREFECT_API_URL": prefect_api,
        "PREFECT_API_URL": prefect_api,
        "AWS_ACCESS_KEY_ID": access_key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
    }


def write_stack_env(settings: Settings, path: Path | None = None) -> Path:
    """Write `stack_env` as ``export K=V`` lines (mode 0600; default ``<home>/stack/env``).

    Returns:
        The file's path; a user runs ``source <path>``.
    """
    target = path or settings.stack_dir / "env"
    target.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"export {key}={shlex.quote(value)}" for key, value in stack_env(settings).items()]
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.chmod(target, 0o600)
    return target


def describe(statuses: Mapping[str, ServiceStatus]) -> dict[str, dict[str, Any]]:
    """Plain dicts of statuses, e.g. for JSON output: name -> {running, healthy, pid, url, log}."""
    return {
        name: {"running": s.running, "healthy": s.healthy, "pid": s.pid, "url": s.url, "log": str(s.log_path)}
        for name, s in statuses.items()
    }
