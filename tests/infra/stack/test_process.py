"""Process supervision: a service that dies names its log, stop ends the whole process group,
callers at once start a service once, a taken port is named before starting."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from infra.errors import StackError
from infra.stack import (
    ServiceSpec,
    check_ports_free,
    read_pid,
    running_or_started,
    start_service,
    stop_service,
    wait_healthy,
)
from tests.servers import free_port


def _python_spec(tmp_path: Path, code: str, port: int) -> ServiceSpec:
    argv = (sys.executable, "-c", code)
    url = f"http://127.0.0.1:{port}"
    return ServiceSpec(
        "fake", argv, {"TOKEN": "hidden-value"}, url, url, tmp_path, (port,), ("hidden-value",)
    )


def test_a_service_that_dies_at_startup_names_its_log(tmp_path: Path) -> None:
    code = "import os, sys; print('boom: bad flag', os.environ['TOKEN']); sys.exit(3)"
    spec = _python_spec(tmp_path, code, free_port())
    pid = start_service(spec, tmp_path)
    with pytest.raises(StackError, match=r"fake exited while starting") as info:
        wait_healthy(spec, pid, tmp_path, timeout_s=20)
    assert str(tmp_path / "fake.log") in str(info.value) and "boom: bad flag ***" in str(info.value)
    assert read_pid(tmp_path, "fake") is None
    assert stop_service(tmp_path, "fake") is False


def test_stop_service_ends_the_whole_process_group(tmp_path: Path) -> None:
    sleeper = "[sys.executable, '-c', 'import time; time.sleep(60)']"
    code = f"import subprocess, sys, time; subprocess.Popen({sleeper}); time.sleep(60)"
    pid = start_service(_python_spec(tmp_path, code, free_port()), tmp_path)
    assert read_pid(tmp_path, "fake") == pid
    time.sleep(0.5)
    assert stop_service(tmp_path, "fake", timeout_s=5) is True
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert not (tmp_path / "fake.pid").exists()


def test_callers_at_the_same_moment_start_a_service_once(tmp_path: Path) -> None:
    # Two CLI runs launched together: without the lock both find no pid file and both start a
    # server; the second cannot bind and overwrites the first's pid file.
    port = free_port()
    handler = "h.SimpleHTTPRequestHandler"
    code = f"import http.server as h; h.HTTPServer(('127.0.0.1', {port}), {handler}).serve_forever()"
    spec = _python_spec(tmp_path, code, port)
    barrier = threading.Barrier(4)

    def call(_: int) -> int:
        barrier.wait()
        return running_or_started(spec, tmp_path)

    with ThreadPoolExecutor(4) as pool:
        pids = list(pool.map(call, range(4)))
    try:
        assert len(set(pids)) == 1 and read_pid(tmp_path, "fake") == pids[0]
        assert (tmp_path / "fake.log").read_text().count("starting fake") == 1
        wait_healthy(spec, pids[0], tmp_path, timeout_s=20)
        assert running_or_started(spec, tmp_path) == pids[0]  # later callers find it too
    finally:
        stop_service(tmp_path, "fake", timeout_s=5)


def test_a_taken_port_is_named_before_starting(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(StackError, match=f"port {port} on 127.0.0.1 is in use"):
            check_ports_free(_python_spec(tmp_path, "", port))
