"""Which Prefect API a CLI run talks to, and waiting for it when it went away.

Prefect 3.8.8's ephemeral API (a temporary server inside the flow's process) logs
`CancelledError` tracebacks from its task-run recorder when it shuts down after a flow, and
events still queued then are lost. So when no API is configured, the CLI starts the local
stack's Prefect server on demand (loopback, `<home>/stack/`) and leaves it running: runs are
recorded completely, browsable at its UI, and later runs start at once; runs launched together
start it once. `fedprune stack down` stops it.

When the API goes away mid-run, Prefect's client retries each request for about a minute
(PREFECT_CLIENT_MAX_RETRIES, 2-4-8-16-32 s; a refused connection only on a client that had
connected before); past that the flow run fails. The CLI then waits for the API within the outage
budget (`wait_for_prefect_api`) and runs the experiment again with the same run id, which resumes
it from its last checkpoint. The on-demand server is ours: if its process died, nobody else will
start it, so the wait starts it again (same port, same database). A configured API is only waited for.
"""

from __future__ import annotations

import os

from infra.outage import is_outage, ride_through
from infra.settings import Settings
from infra.stack import _http_ok, running_or_started, stack_specs, wait_healthy


def api_is_ours(settings: Settings) -> bool:
    """Whether no Prefect API is configured, so the CLI runs its own on-demand server."""
    return not (os.environ.get("PREFECT_API_URL") or settings.prefect_api_url)


def ensure_prefect_api(settings: Settings) -> str:
    """The Prefect API URL to use, starting the local Prefect server if none is configured.

    Sets PREFECT_API_URL in this process's environment (before any flow runs).
    """
    url = os.environ.get("PREFECT_API_URL") or settings.prefect_api_url
    if not url:
        spec = stack_specs(settings)["prefect"]
        pid = running_or_started(spec, settings.stack_dir)
        wait_healthy(spec, pid, settings.stack_dir)
        url = f"{spec.url}/api"
    os.environ["PREFECT_API_URL"] = url
    return url


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
    spec = stack_specs(settings)["prefect"] if ours else None

    def answers() -> None:
        if spec is not None:
            running_or_started(spec, settings.stack_dir)  # a no-op while its process lives
        if not _answers(url):
            raise ConnectionError(f"{url}/health does not answer")

    ride_through(f"Prefect API {url}", answers, budget_s, "prefect")
