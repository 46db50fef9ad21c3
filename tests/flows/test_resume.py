"""A run killed with SIGKILL mid-round resumes to the same weights and logs each step once."""

from __future__ import annotations

import json
import signal
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.flows.conftest import Cli
from tests.flows.helpers import final_state, weights_hash

pytestmark = pytest.mark.integration

ROUNDS = 24
ARGS = ("--preset", "toy", "--set", f"schedule.num_rounds={ROUNDS}", "--rounds-per-segment", "8",
        "--checkpoint-every", "3")


def latest_round(cli: Cli, run_id: str) -> int:
    path = cli.home / "storage" / "fedprune" / run_id / "LATEST"
    return json.loads(path.read_text())["round"] if path.exists() else -1


def kill_after_round(cli: Cli, run_id: str, round_num: int) -> None:
    proc = cli.popen("run", *ARGS, "--run-id", run_id)
    deadline = time.monotonic() + 240
    while latest_round(cli, run_id) < round_num and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # land inside a later round, between checkpoints
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_then_resume_matches_uninterrupted(cli: Cli) -> None:
    kill_after_round(cli, "killed", 6)
    stopped_at = latest_round(cli, "killed")
    assert 6 <= stopped_at < ROUNDS
    resumed = cli("resume", "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = cli("run", *ARGS, "--run-id", "whole")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    killed, whole = final_state(cli.home, "killed"), final_state(cli.home, "whole")
    assert killed.round_num == whole.round_num == ROUNDS
    assert weights_hash(killed.weights) == weights_hash(whole.weights)

    client = MlflowClient(f"sqlite:///{cli.home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fedprune").experiment_id],
                              "tags.`fedprune.run_id` = 'killed'")
    assert len(runs) == 1, "resume must reopen the same MLflow run"
    for key in ("train_loss", "sparsity", "round"):
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, key)]
        assert sorted(steps) == list(range(1, ROUNDS + 1)), key


def test_rerunning_with_the_same_run_id_resumes(cli: Cli) -> None:
    kill_after_round(cli, "again", 3)
    rerun = cli("run", *ARGS, "--run-id", "again", "--json")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["resumed"] is True
    assert final_state(cli.home, "again").round_num == ROUNDS


def test_a_run_stored_before_a_config_key_existed_still_resumes(cli: Cli) -> None:
    kill_after_round(cli, "older", 3)
    path = cli.home / "storage" / "fedprune" / "older" / "config.json"
    stored = json.loads(path.read_text())
    del stored["experiment"]["fed_dropout"]["rescale"]  # as written before that key was added
    del stored["experiment"]["prunefl"]["max_density"]
    path.write_text(json.dumps(stored))
    for command in (("resume", "older"), ("run", *ARGS, "--run-id", "older")):
        done = cli(*command)
        assert done.returncode == 0, done.stderr[-3000:]
    assert final_state(cli.home, "older").round_num == ROUNDS
