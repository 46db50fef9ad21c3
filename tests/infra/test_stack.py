"""Settings and the local stack: command lines, env, process handling, and a real up/status/down."""

from __future__ import annotations

import os
import socket
import stat
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from infra.errors import StackError
from infra.settings import Settings, child_env
from infra.stack import (
    PREFECT_PORT_FILE,
    SeaweedPorts,
    ServiceSpec,
    check_ports_free,
    local_prefect_port,
    read_pid,
    remember_prefect_port,
    running_or_started,
    stack_down,
    stack_env,
    stack_specs,
    stack_status,
    stack_up,
    start_service,
    stop_service,
    wait_healthy,
    write_stack_env,
)
from infra.storage import S3Storage, make_s3_client
from infra.tracking import Tracker
from tests.servers import free_port


def _settings(home: Path, **ports: int) -> Settings:
    secret = SecretStr("stack-test-secret")
    fields: dict[str, Any] = {
        "home": home,
        "aws_access_key_id": "stack-test",
        "aws_secret_access_key": secret,
    }
    return Settings(**{**fields, **ports})


def _free_stack_ports() -> dict[str, int]:
    ports = {"prefect_port": free_port(), "mlflow_port": free_port(), "worker_port": free_port()}
    for name in (
        "s3_port",
        "seaweed_master_port",
        "seaweed_volume_port",
        "seaweed_filer_port",
        "seaweed_admin_port",
    ):
        ports[name] = free_port(with_grpc=True)
    return ports


# --------------------------------------------------------------------------- settings


