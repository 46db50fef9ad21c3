"""Every prefect.yaml deployment imports, binds to its flow's signature, and builds a valid config."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml

from fedprune_core.presets import preset
from infra.runs import RunOptions

ROOT = Path(__file__).parents[2]
DEPLOYMENTS = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_deployment_binds_to_flow(deployment: dict) -> None:
    module_path, _, name = deployment["entrypoint"].partition(":")
    flow = getattr(importlib.import_module(module_path.removesuffix(".py").replace("/", ".")), name)
    params = deployment.get("parameters", {})
    bound = inspect.signature(flow.fn).bind(**params)
    bound.apply_defaults()
    flow.validate_parameters(params)
    preset(bound.arguments["preset"], bound.arguments["overrides"])
    RunOptions(*(bound.arguments[k] for k in ("rounds_per_segment", "checkpoint_every", "keep_last", "keep_every",
                                              "task_runner", "max_workers", "dask_address", "insecure")))
    assert deployment["work_pool"]["name"] == "fedprune-process"
