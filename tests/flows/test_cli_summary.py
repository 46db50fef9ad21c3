"""The end of a run: its summary on stdout (one JSON object with --json, logs on stderr), and the run
named, tagged and linked across Prefect and MLflow, read back from the real servers."""

from __future__ import annotations

import json
import re
import subprocess
import time
from typing import Any

import httpx
import pytest
from mlflow.tracking import MlflowClient

from flows.experiment import PREFECT_ID_TAG, PREFECT_URL_TAG
from flows.summary import FIELDS
from infra.tracking import RUN_ID_TAG
from tests.flows.conftest import Cli, cli_for
from tests.flows.helpers import final_state

pytestmark = pytest.mark.integration

ROUNDS = 12  # the toy preset's
ROUND_TASK = re.compile(r"r\d{6}-(score|mask|dispatch|client-train-c[\d,-]+|aggregate|evaluate|checkpoint)")


@pytest.fixture(scope="module")
def summed(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> tuple[Cli, subprocess.CompletedProcess[str]]:
    """One toy run with --json, shared by the tests that read it back."""
    cli = cli_for(tmp_path_factory.mktemp("summary") / "home", prefect_api)
    done = cli("run", "--preset", "toy", "--run-id", "summed", "--set", "target=0.0", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    return cli, done


def api_post(api: str, path: str, body: dict[str, Any]) -> Any:
    response = httpx.post(f"{api}/{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def recorded(fetch: Any, ready: Any, timeout: float = 60) -> Any:
    """What `fetch` returns once `ready` holds of it: the server records task runs and their logs from
    events, seconds after the run that sent them ended."""
    deadline = time.monotonic() + timeout
    while not ready(got := fetch()) and time.monotonic() < deadline:
        time.sleep(1)
    return got


def test_json_is_all_stdout_holds_every_field_and_counts_against_dense(
        summed: tuple[Cli, subprocess.CompletedProcess[str]]) -> None:
    cli, done = summed
    summary = json.loads(done.stdout)  # the whole of stdout: one object, nothing else
    assert set(summary) == set(FIELDS)
    assert "Beginning flow run 'summed'" in done.stderr  # the logs went to stderr
    assert (summary["run_id"], summary["status"], summary["rounds"], summary["rounds_run"]) == (
        "summed", "finished", ROUNDS, ROUNDS)
    assert (summary["strategy"], summary["preset"], summary["resumed"]) == ("fedprune", "toy", False)
    assert summary["wer"] is None and summary["cer"] is None  # the toy workload measures accuracy
    client = MlflowClient(f"sqlite:///{cli.home / 'mlflow.db'}")
    logged = client.get_run(summary["mlflow_run_id"]).data.metrics
    assert summary["evaluation"] == {k: v for k, v in logged.items() if k.startswith("eval_")}
    # dense, counted from the final checkpoint's float32 weights
    weights = final_state(cli.home, "summed").weights
    assert summary["dense_parameters"] == sum(t.numel() for t in weights.values() if t.is_floating_point())
    assert summary["dense_bytes_per_round"] == sum(t.numel() * t.element_size() for t in weights.values())
    assert 0.4 < summary["client_parameters_vs_dense"] < 0.7  # sparsity 0.5 of the prunable weights
    assert summary["client_parameters_vs_dense"] == summary["client_parameters"] / summary["dense_parameters"]
    for way in ("down", "up"):
        sent = sum(m.value for m in client.get_metric_history(summary["mlflow_run_id"], f"bytes_{way}"))
        per_round = sent / sum(m.value for m in client.get_metric_history(summary["mlflow_run_id"], "clients_done"))
        assert summary[f"bytes_{way}_per_round"] == pytest.approx(per_round)
        assert 0.3 < summary[f"bytes_{way}_vs_dense"] < 1.0
    assert 0 < summary["time_s"] < 600
    assert summary["storage_url"] == (cli.home / "storage").as_uri()


def test_flops_and_target_are_read_back_from_the_logged_rounds(
        summed: tuple[Cli, subprocess.CompletedProcess[str]]) -> None:
    cli, done = summed
    summary = json.loads(done.stdout)
    client = MlflowClient(f"sqlite:///{cli.home / 'mlflow.db'}")

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(summary["mlflow_run_id"], key)}

    flops, dense = history("client_flops"), history("dense_flops")
    assert sorted(flops) == sorted(dense) == [4, 8, 12]  # the evaluated rounds (eval_every 4)
    assert summary["flops_vs_dense"] == pytest.approx(sum(flops.values()) / sum(dense.values()))
    assert summary["flops_vs_dense"] < 0.9  # column pruning slices the Linear layers: smaller products
    # target 0.0 accuracy: reached at the first evaluation, round 4; time and bytes of rounds 1-4
    assert (summary["target"], summary["target_metric"], summary["target_round"]) == (0.0, "eval_accuracy", 4)
    times, down, up = history("client_time_s_max"), history("bytes_down"), history("bytes_up")
    assert summary["target_client_time_s"] == pytest.approx(sum(times[r] for r in range(1, 5)))
    assert summary["target_client_bytes"] == sum(down[r] + up[r] for r in range(1, 5))


def test_the_embedded_store_says_how_to_browse_it(summed: tuple[Cli, subprocess.CompletedProcess[str]]) -> None:
    cli, done = summed
    summary = json.loads(done.stdout)
    db = f"sqlite:///{cli.home / 'mlflow.db'}"
    port = re.fullmatch(rf"mlflow ui --backend-store-uri {re.escape(db)} --port (\d+)", summary["mlflow_ui_command"])
    assert port is not None
    assert summary["mlflow_run_url"] == (f"http://127.0.0.1:{port.group(1)}/#/experiments/"
                                         f"{MlflowClient(db).get_run(summary['mlflow_run_id']).info.experiment_id}"
                                         f"/runs/{summary['mlflow_run_id']}")
    assert summary["tracking_uri"] == db


def test_prefect_names_tags_and_artifact_and_mlflow_links_read_back(
        summed: tuple[Cli, subprocess.CompletedProcess[str]], prefect_api: str) -> None:
    cli, done = summed
    summary = json.loads(done.stdout)
    labels = {"run:summed", "strategy:fedprune", "preset:toy", "experiment:fedprune"}
    parent = httpx.get(f"{prefect_api}/flow_runs/{summary['prefect_flow_run_id']}", timeout=30).json()
    assert parent["name"] == "summed" and labels <= set(parent["tags"])
    assert summary["prefect_flow_run_url"].endswith(f"/runs/flow-run/{parent['id']}")
    tagged = api_post(prefect_api, "flow_runs/filter", {"flow_runs": {"tags": {"all_": ["run:summed"]}}})
    (segment,) = [f for f in tagged if f["id"] != parent["id"]]
    assert segment["name"] == f"summed-rounds-1-{ROUNDS}" and labels <= set(segment["tags"])

    def segment_tasks() -> list[dict[str, Any]]:
        return api_post(prefect_api, "task_runs/filter", {"flow_runs": {"id": {"any_": [segment["id"]]}}, "limit": 200})

    recorded(segment_tasks, lambda got: f"r{ROUNDS:06d}-aggregate" in {t["name"] for t in got})
    time.sleep(2)  # a round's events arrive together; let its last ones land
    tasks = segment_tasks()
    names = {t["name"] for t in tasks}
    for r in range(1, ROUNDS + 1):  # every round's dispatch, client-train (one task or more) and aggregate
        assert {f"r{r:06d}-dispatch", f"r{r:06d}-aggregate"} <= names
        assert any(n.startswith(f"r{r:06d}-client-train-c") for n in names), r
    assert [t["name"] for t in tasks if not ROUND_TASK.fullmatch(t["name"])] == []
    assert all(not labels & set(t["tags"]) for t in tasks)  # tags cost a concurrency request a task run
    own = recorded(lambda: api_post(prefect_api, "task_runs/filter", {"flow_runs": {"id": {"any_": [parent["id"]]}}}),
                   lambda got: {"r000000-initialize", "finalize", "summarize"} <= {t["name"] for t in got})
    assert {"r000000-initialize", "finalize", "summarize"} <= {t["name"] for t in own}
    ids = [t["id"] for t in tasks]
    logs = recorded(lambda: api_post(prefect_api, "logs/filter",
                                     {"logs": {"task_run_id": {"any_": ids}}, "limit": 200}),
                    lambda got: {log["task_run_id"] for log in got} == set(ids))
    assert {log["task_run_id"] for log in logs} == set(ids)  # every task run's page shows a line
    assert "Task run '" not in done.stderr  # ... which stays off the console

    (artifact,) = api_post(prefect_api, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [parent["id"]]}}})
    assert artifact["key"] == "fedprune-summed" and artifact["type"] == "markdown"
    assert f"[{summary['mlflow_run_url']}]({summary['mlflow_run_url']})" in artifact["data"]
    assert "x dense" in artifact["data"]

    tags = MlflowClient(f"sqlite:///{cli.home / 'mlflow.db'}").get_run(summary["mlflow_run_id"]).data.tags
    assert tags[RUN_ID_TAG] == "summed"
    assert (tags[PREFECT_ID_TAG], tags[PREFECT_URL_TAG]) == (parent["id"], summary["prefect_flow_run_url"])


