"""Settings: defaults under an absolute home, the environment read, and what child processes get."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.settings import Settings, child_env


def test_settings_defaults_live_under_an_absolute_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("FEDPRUNE_HOME", "FEDPRUNE_STORAGE_URL", "FEDPRUNE_TRACKING_URI", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    home = (tmp_path / ".fedprune").resolve()
    assert settings.home == home
    assert settings.storage_url == (home / "storage").as_uri()
    assert settings.tracking_uri == f"sqlite:///{home / 'mlflow.db'}"
    assert settings.prefect_api_url is None and settings.s3_endpoint_url is None
    assert (settings.prefect_port, settings.mlflow_port, settings.s3_port) == (4200, 5000, 8333)
    assert settings.aws_access_key_id == "fedprune"
    assert "fedprune-secret" not in repr(settings)


def test_settings_read_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPRUNE_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("FEDPRUNE_MLFLOW_PORT", "5123")
    monkeypatch.setenv("FEDPRUNE_STORAGE_URL", "s3://bucket/p")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    settings = Settings()
    assert settings.home == tmp_path / "h" and settings.mlflow_port == 5123
    assert settings.storage_url == "s3://bucket/p" and settings.aws_access_key_id == "from-env"
    assert settings.tracking_uri == f"sqlite:///{tmp_path / 'h' / 'mlflow.db'}"
    with pytest.raises(Exception, match="frozen"):
        settings.mlflow_port = 1  # type: ignore[misc]


def test_children_always_get_prefect_analytics_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    assert child_env({"X": "1"})["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert child_env({"X": "1"})["X"] == "1"
