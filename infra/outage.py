"""Riding through outages of the services a run needs: S3 storage, MLflow, the Prefect API.

DESIGN.md, "Faults": storage, tracking and the Prefect API are waited for with backoff, within an
outage budget. `ride_through(what, call, budget_s, service)` calls `call`; when it fails with an
error that `is_outage` counts as an outage of `service` (connection refused or reset, a timeout,
HTTP 5xx, S3 SlowDown), it logs a waiting line, sleeps (1 s doubling to 30 s, +-20 % jitter, which
affects no result) and calls again, until `call` succeeds or the service has been unreachable for
`budget_s`: then it raises `OutageError`, which the CLI turns into one line with the resume
command. Any other error (HTTP 403, NoSuchKey, a bad request) is raised at once.

One clock per service and process: every thread waiting for the same `what` counts from the
first failure, one waiting line is logged for all of them every `LOG_EVERY_S` at most, and a call
that fails after the budget is spent (a task retried by Prefect, say) gives up at once.

The table `OUTAGE_RULES` says, per service, which errors are outages. A wrapped error is judged by
the first link of its chain (``__cause__`` / ``__context__``) that a rule knows: MLflow's client,
for one, wraps a refused connection in a plain `MlflowException`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from infra.errors import InfraError

T = TypeVar("T")
FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
JITTER = 0.2
LOG_EVERY_S = 5.0
_BUSY_STATUSES = frozenset({408, 429})  # besides every 5xx
_S3_BUSY_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                            "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"})

logger = logging.getLogger("fedprune.outage")

Verdict = bool | None
"""True: an outage; False: a real error; None: this rule does not know the error."""


class OutageError(InfraError):
    """A service stayed unreachable for longer than the outage budget.

    Attributes:
        what: the service, e.g. ``"storage s3://fedprune/team"`` (no credentials).
        since: wall-clock time of the first failure (``time.time()``).
        waited_s: seconds from the first failure to giving up.
        budget_s: the outage budget.
        last_error: a one-line summary of the last failure.
    """

    def __init__(self, what: str, since: float, waited_s: float, budget_s: float, last_error: str) -> None:
        self.what, self.since, self.waited_s, self.budget_s = what, since, waited_s, budget_s
        self.last_error = last_error
        super().__init__(
            f"{what} was unreachable for {waited_s:.0f} s (since {_clock(since)}; last error: {last_error}), "
            f"longer than the outage budget of {budget_s:.0f} s: bring it back, or raise the budget "
            "(--outage-budget or FEDPRUNE_OUTAGE_BUDGET_S)"
        )

    def __reduce__(self) -> tuple[type[OutageError], tuple[str, float, float, float, str]]:
        # Crosses process boundaries (process and Dask task runners) with its fields.
        return (OutageError, (self.what, self.since, self.waited_s, self.budget_s, self.last_error))


# --------------------------------------------------------------------------- classification


def _status_is_outage(status: int | None) -> Verdict:
    return None if status is None else status >= 500 or status in _BUSY_STATUSES


def _network(error: BaseException) -> Verdict:
    """Python's own: refused, reset, broken pipe, timeouts; a TLS failure is a real error."""
    import ssl

    if isinstance(error, ssl.SSLError):
        return False
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    return None


def _s3(error: BaseException) -> Verdict:
    """botocore: no connection, a dropped one, timeouts; server errors, SlowDown and throttling."""
    from botocore import exceptions as boto

    if isinstance(error, boto.SSLError | boto.ProxyConnectionError):
        return False
    transport = (boto.EndpointConnectionError, boto.ConnectionClosedError, boto.ConnectTimeoutError,
                 boto.ReadTimeoutError, boto.ResponseStreamingError, boto.IncompleteReadError)
    if isinstance(error, transport):
        return True
    if isinstance(error, boto.ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in _S3_BUSY_CODES or bool(_status_is_outage(status))
    return None


def _mlflow(error: BaseException) -> Verdict:
    """MLflow's client (requests): no connection, timeouts, retries of a 5xx exhausted, a 5xx answer."""
    import requests

    if isinstance(error, requests.exceptions.SSLError | requests.exceptions.InvalidURL):
        return False
    transport = (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                 requests.exceptions.ChunkedEncodingError, requests.exceptions.RetryError)
    if isinstance(error, transport):
        return True
    if isinstance(error, requests.exceptions.HTTPError) and error.response is not None:
        return _status_is_outage(error.response.status_code)
    from mlflow.exceptions import RestException  # only reached once MLflow raised, so it is imported

    if isinstance(error, RestException):
        return bool(_status_is_outage(error.get_http_status_code()))
    return None


def _prefect(error: BaseException) -> Verdict:
    """Prefect's client (httpx): no connection, a dropped one, timeouts; a 5xx answer."""
    import httpx

    if isinstance(error, httpx.NetworkError | httpx.TimeoutException | httpx.RemoteProtocolError):
        return True
    if isinstance(error, httpx.HTTPStatusError):
        return _status_is_outage(error.response.status_code)
    return None


OUTAGE_RULES: dict[str, tuple[Callable[[BaseException], Verdict], ...]] = {
    "s3": (_s3, _network),
    "mlflow": (_mlflow, _network),
    "prefect": (_prefect, _network),
}
"""Per service, the rules that tell an outage from a real error, asked in order."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def is_outage(error: BaseException, service: str) -> bool:
    """Whether `error` means `service` is unreachable for now (wait), rather than a real error (raise).

    Args:
        error: what the call raised.
        service: a key of `OUTAGE_RULES`: ``"s3"``, ``"mlflow"`` or ``"prefect"``.

    Returns:
        The verdict of the first link of the error's chain that one of the service's rules knows;
        False when none does.
    """
    if service not in OUTAGE_RULES:
        raise ValueError(f"service={service!r} has no outage rules: use one of {', '.join(OUTAGE_RULES)}")
    for link in _chain(error):
        for rule in OUTAGE_RULES[service]:
            verdict = rule(link)
            if verdict is not None:
                return verdict
    return False


def find_outage(error: BaseException) -> OutageError | None:
    """The `OutageError` in `error`'s chain (a task's or flow's failure wraps it), if any."""
    return next((link for link in _chain(error) if isinstance(link, OutageError)), None)


# --------------------------------------------------------------------------- waiting


@dataclass
class _Down:
    """One service's current outage: since when (wall clock and monotonic), when it was last logged."""

    since: float
    start: float
    logged: float = float("-inf")


_down: dict[str, _Down] = {}
_lock = threading.Lock()


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall))


