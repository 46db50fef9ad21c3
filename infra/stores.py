"""Where runs are kept and how to browse them: one store at a time, named by the CLI.

FedPrune keeps a run in one storage (checkpoints) and one MLflow tracking store, chosen by the
environment (`infra.settings`):
- **embedded** (nothing set): ``file://<home>/storage`` and ``sqlite:///<home>/mlflow.db``; MLflow's
  UI for it is ``mlflow ui --backend-store-uri sqlite:///<home>/mlflow.db``;
- **the local stack** (after ``source <home>/stack/env``): its S3 bucket and its MLflow server,
  whose URL is its UI; any other configured store likewise.
The two hold different runs. `describe` says which one is in use and how to see the other.

No heavy import here: `fedprune runs list` uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from infra.errors import redact_url
from infra.settings import Settings, load_settings

MLFLOW_UI_PORT = 5000
"""`mlflow ui`'s own default port; a run's summary picks the next free one when it is taken."""


@dataclass(frozen=True)
class Store:
    """The storage and tracking store a command uses.

    Attributes:
        storage_url: where checkpoints go.
        tracking_uri: the MLflow tracking store (credentials redacted).
        embedded: both are the defaults under FEDPRUNE_HOME.
    """

    storage_url: str
    tracking_uri: str
    embedded: bool


def store_of(settings: Settings) -> Store:
    """The store `settings` name."""
    defaults = load_settings(home=settings.home, storage_url="", tracking_uri="")
    embedded = (settings.storage_url, settings.tracking_uri) == (defaults.storage_url, defaults.tracking_uri)
    return Store(settings.storage_url, redact_url(settings.tracking_uri), embedded)


def tracking_is_server(tracking_uri: str) -> bool:
    """Whether `tracking_uri` is an MLflow server (which serves its own UI)."""
    return urlsplit(tracking_uri).scheme in ("http", "https")


def mlflow_ui_command(tracking_uri: str, port: int = MLFLOW_UI_PORT) -> str | None:
    """The command that serves MLflow's UI over a tracking store that is not a server (None for a server)."""
    if tracking_is_server(tracking_uri):
        return None
    return f"mlflow ui --backend-store-uri {redact_url(tracking_uri)} --port {port}"


def mlflow_ui_url(tracking_uri: str, port: int = MLFLOW_UI_PORT) -> str:
    """MLflow's UI: the server's own URL, or where `mlflow_ui_command` serves it."""
    if tracking_is_server(tracking_uri):
        return redact_url(tracking_uri).rstrip("/")
    return f"http://127.0.0.1:{port}"


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str, port: int = MLFLOW_UI_PORT) -> str:
    """The page of an MLflow run in `mlflow_ui_url`."""
    return f"{mlflow_ui_url(tracking_uri, port)}/#/experiments/{experiment_id}/runs/{run_id}"


def free_ui_port() -> int:
    """`MLFLOW_UI_PORT` when no server holds it (the local stack's MLflow may), else the next free port."""
    from infra.stack import port_free  # the stack's modules: not for `fedprune runs list`

    return next(p for p in range(MLFLOW_UI_PORT, MLFLOW_UI_PORT + 100) if port_free(p))


def mlflow_pages(tracking_uri: str, experiment_id: str, run_id: str) -> dict[str, str | None]:
    """A run summary's MLflow entries: ``mlflow_run_id``, ``tracking_uri`` (redacted), ``mlflow_run_url``
    and ``mlflow_ui_command`` (None for a server; else it serves the page, on a port free now)."""
    port = MLFLOW_UI_PORT if tracking_is_server(tracking_uri) else free_ui_port()
    return {"mlflow_run_id": run_id, "tracking_uri": redact_url(tracking_uri),
            "mlflow_run_url": mlflow_run_url(tracking_uri, experiment_id, run_id, port),
            "mlflow_ui_command": mlflow_ui_command(tracking_uri, port)}


def describe(settings: Settings) -> list[str]:
    """Two lines: the store in use, and how to see the other one."""
    store = store_of(settings)
    kind = "embedded store" if store.embedded else "configured store"
    lines = [f"{kind}: checkpoints in {store.storage_url}, MLflow at {store.tracking_uri}"]
    if store.embedded:
        env = settings.stack_dir / "env"
        lines.append(f"the local stack keeps its own runs: `source {env}` to use them (after `fedprune stack up`)")
    else:
        lines.append("the embedded store keeps its own runs: "
                     "`FEDPRUNE_STORAGE_URL= FEDPRUNE_TRACKING_URI= fedprune runs list` to see them")
    return lines
