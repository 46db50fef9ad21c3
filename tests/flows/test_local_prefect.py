"""The on-demand Prefect server of two checkouts (two FEDPRUNE_HOMEs) on one machine.

When the port of a home's Prefect server is held by another home's on-demand server, the second
home shares it; when it is held by something that is not a Prefect server, the second home starts
its own on a free port and remembers it. Real servers, real runs.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import SyncPrefectClient

from infra.prefect_api import ensure_prefect_api
from infra.settings import Settings
from infra.stack import PREFECT_PORT_FILE, read_pid, stop_service
from tests.flows.conftest import Cli
from tests.servers import free_port

pytestmark = pytest.mark.integration


def on_demand(home: Path, prefect_port: int) -> Cli:
    """`fedprune` in `home` with no Prefect API configured: it starts (or shares) a local server."""
    env = {**os.environ, "FEDPRUNE_HOME": str(home), "FEDPRUNE_PREFECT_PORT": str(prefect_port),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for key in ("PREFECT_API_URL", "FEDPRUNE_PREFECT_API_URL", "FEDPRUNE_STORAGE_URL", "FEDPRUNE_TRACKING_URI"):
        env.pop(key, None)
    return Cli(home, env)


def flow_run_names(api: str) -> list[str]:
    with SyncPrefectClient(api) as client:
        return [run.name for run in client.read_flow_runs()]


@pytest.fixture
def not_prefect() -> Iterator[int]:
    """A loopback port held by an HTTP server that is not Prefect (it answers 501 to every GET)."""
    server = http.server.HTTPServer(("127.0.0.1", free_port()), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_second_home_shares_the_first_homes_prefect_server(tmp_path: Path) -> None:
    port = free_port()
    first, second = on_demand(tmp_path / "first", port), on_demand(tmp_path / "second", port)
    try:
        done = first("run", "--preset", "toy", "--run-id", "first")
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Prefect:" not in done.stderr  # its own server, on its own port: nothing to say
        shared = second("run", "--preset", "toy", "--run-id", "second")
        assert shared.returncode == 0, shared.stderr[-3000:]
        said = [line for line in shared.stderr.splitlines() if line.startswith("Prefect:")]
        assert said == [f"Prefect: using the server already at http://127.0.0.1:{port} (not started from "
                        f"{tmp_path / 'second'}): this run is recorded there"]
        names = flow_run_names(f"http://127.0.0.1:{port}/api")
        assert {"first-rounds-1-12", "second-rounds-1-12"} <= set(names)
        assert read_pid(second.home / "stack", "prefect") is None  # not its server: `stack down` leaves it
    finally:
        stop_service(first.home / "stack", "prefect")


def test_a_port_held_by_something_else_gets_this_homes_own_server(
    tmp_path: Path, not_prefect: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    try:
        done = on_demand(home, not_prefect)("run", "--preset", "toy", "--run-id", "own")
        assert done.returncode == 0, done.stderr[-3000:]
        remembered = json.loads((home / "stack" / PREFECT_PORT_FILE).read_text())
        assert remembered["configured"] == not_prefect and remembered["port"] != not_prefect
        url = f"http://127.0.0.1:{remembered['port']}"
        said = [line for line in done.stderr.splitlines() if line.startswith("Prefect:")]
        assert said == [f"Prefect: port {not_prefect} is taken by something that is not a Prefect server: this "
                        f"home's server runs at {url} instead (remembered in {home / 'stack' / PREFECT_PORT_FILE})"]
        assert "own-rounds-1-12" in flow_run_names(f"{url}/api")
        # A later run of this home finds that server, silently; the port it was configured with stays taken.
        pid = read_pid(home / "stack", "prefect")
        monkeypatch.delenv("PREFECT_API_URL", raising=False)  # restored after the test
        lines: list[str] = []
        assert ensure_prefect_api(Settings(home=home, prefect_port=not_prefect), lines.append) == f"{url}/api"
        assert lines == [] and pid is not None and read_pid(home / "stack", "prefect") == pid
    finally:
        stop_service(home / "stack", "prefect")
