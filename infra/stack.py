"""The local service stack: Prefect server + UI, MLflow server + UI, SeaweedFS S3, all on 127.0.0.1.

Each service is a background process in its own session, with a pid file and a log file under
``<home>/stack/``. `stack_up` is idempotent (running services are left alone) and waits until each
service answers its health URL; `stack_down` stops them; `stack_status` reports them. The same
builders (`prefect_spec`, `mlflow_spec`, `seaweed_spec`) and runners (`start_service`,
`wait_healthy`, `stop_service`) start the throwaway servers of the integration tests.
`running_or_started` (the stack) and `infra.prefect_api` (the CLI's on-demand Prefect server)
hold an exclusive lock on ``<name>.lock`` (`service_lock`) while they read the pid file and
start, so two runs launched at once start one server and both use it. When this home's Prefect
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

import ctypes
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.errors import StackError
from infra.prefect_server import RECORDING_ENV
from infra.settings import LOOPBACK, Settings, child_env
from infra.storage import S3Storage, check_reachable, make_s3_client

GRPC_OFFSET = 10000
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one service.

    Attributes:
        name: short name, used for the pid and log file names (e.g. "mlflow").
        argv: the command line.
        env: variables set on top of this process's environment (may hold secrets: not in repr).
        url: what a user opens (UI or endpoint).
        health_url: answers HTTP 200 once the service is ready.
        workdir: the working directory (created on start).
        ports: every TCP port the service binds on 127.0.0.1 (checked free before starting).
        redact: strings to mask in log lines shown in errors (secrets).
    """

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(repr=False)
    url: str
    health_url: str
    workdir: Path
    ports: tuple[int, ...]
    redact: tuple[str, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class ServiceStatus:
    """What `stack_status` knows about one service."""

    name: str
    running: bool
    healthy: bool
    pid: int | None
    url: str
    log_path: Path


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


def prefect_spec(prefect_home: Path, port: int, host: str = LOOPBACK) -> ServiceSpec:
    """Prefect server + UI with its SQLite database under `prefect_home`.

    Started through `infra.prefect_server`: `prefect server start` with batched task-run
    recording and SQLite write transactions that wait for the lock instead of failing (see there).

    Args:
        prefect_home: PREFECT_HOME of the server (database, settings).
        port: API and UI port; the API is at ``http://host:port/api``.
        host: interface to bind (loopback by default).
    """
    env = {
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "true",
        **RECORDING_ENV,
    }
    argv = (sys.executable, "-m", "infra.prefect_server", "server", "start", "--host", host, "--port", str(port))
    url = f"http://{host}:{port}"
    return ServiceSpec("prefect", argv, env, url, f"{url}/api/health", prefect_home, (port,))


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


# --------------------------------------------------------------------------- one service


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def pid_path(run_dir: Path, name: str) -> Path:
    """``<run_dir>/<name>.pid``."""
    return run_dir / f"{name}.pid"


def log_path(run_dir: Path, name: str) -> Path:
    """``<run_dir>/<name>.log``."""
    return run_dir / f"{name}.log"


def port_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a server could bind `port` on `host` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_loopback_port() -> int:
    """A port the kernel reports free on 127.0.0.1 now (from its ephemeral range)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def check_ports_free(spec: ServiceSpec, host: str = LOOPBACK) -> None:
    """Raise `StackError` naming the first of the spec's ports something already listens on."""
    for port in spec.ports:
        if not port_free(port, host):
            raise StackError(
                f"port {port} on {host} is in use, but {spec.name} needs it free: stop what listens "
                "there or choose other ports (FEDPRUNE_*_PORT settings)"
            )


def start_service(spec: ServiceSpec, run_dir: Path, die_with_parent: bool = False) -> int:
    """Start `spec` in the background, in its own session; write its pid file; return the pid.

    Args:
        spec: what to run.
        run_dir: directory for ``<name>.pid`` and ``<name>.log`` (appended to).
        die_with_parent: ask Linux to SIGTERM the service when this process dies (tests).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    spec.workdir.mkdir(parents=True, exist_ok=True)
    log = log_path(run_dir, spec.name)
    with log.open("ab") as handle:
        handle.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {spec.name} ===\n".encode())
        handle.flush()
        process = subprocess.Popen(
            spec.argv,
            cwd=spec.workdir,
            env=child_env(dict(spec.env)),
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )
    _CHILDREN[process.pid] = process
    record = {
        "pid": process.pid,
        "start_ticks": _start_ticks(process.pid),
        "name": spec.name,
        "url": spec.url,
    }
    pid_path(run_dir, spec.name).write_text(json.dumps(record) + "\n")
    return process.pid


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_healthy(spec: ServiceSpec, pid: int, run_dir: Path, timeout_s: float = 90.0) -> float:
    """Poll the spec's health URL until it answers 200; return the seconds it took.

    Raises:
        StackError: the process exited, or `timeout_s` passed; names the log file to read.
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if _http_ok(spec.health_url):
            return time.monotonic() - start
        if not _alive(pid):
            raise StackError(
                f"{spec.name} exited while starting (health URL {spec.health_url} never answered): "
                f"read {log_path(run_dir, spec.name)}; last lines: {_log_tail(spec, run_dir)}"
            )
        time.sleep(0.25)
    raise StackError(
        f"{spec.name} did not answer {spec.health_url} within {timeout_s:.0f} s: read "
        f"{log_path(run_dir, spec.name)}; last lines: {_log_tail(spec, run_dir)}; then retry or raise "
        "the timeout"
    )


def _http_ok(url: str, timeout_s: float = 1.0, body: bytes | None = None) -> bool:
    """Whether `url` answers 200 (with exactly `body`, when given)."""
    try:
        with _NO_PROXY.open(url, timeout=timeout_s) as response:
            return bool(response.status == 200) and (body is None or response.read().strip() == body)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def answers_as_prefect(url: str) -> bool:
    """Whether a Prefect server answers at `url` (``http://host:port``): its health endpoint says ``true``."""
    return _http_ok(f"{url}/api/health", timeout_s=2.0, body=b"true")


def _log_tail(spec: ServiceSpec, run_dir: Path, lines: int = 3) -> str:
    try:
        text = log_path(run_dir, spec.name).read_text(errors="replace")
    except OSError:
        return "(no log)"
    for secret in spec.redact:
        if secret:
            text = text.replace(secret, "***")
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def read_pid(run_dir: Path, name: str) -> int | None:
    """Pid from the service's pid file if that process is still the one started; else None."""
    try:
        record = json.loads(pid_path(run_dir, name).read_text())
        pid = int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _alive(pid) or record.get("start_ticks") != _start_ticks(pid):
        return None  # exited, or the pid was reused by an unrelated process
    return pid


def stop_service(run_dir: Path, name: str, timeout_s: float = 20.0) -> bool:
    """Stop the service named in ``<run_dir>/<name>.pid`` and its child processes.

    Sends SIGTERM to the service's process group, waits up to `timeout_s`, then SIGKILL.

    Returns:
        True if a running service was stopped, False if none was running.
    """
    pid = read_pid(run_dir, name)
    pid_path(run_dir, name).unlink(missing_ok=True)
    if pid is None:
        return False
    _signal_group(pid, signal.SIGTERM)
    if not _wait_group_gone(pid, timeout_s):
        _signal_group(pid, signal.SIGKILL)
        _wait_group_gone(pid, 5.0)
    _CHILDREN.pop(pid, None)
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        child = _CHILDREN.get(pgid)
        if child is not None:
            child.poll()  # reap our own child so it does not linger as a zombie
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if child is None and not _alive(pgid) and not _group_has_live_members(pgid):
            return True
        time.sleep(0.1)
    return False


def _group_has_live_members(pgid: int) -> bool:
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        stat = _read_stat(entry.name) if entry.name.isdigit() else None
        if stat is not None and int(stat[2]) == pgid and stat[0] != "Z":
            return True
    return False


def _alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _read_stat(str(pid))
    return stat is None or stat[0] != "Z"


def _read_stat(pid: str) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, pgrp, ...]; None if unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _start_ticks(pid: int) -> int | None:
    stat = _read_stat(str(pid))
    return int(stat[19]) if stat is not None else None  # field 22 of proc(5): starttime


