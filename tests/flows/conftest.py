"""Fixtures for flow tests: a real Prefect server on loopback and a CLI runner in subprocesses.

Flows run through the `fedprune` CLI in child processes, as a user runs them, each with its own
FEDPRUNE_HOME (storage, MLflow SQLite file) and the session's Prefect server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import restartable_prefect


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server start` on a free loopback port; yields its API URL."""
    with restartable_prefect(tmp_path_factory.mktemp("prefect")) as (api, _):
        yield api


@dataclass(frozen=True)
class Cli:
    """Runs `fedprune` in a child process against one FEDPRUNE_HOME."""

    home: Path
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flows.cli", *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, cwd=Path(__file__).parents[2],
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args], env=self.env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, text=True, cwd=Path(__file__).parents[2],
        )


def cli_for(home: Path, prefect_api: str, **extra_env: str) -> Cli:
    """A CLI runner with FEDPRUNE_HOME `home` against `prefect_api`; `extra_env` on top (e.g. S3 settings)."""
    env = {**os.environ, "FEDPRUNE_HOME": str(home), "PREFECT_API_URL": prefect_api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"}
    for key in ("FEDPRUNE_STORAGE_URL", "FEDPRUNE_TRACKING_URI", "FEDPRUNE_S3_ENDPOINT_URL",
                "FEDPRUNE_OUTAGE_BUDGET_S"):
        env.pop(key, None)
    return Cli(home, {**env, **extra_env})


@pytest.fixture
def cli(tmp_path: Path, prefect_api: str) -> Cli:
    """A CLI runner with a fresh FEDPRUNE_HOME under tmp_path."""
    return cli_for(tmp_path / "home", prefect_api)
