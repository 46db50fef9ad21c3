"""The CLI around runs: -h and --version everywhere, `runs list` with each run's status, and Ctrl-C
that stops a run resumably and prints the exact command that resumes it."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.flows.conftest import Cli

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
COMMANDS = [(), ("run",), ("resume",), ("sweep",), ("worker",), ("runs",), ("runs", "list"), ("stack",),
            ("stack", "up"), ("stack", "down"), ("stack", "status"), ("data",), ("data", "generate"), ("cluster",),
            ("cluster", "certs")]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "fedprune")
def test_dash_h_is_help_on_every_command(cli: Cli, command: tuple[str, ...]) -> None:
    done = cli(*command, "-h", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout and "--help" in done.stdout and "-h" in done.stdout


def test_version(cli: Cli) -> None:
    done = cli("--version", timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"fedprune {version('fedprune')}"


def test_runs_list_loads_neither_torch_nor_mlflow(cli: Cli) -> None:
    """What made it slow (6 s): importing torch to list JSON records. Listing reads one record per run."""
    code = ("import sys\nfrom flows.cli import main\nsys.argv = ['fedprune', 'runs', 'list']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('loaded:', sorted(m for m in ('torch', 'mlflow', 'prefect') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], env=cli.env, capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "loaded: []"
    assert "embedded store: checkpoints in file://" in done.stderr
    assert "`source " in done.stderr and "stack/env`" in done.stderr  # how to see the stack's runs


TOY = ("--preset", "toy")
LONG = (*TOY, "--set", "schedule.num_rounds=400", "--checkpoint-every", "5")


def latest_round(cli: Cli, run_id: str) -> int:
    path = cli.home / "storage" / "fedprune" / run_id / "LATEST"
    return json.loads(path.read_text())["round"] if path.exists() else -1


def interrupt_after(cli: Cli, run_id: str, round_num: int) -> subprocess.CompletedProcess[str]:
    """Start a long run and press Ctrl-C (SIGINT) once it committed `round_num`."""
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *LONG, "--run-id", run_id], env=cli.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 240
    while latest_round(cli, run_id) < round_num and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before Ctrl-C"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def listed(cli: Cli) -> dict[str, list[str]]:
    done = cli("runs", "list", timeout=60)
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split()[:5] == ["EXPERIMENT", "RUN", "STATUS", "ROUND", "LAST"]
    return {row.split()[1]: row.split() for row in rows}


def test_runs_list_shows_finished_failed_and_interrupted_runs_and_ctrl_c_says_how_to_resume(cli: Cli) -> None:
    finished = cli("run", *TOY, "--run-id", "done")
    assert finished.returncode == 0, finished.stderr[-3000:]
    failed = cli("run", *TOY, "--run-id", "late", "--set", "federated.client_timeout_s=0.000001", "--set",
                 "federated.round_tries=1")
    assert failed.returncode == 1, failed.stderr[-3000:]

    stopped = interrupt_after(cli, "stopped", 10)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert stopped.stdout == ""
    (command,) = re.findall(r"interrupted: run stopped stopped at its last checkpoint; to go on: `([^`]+)`",
                            stopped.stderr)
    assert command == "fedprune resume stopped"
    committed = latest_round(cli, "stopped")

    runs = listed(cli)
    assert runs["done"][2:5] == ["finished", "12/12", "accuracy"]
    assert runs["late"][2:4] == ["failed", "0/12"] and "RoundFailedError:" in runs["late"]
    assert runs["stopped"][2:4] == ["interrupted", f"{committed}/400"]
    for row in runs.values():  # a start time, e.g. 2026-05-01 09:30
        assert any(re.fullmatch(r"\d{4}-\d\d-\d\d", cell) for cell in row), row

    resumed = cli(*command.split()[1:], "--json")  # the command it printed, as printed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    assert summary["resumed"] is True and summary["rounds_run"] == 400 - committed
    assert listed(cli)["stopped"][2:4] == ["finished", "400/400"]
