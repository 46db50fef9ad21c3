"""The cluster over TLS with mutual authentication: certificates from `fedprune cluster certs`, the
same run as tests/flows/test_cluster.py, and parties without the CA's certificate kept out."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dask.config
import pytest

from infra.certs import env_of
from infra.cluster import connect
from infra.errors import ClusterError
from tests.flows.cluster import (
    ROOT,
    Cluster,
    base_env,
    check_run_on_cluster,
    dask_settings,
    flow_cli,
    reference,
    running_cluster,
    start_workers,
)
from tests.servers import S3Server

pytestmark = pytest.mark.integration
__all__ = ["base_env", "reference"]  # fixtures


def make_certs(directory: Path, env: dict[str, str]) -> dict[str, dict[str, str]]:
    """`fedprune cluster certs DIRECTORY`, as a user runs it; role -> the variables of its env file."""
    done = subprocess.run([sys.executable, "-m", "flows.cli", "cluster", "certs", str(directory)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return {role: env_of(directory / f"{role}.env") for role in ("scheduler", "worker", "client")}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory, base_env: dict[str, str]) -> dict[str, dict[str, str]]:
    return make_certs(tmp_path_factory.mktemp("certs"), base_env)


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory, base_env: dict[str, str]) -> dict[str, dict[str, str]]:
    """Certificates of another CA."""
    return make_certs(tmp_path_factory.mktemp("other-certs"), base_env)


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory, base_env: dict[str, str],
                certs: dict[str, dict[str, str]]) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("tls-cluster"), base_env, certs["scheduler"],
                         certs["client"]) as running:
        start_workers(running, certs["worker"])
        yield running


def test_the_run_over_tls_equals_simulate_with_clients_on_their_workers(
    tls_cluster: Cluster, certs: dict[str, dict[str, str]], reference: str, tmp_path: Path,
    base_env: dict[str, str], seaweed_s3: S3Server,
) -> None:
    assert tls_cluster.address.startswith("tls://")
    cli, prefix = flow_cli(tmp_path, {**base_env, **certs["client"]}, seaweed_s3)
    check_run_on_cluster(tls_cluster, cli, prefix, "over-tls", reference, seaweed_s3)


def test_a_worker_without_the_cas_certificate_cannot_join(
    tls_cluster: Cluster, other_certs: dict[str, dict[str, str]]
) -> None:
    intruder = tls_cluster.add_worker("intruder", "0-3", None, other_certs["worker"], "--death-timeout", "10")
    assert intruder.wait(120) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in tls_cluster.log("intruder").read_text()
    assert "TLS handshake failed" in (tls_cluster.base / "scheduler" / "log.txt").read_text()
    assert all("intruder" not in workers for workers in tls_cluster.served().values())


def test_a_client_without_the_cas_certificate_or_without_tls_cannot_connect(
    tls_cluster: Cluster, certs: dict[str, dict[str, str]], other_certs: dict[str, dict[str, str]],
    tmp_path: Path, base_env: dict[str, str], seaweed_s3: S3Server,
) -> None:
    with dask.config.set(dask_settings(other_certs["client"])):
        with pytest.raises(ClusterError, match="cannot reach the Dask scheduler"):
            with connect(tls_cluster.address, timeout_s=5):
                pass
    plain = tls_cluster.address.replace("tls://", "tcp://")
    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler"):
        with connect(plain, timeout_s=5):
            pass
    # The same, as a user meets it: `fedprune run` stops before round 1 and says why.
    cli, _ = flow_cli(tmp_path, {**base_env, **other_certs["client"]}, seaweed_s3)
    done = cli("run", "--preset", "tiny", "--run-id", "outsider", "--task-runner", "dask", "--dask-address",
               tls_cluster.address)
    assert done.returncode != 0
    assert f"cannot reach the Dask scheduler at '{tls_cluster.address}'" in done.stderr