def test_text_summary_and_a_dense_run_is_one_times_dense(cli: Cli) -> None:
    done = cli("run", "--preset", "toy", "--run-id", "dense", "--set", "strategy=fedavg")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()  # the summary alone: the logs went to stderr
    assert [line.split()[0] for line in lines] == ["run", "final", "client", "client", "client", "target", "time",
                                                   "Prefect", "MLflow", "checkpoints"]
    assert "parameters = 1.00 x dense" in done.stdout and "down 1.00 x dense, up 1.00 x dense" in done.stdout
    assert "per local step: 1.00 x dense FLOPs" in done.stdout and "none set" in done.stdout


def test_with_an_mlflow_server_json_stays_alone_and_links_to_the_server(cli: Cli, mlflow_server) -> None:  # type: ignore[no-untyped-def]
    server = Cli(cli.home, {**cli.env, "FEDPRUNE_TRACKING_URI": mlflow_server.tracking_uri})
    done = server("run", "--preset", "toy", "--run-id", "served", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert "View run" in done.stderr  # MLflow prints it on stdout; it went to stderr
    assert summary["mlflow_ui_command"] is None
    assert summary["mlflow_run_url"].startswith(f"{mlflow_server.tracking_uri}/#/experiments/")
    assert summary["mlflow_run_url"].endswith(f"/runs/{summary['mlflow_run_id']}")



@pytest.mark.parametrize("runner", ["processes", "dask"])
def test_task_processes_keep_task_lines_off_the_console_and_ship_them(cli: Cli, prefect_api: str, runner: str) -> None:
    """A task process imports `tasks` while unpickling its task, before Prefect has set up its logging."""
    done = cli("run", "--preset", "toy", "--run-id", runner, "--task-runner", runner, "--max-workers", "2", "--set",
               "schedule.num_rounds=2", "--set", "schedule.sparsify_rounds=1", "--set", "schedule.refine_rounds=0",
               "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Task run '" not in done.stderr
    (segment,) = api_post(prefect_api, "flow_runs/filter", {"flow_runs": {"tags": {"all_": [f"run:{runner}"]},
                                                                          "name": {"any_": [f"{runner}-rounds-1-2"]}}})
    tasks = recorded(lambda: api_post(prefect_api, "task_runs/filter",
                                      {"flow_runs": {"id": {"any_": [segment["id"]]}}, "limit": 200}),
                     lambda got: "r000002-aggregate" in {t["name"] for t in got})
    trained = [t["id"] for t in tasks if "-client-train-" in t["name"]]
    logs = recorded(lambda: api_post(prefect_api, "logs/filter", {"logs": {"task_run_id": {"any_": trained}},
                                                                   "limit": 200}),
                    lambda got: {log["task_run_id"] for log in got} == set(trained))
    assert trained and {log["task_run_id"] for log in logs} == set(trained)
