"""Where FedPrune keeps its data and which services it talks to, read from ``FEDPRUNE_*`` variables.

With nothing set, everything is embedded under ``./.fedprune`` (DESIGN.md, "Services"): storage in
``<home>/storage``, MLflow in ``sqlite:///<home>/mlflow.db``, Prefect's ephemeral API. The local
stack (`infra.stack`) uses the port fields; `stack_env` tells a user what to export to use it.

AWS credentials are read from the usual AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables. The
defaults ("fedprune" / "fedprune-secret") are for the loopback-only local stack; the secret is a
`SecretStr`, so it never shows in a repr or a log line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.errors import redact_url

LOOPBACK = "127.0.0.1"
TRACKING_SCHEMES: tuple[str, ...] = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")
"""URI schemes of MLflow tracking stores (a database scheme may name a driver: ``postgresql+psycopg2``)."""
CHILD_ENV_DEFAULTS: dict[str, str] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}
# Defaults a user may override (none at present). Prefect's per-task lines ("Finished in state
# Completed()", 7+ per round) go to the Prefect API, so each task run's page shows its log, and stay off
# the console (`task_runs_off_console`), where the flow logs one progress line per round; task failures
# and retries (WARNING and above) show in both. Set PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL=WARNING
# to keep the INFO lines out of the API too (one row each in the Prefect server's database).
QUIET_DEFAULTS: dict[str, str] = {}
TASK_RUN_LOGGER = "prefect.task_runs"
"""Prefect's logger of task-run lines (its `get_run_logger()` inside a task)."""


