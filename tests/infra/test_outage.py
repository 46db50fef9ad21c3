"""Outages: which errors are waited for, and how long (`infra.outage`), against real servers where
an error comes from one (a stopped SeaweedFS, a port nobody listens on, a real MLflow server)."""

from __future__ import annotations

import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from infra.errors import StorageKeyError
from infra.outage import (
    FIRST_DELAY_S,
    JITTER,
    MAX_DELAY_S,
    OutageError,
    backoff_delays,
    find_outage,
    is_outage,
    ride_through,
)
from infra.storage import S3Storage, make_s3_client
from tests.servers import MlflowServer, free_port, restartable_seaweed


def _raised(call: Callable[[], Any]) -> BaseException:
    try:
        call()
    except Exception as error:
        return error
    raise AssertionError(f"{call} raised nothing")


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


class Failing:
    """A call that raises `error` for its first `failures` tries, then returns "ok"; counts tries."""

    def __init__(self, error: Exception, failures: int = 10**9) -> None:
        self.error, self.failures, self.tries = error, failures, 0

    def __call__(self) -> str:
        self.tries += 1
        if self.tries <= self.failures:
            raise self.error
        return "ok"


# --------------------------------------------------------------------------- the classifier


@pytest.mark.parametrize(("code", "status", "outage"), [
    ("SlowDown", 503, True), ("ServiceUnavailable", 503, True), ("InternalError", 500, True),
    ("RequestTimeout", 400, True), ("BadGateway", 502, True),
    ("AccessDenied", 403, False), ("NoSuchKey", 404, False), ("InvalidRequest", 400, False),
])
def test_s3_answers_that_are_outages(code: str, status: int, outage: bool) -> None:
    assert is_outage(_client_error(code, status), "s3") is outage


@pytest.mark.integration
def test_a_stopped_seaweedfs_is_an_outage_and_its_real_errors_are_not(tmp_path: Path) -> None:
    with restartable_seaweed(tmp_path / "seaweed") as (s3, service):
        client = s3.client
        missing = _raised(lambda: client.get_object(Bucket=s3.bucket, Key="nothing-here"))
        no_bucket = _raised(lambda: client.get_object(Bucket="no-such-bucket", Key="x"))
        wrong = make_s3_client(s3.endpoint_url, access_key_id=s3.access_key_id, secret_access_key="wrong-secret")
        denied = _raised(lambda: wrong.get_object(Bucket=s3.bucket, Key="x"))
        service.stop()
        refused = _raised(lambda: client.get_object(Bucket=s3.bucket, Key="x"))
    assert [is_outage(e, "s3") for e in (missing, no_bucket, denied)] == [False, False, False]
    assert is_outage(refused, "s3"), repr(refused)
    assert type(refused).__name__ == "EndpointConnectionError"


def test_a_refused_mlflow_connection_is_an_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    refused = _raised(lambda: client.get_experiment_by_name("x"))
    assert isinstance(refused, MlflowException) and is_outage(refused, "mlflow"), repr(refused)
    assert not is_outage(MlflowException("a bug in a store"), "mlflow")


@pytest.mark.integration
def test_real_mlflow_errors_are_not_outages(mlflow_server: MlflowServer) -> None:
    client = MlflowClient(mlflow_server.tracking_uri)
    missing = _raised(lambda: client.get_run("0" * 32))
    bad_filter = _raised(lambda: client.search_runs(["0"], "this is no filter"))
    assert not is_outage(missing, "mlflow") and not is_outage(bad_filter, "mlflow")


def test_prefect_api_errors() -> None:
    refused = _raised(lambda: httpx.get(f"http://127.0.0.1:{free_port()}/api/health", timeout=2))
    request = httpx.Request("GET", "http://127.0.0.1/api/flow_runs")

    def answered(status: int) -> BaseException:
        return _raised(httpx.Response(status, request=request).raise_for_status)

    assert is_outage(refused, "prefect") and is_outage(answered(503), "prefect")
    assert not is_outage(answered(404), "prefect") and not is_outage(answered(422), "prefect")


def test_network_errors_count_for_every_service_but_tls_failures_do_not() -> None:
    for service in ("s3", "mlflow", "prefect"):
        assert is_outage(ConnectionResetError(104, "reset"), service)
        assert is_outage(TimeoutError("timed out"), service)
        assert not is_outage(ssl.SSLCertVerificationError("certificate verify failed"), service)
        assert not is_outage(ValueError("bad input"), service)
    with pytest.raises(ValueError, match="service='ftp' has no outage rules"):
        is_outage(ConnectionError(), "ftp")


