"""The Prefect flow against the in-process reference loop, and its storage and tracking."""

from __future__ import annotations

import json
import re

import pytest
import torch
from mlflow.tracking import MlflowClient

from fedprune_core.presets import preset
from fedprune_core.simulate import simulate
from infra.checkpoint import CheckpointStore
from infra.storage import open_storage
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
    output = done.stdout + done.stderr
    assert "Traceback" not in output
    # Progress: at most one line a round, in order; every evaluation and segment end shown (the
    # toy rounds are too fast for the every-5-seconds lines). Prefect's per-task lines are off.
    shown = [int(r) for r in re.findall(r" - round (\d+)/", output)]
    assert shown == sorted(set(shown))
    cfg = preset("toy")
    assert {r for r in range(1, state.round_num + 1) if r % cfg.federated.eval_every == 0 or r % 5 == 0} <= set(shown)
    assert "Task run '" not in output


def test_flow_logs_every_round_once_with_artifacts(cli: Cli) -> None:
    done = cli("run", "--preset", "toy", "--run-id", "tracked", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
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


@pytest.mark.parametrize("runner", ["processes", "dask"])
def test_other_task_runners_give_the_same_weights(cli: Cli, runner: str) -> None:
    done = cli("run", "--preset", "toy", "--run-id", runner, "--task-runner", runner, "--max-workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert weights_hash(final_state(cli.home, runner).weights) == weights_hash(reference({}))


def test_flow_on_seaweedfs_s3_and_an_mlflow_server(cli: Cli, seaweed_s3, mlflow_server) -> None:  # type: ignore[no-untyped-def]
    env = {**cli.env, **seaweed_s3.env(), "FEDPRUNE_STORAGE_URL": f"s3://{seaweed_s3.bucket}/flows",
           "FEDPRUNE_TRACKING_URI": mlflow_server.tracking_uri}
    done = Cli(cli.home, env)("run", "--preset", "toy", "--run-id", "on-s3")
    assert done.returncode == 0, done.stderr[-3000:]
    state = final_state(seaweed_s3.storage(prefix="flows"), "on-s3")
    assert weights_hash(state.weights) == weights_hash(reference({}))
    assert not (cli.home / "storage").exists()
    client = MlflowClient(mlflow_server.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("fedprune").experiment_id],
                             "tags.`fedprune.run_id` = 'on-s3'")[0]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, preset("toy").schedule.num_rounds + 1))


def test_the_tiny_speech_preset_runs_end_to_end(cli: Cli) -> None:
    """Speech corpus synthesized, Conformer-Transducer pruned, WER logged (`make run`'s own preset: test_demo.py)."""
    done = cli("run", "--preset", "tiny", "--run-id", "speech")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    state = final_state(cli.home, "speech")
    assert state.round_num == preset("tiny").schedule.num_rounds
    client = MlflowClient(f"sqlite:///{cli.home / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("fedprune").experiment_id])[0]
    assert 0.0 <= run.data.metrics["eval_wer"] and "eval_cer" in run.data.metrics
    assert abs(run.data.metrics["sparsity"] - preset("tiny").pruning.sparsity) < 0.01


def test_warm_start_checks_the_model_and_a_run_that_failed_before_round_0_can_be_fixed(cli: Cli) -> None:
    short = ("--set", "schedule.num_rounds=2", "--set", "schedule.sparsify_rounds=1", "--set",
             "schedule.refine_rounds=0")
    source = cli("run", "--preset", "toy", "--run-id", "src", *short)
    assert source.returncode == 0, source.stderr[-3000:]
    wrong = cli("run", "--preset", "tiny", "--run-id", "warm", "--set", "init_from=src", *short)
    assert wrong.returncode != 0
    assert "init_from='src' holds a different model" in wrong.stdout + wrong.stderr
    # Nothing was committed, so the same run id starts again with a corrected configuration.
    fixed = cli("run", "--preset", "toy", "--run-id", "warm", "--set", "init_from=src", *short)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    src, warm = final_state(cli.home, "src"), final_state(cli.home, "warm")
    assert warm.round_num == 2
    storage = open_storage((cli.home / "storage").as_uri())
    start = CheckpointStore(storage, "fedprune", "warm").load(0).tensors["state"]
    assert weights_hash({k[8:]: t for k, t in start.items() if k.startswith("weights/")}) == weights_hash(
        src.weights)