def test_settings_defaults_live_under_an_absolute_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("FEDPRUNE_HOME", "FEDPRUNE_STORAGE_URL", "FEDPRUNE_TRACKING_URI", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    home = (tmp_path / ".fedprune").resolve()
    assert settings.home == home
    assert settings.storage_url == (home / "storage").as_uri()
    assert settings.tracking_uri == f"sqlite:///{home / 'mlflow.db'}"
    assert settings.prefect_api_url is None and settings.s3_endpoint_url is None
    assert (settings.prefect_port, settings.mlflow_port, settings.s3_port) == (4200, 5000, 8333)
    assert settings.aws_access_key_id == "fedprune"
    assert "fedprune-secret" not in repr(settings)


def test_settings_read_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPRUNE_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("FEDPRUNE_MLFLOW_PORT", "5123")
    monkeypatch.setenv("FEDPRUNE_STORAGE_URL", "s3://bucket/p")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    settings = Settings()
    assert settings.home == tmp_path / "h" and settings.mlflow_port == 5123
    assert settings.storage_url == "s3://bucket/p" and settings.aws_access_key_id == "from-env"
    assert settings.tracking_uri == f"sqlite:///{tmp_path / 'h' / 'mlflow.db'}"
    with pytest.raises(Exception, match="frozen"):
        settings.mlflow_port = 1  # type: ignore[misc]


def test_children_always_get_prefect_analytics_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    assert child_env({"X": "1"})["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert child_env({"X": "1"})["X"] == "1"


# --------------------------------------------------------------------------- command lines and env


def test_stack_services_bind_loopback_and_keep_secrets_out_of_argv_and_repr(tmp_path: Path) -> None:
    specs = stack_specs(_settings(tmp_path))
    assert list(specs) == ["seaweed", "mlflow", "prefect", "worker"]
    worker = specs["worker"]
    assert worker.argv[1:5] == ("worker", "start", "--pool", "fedprune-process")
    assert worker.env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert worker.env["FEDPRUNE_STORAGE_URL"] == "s3://fedprune"
    assert "stack-test-secret" not in repr(worker) and "stack-test-secret" not in " ".join(worker.argv)
    weed = specs["seaweed"].argv
    assert weed[1] == "mini" and "-ip.bind=127.0.0.1" in weed and "-s3.port=8333" in weed
    assert {"-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"} <= set(weed)
    assert f"-dir={tmp_path / 'stack' / 'seaweed'}" in weed and "-bucket=fedprune,mlflow-artifacts" in weed
    mlflow = specs["mlflow"]
    assert mlflow.argv[mlflow.argv.index("--artifacts-destination") + 1] == "s3://mlflow-artifacts/"
    assert (
        mlflow.argv[mlflow.argv.index("--backend-store-uri") + 1]
        == f"sqlite:///{tmp_path / 'stack' / 'mlflow.db'}"
    )
    assert mlflow.env["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:8333"
    prefect = specs["prefect"]
    assert prefect.argv[1:] == (
        "-m", "infra.prefect_server", "server", "start", "--host", "127.0.0.1", "--port", "4200"
    )
    assert prefect.env["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"] == "200"  # recording keeps up
    assert prefect.env["PREFECT_HOME"] == str(tmp_path / "prefect") and prefect.health_url.endswith(
        "/api/health"
    )
    for spec in specs.values():
        assert "stack-test-secret" not in " ".join(spec.argv) and "stack-test-secret" not in repr(spec)
    assert len(specs["seaweed"].ports) == 10  # 5 HTTP + 5 gRPC


def test_stack_env_points_at_the_stack_and_is_written_private(tmp_path: Path) -> None:
    settings = _settings(tmp_path, mlflow_port=5111)
    env = stack_env(settings)
    assert env["FEDPRUNE_STORAGE_URL"] == "s3://fedprune"
    assert env["FEDPRUNE_S3_ENDPOINT_URL"] == "http://127.0.0.1:8333"
    assert env["FEDPRUNE_TRACKING_URI"] == "http://127.0.0.1:5111"
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    path = write_stack_env(settings)
    assert path == tmp_path / "stack" / "env" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "export FEDPRUNE_TRACKING_URI=http://127.0.0.1:5111\n" in path.read_text()


def test_seaweed_ports_leave_room_for_grpc() -> None:
    with pytest.raises(ValueError, match="port=60000 must be in"):
        SeaweedPorts(s3=60000)
    with pytest.raises(ValueError, match="must all differ"):
        SeaweedPorts(s3=8333, master=18333)


# --------------------------------------------------------------------------- process handling


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


def test_a_remembered_prefect_port_holds_while_the_configured_port_stays(tmp_path: Path) -> None:
    settings = _settings(tmp_path, prefect_port=4200)
    assert local_prefect_port(settings) == 4200  # nothing remembered
    remember_prefect_port(settings, 4321)
    assert local_prefect_port(settings) == 4321
    assert stack_specs(settings)["prefect"].url == "http://127.0.0.1:4321"
    assert stack_env(settings)["PREFECT_API_URL"] == "http://127.0.0.1:4321/api"
    assert local_prefect_port(_settings(tmp_path, prefect_port=4300)) == 4300  # the user chose another port
    (tmp_path / "stack" / PREFECT_PORT_FILE).write_text("[4321]")
    assert local_prefect_port(settings) == 4200  # an unreadable record is ignored


def test_status_of_a_stack_that_never_ran(tmp_path: Path) -> None:
    statuses = stack_status(_settings(tmp_path))
    assert {name: (s.running, s.pid) for name, s in statuses.items()} == {
        "seaweed": (False, None),
        "mlflow": (False, None),
        "prefect": (False, None),
        "worker": (False, None),
    }
    assert stack_down(_settings(tmp_path)) == []


# --------------------------------------------------------------------------- the real stack


@pytest.mark.integration
def test_stack_up_status_use_and_down(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "home", **_free_stack_ports())
    start = time.monotonic()
    try:
        statuses = stack_up(settings, timeout_s=90)
        up_s = time.monotonic() - start
        assert all(s.running and s.healthy and s.pid for s in statuses.values()), statuses
        again = stack_up(settings)  # idempotent: nothing restarted
        assert {n: s.pid for n, s in again.items()} == {n: s.pid for n, s in statuses.items()}
        _use_the_stack(settings)
    finally:
        stopped = stack_down(settings)
    assert sorted(stopped) == ["mlflow", "prefect", "seaweed", "worker"]
    assert not any(s.running for s in stack_status(settings).values())
    for spec in stack_specs(settings).values():
        check_ports_free(spec)
    print(f"\nstack up in {up_s:.1f} s, whole test {time.monotonic() - start:.1f} s")


def _use_the_stack(settings: Settings) -> None:
    env = stack_env(settings)
    with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=5) as response:
        assert response.read() == b"true"
    client = make_s3_client(
        env["FEDPRUNE_S3_ENDPOINT_URL"],
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    store = S3Storage("fedprune", endpoint_url=env["FEDPRUNE_S3_ENDPOINT_URL"], client=client)
    store.put_bytes("probe/x", b"1")
    assert store.get_bytes("probe/x") == b"1"
    tracker = Tracker(env["FEDPRUNE_TRACKING_URI"], "stack-test")
    tracker.log_artifact_bytes("notes/hello.txt", b"hi")
    tracker.finish()
    artifacts = S3Storage("mlflow-artifacts", endpoint_url=env["FEDPRUNE_S3_ENDPOINT_URL"], client=client)
    assert [key for key in artifacts.list_keys("") if key.endswith("notes/hello.txt")]