class _TaskRunsOffConsole(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name != TASK_RUN_LOGGER


def task_runs_off_console() -> None:
    """Keep task runs' records below WARNING off the console handlers of the root logger (Prefect's);
    Prefect's API log handler, on the task-run logger itself, still ships them. Idempotent; call it in
    every process that runs tasks (`tasks/__init__.py` does, on import)."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # its console handler, if Prefect has not yet (a task process unpickling its task)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _TaskRunsOffConsole) for f in handler.filters):
            handler.addFilter(_TaskRunsOffConsole())


def apply_quiet_defaults(env: dict[str, str] | os._Environ[str]) -> None:
    """Set `QUIET_DEFAULTS` in `env` where the user has not set them."""
    for key, value in QUIET_DEFAULTS.items():
        env.setdefault(key, value)


class Settings(BaseSettings):
    """Frozen FedPrune settings; every field can be set as ``FEDPRUNE_<FIELD>`` in the environment.

    `load_settings` builds them with one-line errors (the CLI's); every check reads only the environment
    and the file system.

    Attributes:
        home: directory for embedded data (storage, MLflow db, local stack); made absolute; must be a
            directory or one that can be created (no file in its place or above it).
        storage_url: checkpoint storage, ``file:///...`` or ``s3://bucket/prefix``
            (default ``file://<home>/storage``).
        s3_endpoint_url: S3 endpoint for non-AWS stores (http or https), e.g. ``http://127.0.0.1:8333``.
        tracking_uri: MLflow tracking URI (default ``sqlite:///<home>/mlflow.db``), with a scheme of
            `TRACKING_SCHEMES` (a bare word or path is refused).
        prefect_api_url: Prefect API (http or https); None: the CLI's local server (`infra.prefect_api`).
        prefect_port / mlflow_port / s3_port / postgres_port: local stack ports on 127.0.0.1 (PostgreSQL
            holds the stack's Prefect database).
        worker_port: health endpoint of the local stack's Prefect process worker.
        seaweed_master_port / seaweed_volume_port / seaweed_filer_port / seaweed_admin_port: the
            SeaweedFS internals of the local stack; each also uses port + 10000 for gRPC.
        stack_bucket: bucket the local stack creates for checkpoints.
        mlflow_artifacts_bucket: bucket the local stack's MLflow server stores artifacts in.
        aws_access_key_id / aws_secret_access_key: from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
        outage_budget_s: how long a run waits for unreachable storage, MLflow or Prefect API before
            it stops, resumable (`infra.outage`); ``fedprune run/resume --outage-budget`` sets it.
        prefect_keep_rounds: the Prefect server keeps every task run of at least this many recent rounds
            of a run; older segments are deleted from it (`infra.prefect_retention`); 0 keeps all.
    """

    model_config = SettingsConfigDict(
        env_prefix="FEDPRUNE_", frozen=True, extra="ignore", validate_by_name=True
    )

    home: Path = Path(".fedprune")
    storage_url: str = ""
    s3_endpoint_url: str | None = None
    tracking_uri: str = ""
    prefect_api_url: str | None = None
    prefect_port: int = Field(default=4200, ge=1, le=65535)
    mlflow_port: int = Field(default=5000, ge=1, le=65535)
    postgres_port: int = Field(default=5432, ge=1, le=65535)
    worker_port: int = Field(default=4210, ge=1, le=65535)
    s3_port: int = Field(default=8333, ge=1, le=55535)
    seaweed_master_port: int = Field(default=9333, ge=1, le=55535)
    seaweed_volume_port: int = Field(default=9340, ge=1, le=55535)
    seaweed_filer_port: int = Field(default=8888, ge=1, le=55535)
    seaweed_admin_port: int = Field(default=23646, ge=1, le=55535)
    stack_bucket: str = "fedprune"
    mlflow_artifacts_bucket: str = "mlflow-artifacts"
    aws_access_key_id: str = Field(
        default="fedprune", validation_alias=AliasChoices("AWS_ACCESS_KEY_ID", "aws_access_key_id")
    )
    aws_secret_access_key: SecretStr = Field(
        default=SecretStr("fedprune-secret"),
        validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
    )
    outage_budget_s: float = Field(default=300.0, ge=0)
    prefect_keep_rounds: int = Field(default=100, ge=0)

    @field_validator("home", mode="after")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        home = home.expanduser().resolve()
        existing = next(p for p in (home, *home.parents) if p.exists())
        if not existing.is_dir():
            raise ValueError(
                f"FEDPRUNE_HOME={str(home)!r} must be a directory (or one to create), but {existing} is a file: "
                "point FEDPRUNE_HOME at a directory"
            )
        return home

    @field_validator("tracking_uri", mode="after")
    @classmethod
    def _tracking_scheme(cls, uri: str) -> str:
        if urlsplit(uri).scheme.split("+")[0] not in TRACKING_SCHEMES:
            raise ValueError(
                f"FEDPRUNE_TRACKING_URI={redact_url(uri)!r} must be an MLflow tracking URI with a scheme of "
                f"{', '.join(TRACKING_SCHEMES)}: pass e.g. sqlite:////abs/path/mlflow.db or http://127.0.0.1:5000, "
                "or unset it for the embedded store"
            )
        return uri

    @field_validator("s3_endpoint_url", mode="after")
    @classmethod
    def _s3_endpoint(cls, url: str | None) -> str | None:
        if url is not None:
            check_http_url("FEDPRUNE_S3_ENDPOINT_URL", url, "http://127.0.0.1:8333")
        return url

    @field_validator("prefect_api_url", mode="after")
    @classmethod
    def _prefect_api(cls, url: str | None) -> str | None:
        if url is not None:
            check_http_url("FEDPRUNE_PREFECT_API_URL", url, "http://127.0.0.1:4200/api")
        return url

    @model_validator(mode="before")
    @classmethod
    def _derived_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        home = Path(data.get("home") or ".fedprune").expanduser().resolve()
        if not data.get("storage_url"):
            data = {**data, "storage_url": (home / "storage").as_uri()}
        if not data.get("tracking_uri"):
            data = {**data, "tracking_uri": f"sqlite:///{home / 'mlflow.db'}"}
        return data

    @property
    def stack_dir(self) -> Path:
        """``<home>/stack``: pid files, logs and data of the local stack."""
        return self.home / "stack"


def check_http_url(name: str, url: str, example: str) -> None:
    """Raise ValueError naming `name`, unless `url` is ``http(s)://host[:port][/path]`` (credentials redacted)."""
    parts = urlsplit(url)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # not a number, or out of range
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ValueError(
            f"{name}={redact_url(url)!r} must be an http(s) URL with a host and a valid port: pass e.g. {example}, "
            "or unset it"
        )


def load_settings(**values: Any) -> Settings:
    """`Settings(**values)`, whose errors are one line that names the variable, its value and the fix.

    Raises:
        ValueError: the first invalid setting (secrets are never shown).
    """
    try:
        return Settings(**values)
    except ValidationError as error:
        raise ValueError(_one_line(error)) from None


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    message = str(first["msg"])
    if message.startswith("Value error, "):  # our own validators name the variable
        return message.removeprefix("Value error, ")
    field = str(first["loc"][0]) if first["loc"] else "settings"
    name = field if field.isupper() else f"FEDPRUNE_{field.upper()}"
    shown = "***" if "secret" in field.lower() else repr(first.get("input"))
    return f"{name}={shown} is invalid ({message}): set a valid value or unset it"


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process: this process's env, analytics off, plus `extra`.

    Args:
        extra: variables to set (they win over the inherited ones).

    Returns:
        A fresh dict; ``PREFECT_SERVER_ANALYTICS_ENABLED=false`` is always in it, `QUIET_DEFAULTS`
        unless set.
    """
    env = {**os.environ, **(extra or {})}
    env.update(CHILD_ENV_DEFAULTS)
    apply_quiet_defaults(env)
    return env