def service_status(spec: ServiceSpec, run_dir: Path) -> ServiceStatus:
    """Whether the service of `spec` runs (pid file + live process) and answers its health URL."""
    pid = read_pid(run_dir, spec.name)
    healthy = pid is not None and _http_ok(spec.health_url)
    return ServiceStatus(spec.name, pid is not None, healthy, pid, spec.url, log_path(run_dir, spec.name))


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
    """The services of the local stack, in start order: seaweed, mlflow, prefect, worker."""
    stack = settings.stack_dir
    s3_url = f"http://{LOOPBACK}:{settings.s3_port}"
    buckets = (settings.stack_bucket, settings.mlflow_artifacts_bucket)
    return {
        "seaweed": seaweed_spec(stack / "seaweed", seaweed_ports(settings), _credentials(settings), buckets),
        "mlflow": mlflow_spec(
            stack,
            settings.mlflow_port,
            f"sqlite:///{stack / 'mlflow.db'}",
            f"s3://{settings.mlflow_artifacts_bucket}/",
            s3_endpoint_url=s3_url,
            aws_credentials=_credentials(settings),
            workers=2,
        ),
        "prefect": prefect_spec(settings.home / "prefect", local_prefect_port(settings)),
        "worker": worker_spec(settings),
    }


WORK_POOL = "fedprune-process"
REPO_DIR = Path(__file__).resolve().parents[1]


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

    Idempotent: services already running are left alone. On failure the services that did start
    keep running (see `stack_status`; `stack_down` stops them).

    Raises:
        StackError: a port is taken, or a service exits or does not answer (names its log file).
    """
    run_dir = settings.stack_dir
    specs = stack_specs(settings)
    pids = {name: running_or_started(spec, run_dir) for name, spec in specs.items()}
    for name, spec in specs.items():
        wait_healthy(spec, pids[name], run_dir, timeout_s)
    _ensure_buckets(settings)
    return stack_status(settings)


def running_or_started(spec: ServiceSpec, run_dir: Path) -> int:
    """Pid of the service if its pid file names a live one, else of the one started now.

    Holds an exclusive lock on ``<run_dir>/<name>.lock`` from reading the pid file to writing
    it, so concurrent callers (two CLI runs started together) start the service once: the
    others wait for the lock, then find its pid. Does not wait for it to answer (`wait_healthy`).

    Raises:
        StackError: no service is running and one of its ports is taken.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    with service_lock(run_dir, spec.name):
        pid = read_pid(run_dir, spec.name)
        if pid is not None:
            return pid
        check_ports_free(spec)
        return start_service(spec, run_dir)


@contextmanager
def service_lock(run_dir: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<run_dir>/<name>.lock``: one caller at a time decides whether to start it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / f"{name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


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
