"""Process supervision for local services: start in the background, wait until healthy, stop.

A service (`ServiceSpec`) is a background process in its own session, with a pid file and a log
file in a run directory (``<home>/stack/`` for the stack, a temporary one for the integration
tests' throwaway servers). `start_service` starts it, `wait_healthy` polls its health URL,
`stop_service` ends its whole process group (SIGTERM, then SIGKILL), `read_pid` trusts a pid file
only while its process is the one started (same start time). `running_or_started` holds an
exclusive lock on ``<name>.lock`` (`service_lock`) while it reads the pid file and starts, so two
callers at once start one server and both use it. Nothing here knows which services exist
(`infra.stack.services`).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.errors import StackError
from infra.settings import LOOPBACK, child_env

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
        health_url: answers HTTP 200 once the service is ready (unless `health_argv` is given).
        workdir: the working directory (created on start).
        ports: every TCP port the service binds on 127.0.0.1 (checked free before starting).
        redact: strings to mask in log lines shown in errors (secrets).
        health_argv: a command that exits 0 once the service is ready, for a service that speaks no
            HTTP (PostgreSQL's ``pg_isready``); replaces `health_url`.
        user: the system user to run as (None: this process's).
    """

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(repr=False)
    url: str
    health_url: str
    workdir: Path
    ports: tuple[int, ...]
    redact: tuple[str, ...] = field(default=(), repr=False)
    health_argv: tuple[str, ...] = ()
    user: str | None = None


@dataclass(frozen=True)
class ServiceStatus:
    """What `stack_status` knows about one service."""

    name: str
    running: bool
    healthy: bool
    pid: int | None
    url: str
    log_path: Path


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
            **as_user(spec.user),
        )
    _CHILDREN[process.pid] = process
    record = {
        "pid": process.pid,
        "start_ticks": _start_ticks(process.pid),
        "name": spec.name,
        "url": spec.url,
        "fingerprint": fingerprint(spec),
    }
    pid_path(run_dir, spec.name).write_text(json.dumps(record) + "\n")
    return process.pid


def as_user(user: str | None) -> dict[str, Any]:
    """`subprocess.Popen` arguments that run a child as `user`, with that user's group and no other
    (None: as this process)."""
    if user is None:
        return {}
    import pwd

    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def fingerprint(spec: ServiceSpec) -> str:
    """A digest of how `spec` runs (command line, environment, user): equal for the same service
    started the same way; holds no secret."""
    described = json.dumps([spec.argv, sorted(spec.env.items()), spec.user])
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def started_as(run_dir: Path, name: str) -> str | None:
    """The `fingerprint` the running service `name` was started with (None: unknown or not running)."""
    if read_pid(run_dir, name) is None:
        return None
    try:
        value = json.loads(pid_path(run_dir, name).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_healthy(spec: ServiceSpec, pid: int, run_dir: Path, timeout_s: float = 90.0) -> float:
    """Poll the spec's health check (`answers`) until it passes; return the seconds it took.

    Raises:
        StackError: the process exited, or `timeout_s` passed; names the log file to read.
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if answers(spec):
            return time.monotonic() - start
        if not _alive(pid):
            raise StackError(
                f"{spec.name} exited while starting ({_check(spec)} never answered): "
                f"read {log_path(run_dir, spec.name)}; last lines: {_log_tail(spec, run_dir)}"
            )
        time.sleep(0.25)
    raise StackError(
        f"{spec.name} did not answer {_check(spec)} within {timeout_s:.0f} s: read "
        f"{log_path(run_dir, spec.name)}; last lines: {_log_tail(spec, run_dir)}; then retry or raise "
        "the timeout"
    )


def _check(spec: ServiceSpec) -> str:
    return f"health command {Path(spec.health_argv[0]).name}" if spec.health_argv else f"health URL {spec.health_url}"


def answers(spec: ServiceSpec) -> bool:
    """Whether the service is ready: its `health_argv` exits 0, or its health URL answers 200."""
    if spec.health_argv:
        try:
            return subprocess.run(spec.health_argv, capture_output=True, timeout=5).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False
    return _http_ok(spec.health_url)


def _http_ok(url: str, timeout_s: float = 1.0, body: bytes | None = None) -> bool:
    """Whether `url` answers 200 (with exactly `body`, when given)."""
    try:
        with _NO_PROXY.open(url, timeout=timeout_s) as response:
            return bool(response.status == 200) and (body is None or response.read().strip() == body)
    except (urllib.error.URLError, OSError, ValueError):
        return False


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
    healthy = pid is not None and answers(spec)
    return ServiceStatus(spec.name, pid is not None, healthy, pid, spec.url, log_path(run_dir, spec.name))


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