def test_a_wrapped_outage_is_judged_by_its_cause() -> None:
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as cause:
            raise RuntimeError("request failed") from cause
    except RuntimeError as error:
        assert is_outage(error, "mlflow")
    stopped = OutageError("storage s3://b", time.time(), 9.0, 8.0, "EndpointConnectionError: ...")
    wrapper = RuntimeError("task failed")
    wrapper.__cause__ = stopped
    assert find_outage(wrapper) is stopped and find_outage(RuntimeError()) is None


# --------------------------------------------------------------------------- waiting


def test_backoff_doubles_from_one_second_to_thirty_with_jitter() -> None:
    delays = backoff_delays()
    got = [next(delays) for _ in range(8)]
    nominal = [1, 2, 4, 8, 16, 30, 30, 30]
    assert FIRST_DELAY_S == 1 and MAX_DELAY_S == 30
    for delay, expected in zip(got, nominal, strict=True):
        assert expected * (1 - JITTER) <= delay <= expected * (1 + JITTER)


def test_ride_through_gives_up_at_the_budget(caplog: pytest.LogCaptureFixture) -> None:
    what = f"test service {uuid.uuid4().hex[:6]}"
    call = Failing(ConnectionRefusedError(111, "Connection refused"))
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, "fedprune.outage"), pytest.raises(OutageError) as info:
        ride_through(what, call, 3.0, "s3")
    elapsed = time.monotonic() - start
    assert 3.0 <= elapsed < 4.0, elapsed
    assert 3 <= call.tries <= 4, call.tries  # at 0 s, ~1 s, ~3 s, and at the budget's end
    error = info.value
    assert error.what == what and error.budget_s == 3.0 and error.waited_s >= 3.0
    assert str(error).startswith(f"{what} was unreachable for 3 s (since ")
    assert "longer than the outage budget of 3 s" in str(error)
    assert error.last_error.startswith("ConnectionRefusedError: [Errno 111] Connection refused")
    waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert waiting and waiting[0].startswith(f"waiting for {what} (unreachable since ")
    assert ", 0 s; budget 3 s): ConnectionRefusedError" in waiting[0]
    # the clock is the service's: another call still meeting the outage gives up at once
    again = Failing(ConnectionRefusedError(111, "Connection refused"))
    with pytest.raises(OutageError):
        ride_through(what, again, 3.0, "s3")
    assert again.tries == 1


def test_ride_through_waits_out_a_short_outage_and_resets_its_clock() -> None:
    what = f"test service {uuid.uuid4().hex[:6]}"
    call = Failing(ConnectionResetError(104, "reset"), failures=2)
    assert ride_through(what, call, 30, "prefect") == "ok" and call.tries == 3
    later = Failing(ConnectionResetError(104, "reset"), failures=1)
    assert ride_through(what, later, 0.5, "prefect") == "ok"  # a new outage, a new clock


def test_real_errors_and_a_zero_budget_are_not_waited_for() -> None:
    what = f"test service {uuid.uuid4().hex[:6]}"
    real = Failing(_client_error("AccessDenied", 403))
    with pytest.raises(ClientError):
        ride_through(what, real, 30, "s3")
    assert real.tries == 1
    outage = Failing(_client_error("SlowDown", 503))
    with pytest.raises(OutageError):
        ride_through(what, outage, 0, "s3")
    assert outage.tries == 1


@pytest.mark.integration
def test_s3_storage_waits_for_a_restarted_seaweedfs(tmp_path: Path) -> None:
    with restartable_seaweed(tmp_path / "seaweed") as (s3, service):
        store = S3Storage(s3.bucket, "ride", endpoint_url=s3.endpoint_url, client=s3.client, outage_budget_s=120)
        store.put_bytes("a", b"before")
        service.stop()
        restart = threading.Timer(3.0, service.start)
        restart.start()
        start = time.monotonic()
        store.put_bytes("b", b"during")  # waits until it is back
        assert store.get_bytes("a") == b"before" and store.get_bytes("b") == b"during"
        assert time.monotonic() - start >= 3.0
        restart.join()
        with pytest.raises(StorageKeyError):  # a real error again: raised at once
            store.get_bytes("nothing-here")


def test_s3_storage_stops_at_its_budget() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = make_s3_client(endpoint, access_key_id="k", secret_access_key="s", max_attempts=1)
    store = S3Storage("fedprune", "p", endpoint_url=endpoint, client=client, outage_budget_s=2)
    start = time.monotonic()
    with pytest.raises(OutageError, match=r"^storage s3://fedprune/p was unreachable for 2 s"):
        store.get_bytes("x")
    assert 2 <= time.monotonic() - start < 4
