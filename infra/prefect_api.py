"""Which Prefect API a CLI run talks to.

Prefect 3.8.8's ephemeral API (a temporary server inside the flow's process) logs
`CancelledError` tracebacks from its task-run recorder when it shuts down after a flow, and
events still queued then are lost. So when no API is configured, the CLI starts the local
stack's Prefect server on demand (loopback, `<home>/stack/`) and leaves it running: runs are
recorded completely, browsable at its UI, and later runs start at once; runs launched together
start it once. `fedprune stack down` stops it.
"""

from __future__ import annotations

import os

from infra.settings import Settings
from infra.stack import running_or_started, stack_specs, wait_healthy


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
