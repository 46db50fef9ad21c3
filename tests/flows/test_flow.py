"""The Prefect flow against the in-process reference loop, and its storage and tracking."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from fedprune_core.presets import preset
from fedprune_core.simulate import simulate
from infra.workloads import load
from tests.flows.conftest import Cli
from tests.flows.helpers import final_state, weights_hash

pytestmark = pytest.mark.integration


def reference(overrides: dict) -> dict[str, torch.Tensor]:
    config = preset("toy", overrides)
    data = load(config.model, config.corpus, config.seed, "unused")
    return simulate(data.workload, data.clients, config, data.eval_examples).state.weights


@pytest.mark.parametrize("strategy", ["fedprune", "fedavg"])
def test_flow_final_weights_equal_simulate(cli: Cli, strategy: str) -> None:
    overrides = {"strategy": strategy}
    done = cli("run", "--preset", "toy", "--run-id", "eq", "--set", f"strategy={strategy}",
               "--rounds-per-segment", "5", "--checkpoint-every", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    state = final_state(cli.home, "eq")
    assert state.round_num == preset("toy").schedule.num_rounds
    assert weights_hash(state.weights) == weights_hash(reference(overrides))
    assert "Traceback" not in done.stdout + done.stderr


def test_flow_logs_every_round_once_with_artifacts(cli: Cli) -> None:
    done = cli("run", "--preset", "toy", "--run-id", "tracked")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{"): done.stdout.index("}") + 1])
    client = MlflowClient(f"sqlite:///{cli.home / 'mlflow.db'}")
    rounds = preset("toy").schedule.num_rounds
    for key in ("train_loss", "sparsity", "bytes_down", "bytes_up", "client_time_s_max", "phase"):
        steps = [m.step for m in client.get_metric_history(result["mlflow_run_id"], key)]
        assert sorted(steps) == list(range(1, rounds + 1)), key
    evals = [m.step for m in client.get_metric_history(result["mlflow_run_id"], "eval_accuracy")]
    assert evals == [4, 8, 12]
    artifacts = {a.path for a in client.list_artifacts(result["mlflow_run_id"])}
    assert {"config.json", "sparsity_per_layer.csv", "plots", "model"} <= artifacts
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["pruning.pattern"] == "column"
    assert run.info.status == "FINISHED"