def _summary(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:160]}"


def _mark_down(what: str) -> _Down:
    with _lock:
        return _down.setdefault(what, _Down(time.time(), time.monotonic()))


def _mark_up(what: str) -> None:
    with _lock:
        down = _down.pop(what, None)
    if down is not None and down.logged > float("-inf"):
        logger.warning("%s answers again after %.0f s", what, time.monotonic() - down.start)


def _log_waiting(what: str, down: _Down, waited_s: float, budget_s: float, error: BaseException) -> None:
    with _lock:
        if time.monotonic() - down.logged < LOG_EVERY_S:
            return
        down.logged = time.monotonic()
    logger.warning("waiting for %s (unreachable since %s, %.0f s; budget %.0f s): %s",
                   what, _clock(down.since), waited_s, budget_s, _summary(error))


def backoff_delays(first_s: float = FIRST_DELAY_S, max_s: float = MAX_DELAY_S) -> Iterator[float]:
    """Pauses between tries: `first_s` doubling up to `max_s`, each +-`JITTER` at random."""
    delay = first_s
    while True:
        yield delay * random.uniform(1 - JITTER, 1 + JITTER)
        delay = min(2 * delay, max_s)


def ride_through(what: str, call: Callable[[], T], budget_s: float, service: str) -> T:
    """Call `call`, waiting out an outage of `service` for up to `budget_s` seconds.

    Args:
        what: the service as a user knows it, e.g. ``"storage s3://fedprune/team"``; shown in
            the waiting line and the error, and the key of the outage clock. No credentials.
        call: the request; called again after an outage, so it must be idempotent.
        budget_s: seconds from the service's first failure after which to give up (0: no wait).
        service: which `OUTAGE_RULES` classify its errors.

    Returns:
        What `call` returns.

    Raises:
        OutageError: the service was still unreachable `budget_s` after its first failure.
        Exception: any error of `call` that is not an outage, unchanged.
    """
    delays = backoff_delays()
    while True:
        try:
            result = call()
        except Exception as error:
            if not is_outage(error, service):
                raise
            down = _mark_down(what)
            waited = time.monotonic() - down.start
            if waited >= budget_s:
                raise OutageError(what, down.since, waited, budget_s, _summary(error)) from error
            _log_waiting(what, down, waited, budget_s, error)
            time.sleep(min(next(delays), budget_s - waited))  # the last try at the budget's end
        else:
            _mark_up(what)
            return result


def configured_budget_s() -> float:
    """The configured outage budget in seconds (``FEDPRUNE_OUTAGE_BUDGET_S``, default 300)."""
    from infra.settings import Settings

    return Settings().outage_budget_s


class _HideOutageErrors(logging.Filter):
    """Keeps the errors of runs that an outage stopped off the console: the CLI says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None:
            return find_outage(error) is None and not is_outage(error, "prefect")
        return record.levelno < logging.ERROR or OutageError.__name__ not in record.getMessage()


def hide_outage_errors() -> None:
    """Drop, on the console handlers of the root logger (Prefect's), the records of a failure caused by
    an outage: tracebacks of an `OutageError` or a lost Prefect API (each task and flow run prints
    one), and ERROR lines naming an `OutageError` (a task run's failed state). INFO state lines stay;
    other handlers (Prefect's API log handler, which sees records first) are left alone."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _HideOutageErrors) for f in handler.filters):
            handler.addFilter(_HideOutageErrors())
