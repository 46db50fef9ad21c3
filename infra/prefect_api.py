"""Which Prefect API a CLI run talks to, and waiting for it when it went away.

Prefect 3.8.8's ephemeral API (a temporary server inside the flow's process) logs
`CancelledError` tracebacks from its task-run recorder when it shuts down after a flow, and
events still queued then are lost. So when no API is configured, the CLI starts the local
stack's Prefect server on demand (loopback, `<home>/stack/`) and leaves it running: runs are
recorded completely, browsable at its UI, and later runs start at once; runs launched together
start it once. `fedprune stack down` stops it. It keeps its database in SQLite under
``<home>/prefect``; `fedprune stack up` replaces it with the stack's server on PostgreSQL
(`infra.stack.postgres`), which later runs of this home then use.

Another checkout (another FEDPRUNE_HOME) on the same machine may already hold the port
(FEDPRUNE_PREFECT_PORT, 4200 by default):
- when what answers there is a Prefect server, this home shares it (one line on stderr says so):
  one UI shows both homes' runs, and no second server competes for the machine;
- else this home starts its own server on a free loopback port and remembers that port
  (`infra.stack.local_prefect_port`), so its later runs, `stack status` and `stack_env` find it.

When the API goes away mid-run, Prefect's client retries each request for about a minute
(PREFECT_CLIENT_MAX_RETRIES, 2-4-8-16-32 s; a refused connection only on a client that had
connected before); past that the flow run fails. The CLI then waits for the API within the outage
budget (`wait_for_prefect_api`) and runs the experiment again with the same run id, which resumes
it from its last checkpoint. The on-demand server is ours: if its process died, nobody else will
start it, so the wait starts it again (same port, same database). A configured API is only waited for.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

from infra.outage import is_outage, ride_through
from infra.settings import Settings, check_http_url
from infra.stack import (
    ServiceSpec,
    _http_ok,
    answers_as_prefect,
    free_loopback_port,
    local_prefect_port,
    port_free,
    prefect_spec,
    read_pid,
    remember_prefect_port,
    running_or_started,
    service_lock,
    stack_specs,
    start_service,
    stop_service,
    wait_healthy,
)


def api_is_ours(settings: Settings) -> bool:
    """Whether no Prefect API is configured, so the CLI runs its own on-demand server."""
    return not (os.environ.get("PREFECT_API_URL") or settings.prefect_api_url)


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def ensure_prefect_api(settings: Settings, say: Callable[[str], None] = _to_stderr) -> str:
    """The Prefect API URL to use, starting (or sharing) a local Prefect server if none is configured.

    Sets PREFECT_API_URL in this process's environment (before any flow runs).

    Args:
        settings: this home's settings.
        say: shows the one line that says which server is used when it is not this home's own
            on its configured port.

    Raises:
        ValueError: PREFECT_API_URL is not an http(s) URL.
        StackError: the local server does not start (names its log).
    """
    url = os.environ.get("PREFECT_API_URL") or settings.prefect_api_url
    if url:
        check_http_url("PREFECT_API_URL", url, "http://127.0.0.1:4200/api")
    else:
        url = f"{_local_server(settings, say)}/api"
    os.environ["PREFECT_API_URL"] = url
    return url


def _local_server(settings: Settings, say: Callable[[str], None]) -> str:
    """The URL of this home's Prefect server (started now if not running), or of the Prefect server on its port."""
    run_dir = settings.stack_dir
    spec = _own_spec(settings)
    with service_lock(run_dir, spec.name):
        pid = read_pid(run_dir, spec.name)
        port = spec.ports[0]
        if pid is None and not port_free(port):
            if answers_as_prefect(spec.url):
                say(f"Prefect: using the server already at {spec.url} (not started from {settings.home}): "
                    "this run is recorded there")
                return spec.url
            spec = prefect_spec(spec.workdir, free_loopback_port())
            where = remember_prefect_port(settings, spec.ports[0])
            say(f"Prefect: port {port} is taken by something that is not a Prefect server: this home's server "
                f"runs at {spec.url} instead (remembered in {where})")
        if pid is None:
            pid = start_service(spec, run_dir)
    wait_healthy(spec, pid, run_dir)
    return spec.url


@contextlib.contextmanager
def prefect_api_for_script(settings: Settings) -> Iterator[str]:
    """`ensure_prefect_api` for a script (a benchmark): yields the API URL; on exit flushes the
    script's Prefect logs and stops the local server if this call started it."""
    started = read_pid(settings.stack_dir, "prefect") is None and not os.environ.get("PREFECT_API_URL")
    url = ensure_prefect_api(settings)
    try:
        yield url
    finally:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()
        if started:
            stop_service(settings.stack_dir, "prefect")


def _own_spec(settings: Settings) -> ServiceSpec:
    """This home's Prefect server: the stack's (on PostgreSQL) while the stack's database runs, else
    the on-demand one (SQLite under ``<home>/prefect``)."""
    if read_pid(settings.stack_dir, "postgres") is not None:
        return stack_specs(settings)["prefect"]
    return prefect_spec(settings.home / "prefect", local_prefect_port(settings))


def _answers(url: str) -> bool:
    return _http_ok(f"{url.rstrip('/')}/health", timeout_s=2.0)


def prefect_api_lost(error: BaseException, url: str) -> bool:
    """Whether a failed flow run failed because the Prefect API at `url` went away: its error is an
    outage of the API (refused, reset, timed out, 5xx), or the API does not answer now."""
    return is_outage(error, "prefect") or not _answers(url)


def wait_for_prefect_api(settings: Settings, url: str, ours: bool, budget_s: float) -> None:
    """Wait, with backoff, until the Prefect API at `url` answers ``/health``.

    Args:
        settings: where the on-demand server lives.
        url: the API, e.g. ``http://127.0.0.1:4200/api``.
        ours: the API is the on-demand local server (`api_is_ours`): start it again if its process died.
        budget_s: the outage budget.

    Raises:
        OutageError: it did not answer within `budget_s`.
    """
    spec = _own_spec(settings) if ours else None

    def answers() -> None:
        if spec is not None:
            running_or_started(spec, settings.stack_dir)  # a no-op while its process lives
        if not _answers(url):
            raise ConnectionError(f"{url}/health does not answer")

    ride_through(f"Prefect API {url}", answers, budget_s, "prefect")
