"""Shared fixtures: real local servers (session-scoped) and a storage fixture over both backends.

* ``seaweed_s3`` -> `tests.servers.S3Server`: a SeaweedFS S3 endpoint on a free loopback port,
  its credentials and a created bucket.
* ``mlflow_server`` -> `tests.servers.MlflowServer`: an MLflow server on a free loopback port
  (``tracking_uri`` is ``http://127.0.0.1:<port>``), SQLite backend, local artifacts.
* ``storage`` -> an empty `infra.storage.Storage`, parametrized over "local" (a temporary
  directory) and "s3" (a fresh prefix on ``seaweed_s3``, marked integration).

Tests that use the servers are marked ``integration``: ``pytest -m "not integration"`` skips them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.storage import LocalStorage, Storage
from tests.servers import MlflowServer, S3Server, running_mlflow, running_seaweed


@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real SeaweedFS S3 server for the whole session (endpoint_url, credentials, bucket)."""
    with running_seaweed(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real MLflow tracking server for the whole session (tracking_uri, artifacts_dir, log_path)."""
    with running_mlflow(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """An empty storage: a temporary directory, or a fresh key prefix on the session's SeaweedFS."""
    if request.param == "local":
        return LocalStorage(tmp_path / "storage")
    server: S3Server = request.getfixturevalue("seaweed_s3")
    return server.storage(prefix=f"test-{uuid.uuid4().hex[:12]}")
