"""The stack's services: command lines and env on loopback with secrets kept out, SeaweedFS ports,
the remembered Prefect port, status, and a real up/status/use/down."""

from __future__ import annotations

import os
import stat
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from infra.settings import Settings
from infra.stack import (
    PREFECT_PORT_FILE,
    SeaweedPorts,
    check_ports_free,
    local_prefect_port,
    remember_prefect_port,
    stack_down,
    stack_env,
    stack_specs,
    stack_status,
    stack_up,
    write_stack_env,
)
from infra.stack.postgres import bin_path
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
    ports = {"prefect_port": free_port(), "mlflow_port": free_port(), "worker_port": free_port(),
             "postgres_port": free_port()}
    for name in (
        "s3_port",
        "seaweed_master_port",
        "seaweed_volume_port",
        "seaweed_filer_port",
        "seaweed_admin_port",
    ):
        ports[name] = free_port(with_grpc=True)
    return ports


def test_stack_services_bind_loopback_and_keep_secrets_out_of_argv_and_repr(tmp_path: Path) -> None:
    specs = stack_specs(_settings(tmp_path))
    assert list(specs) == ["seaweed", "postgres", "mlflow", "prefect", "worker"]
    postgres = specs["postgres"]
    assert postgres.argv[1:] == ("-D", str(tmp_path / "stack" / "postgres"), "-h", "127.0.0.1", "-p", "5432", "-k",
                                 str(tmp_path / "stack" / "postgres"))  # loopback and a socket in its own folder
    database_password = (tmp_path / "stack" / "postgres.password").read_text()
    assert len(database_password) >= 24 and stat.S_IMODE((tmp_path / "stack" / "postgres.password").stat().st_mode) \
        == 0o600
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
    assert prefect.env["PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED"] == "false"  # events are not stored
    assert prefect.env["PREFECT_API_DATABASE_CONNECTION_URL"] == (
        f"postgresql+asyncpg://prefect:{database_password}@127.0.0.1:5432/prefect")
    assert database_password in prefect.redact
    for spec in specs.values():
        for secret in ("stack-test-secret", database_password):
            assert secret not in " ".join(spec.argv) and secret not in repr(spec)
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
        "postgres": (False, None),
        "mlflow": (False, None),
        "prefect": (False, None),
        "worker": (False, None),
    }
    assert stack_down(_settings(tmp_path)) == []


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
    assert sorted(stopped) == ["mlflow", "postgres", "prefect", "seaweed", "worker"]
    assert not any(s.running for s in stack_status(settings).values())
    for spec in stack_specs(settings).values():
        check_ports_free(spec)
    print(f"\nstack up in {up_s:.1f} s, whole test {time.monotonic() - start:.1f} s")


def _use_the_stack(settings: Settings) -> None:
    env = stack_env(settings)
    with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=5) as response:
        assert response.read() == b"true"
    # Prefect keeps its tables in the stack's PostgreSQL, which asks for the password.
    psql = (bin_path("psql"), "-h", "127.0.0.1", "-p", str(settings.postgres_port), "-U", "prefect", "-d", "prefect",
            "-tAc", "SELECT count(*) FROM information_schema.tables WHERE table_name = 'flow_run'")
    without = subprocess.run(psql, capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert without.returncode != 0 and "password" in without.stderr
    password = (settings.stack_dir / "postgres.password").read_text()
    found = subprocess.run(psql, capture_output=True, text=True,
                           env={"PATH": os.environ["PATH"], "PGPASSWORD": password})
    assert found.stdout.strip() == "1", found.stderr
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
