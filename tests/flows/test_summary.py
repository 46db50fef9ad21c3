"""The end-of-run summary's wording, the progress line's pace and ETA, and the task-run naming scheme."""

from __future__ import annotations

from typing import Any

import pytest

from flows.experiment import progress_line
from flows.summary import FIELDS, artifact_key, as_markdown, as_text, duration
from tasks.options import round_task
from tasks.summarize import flops_facts, target_facts

SPEECH: dict[str, Any] = {
    "run_id": "demo-1", "experiment": "fedprune", "preset": "tiny", "strategy": "fedprune", "status": "finished",
    "resumed": False, "rounds": 40, "rounds_run": 40, "time_s": 125.4, "wer": 0.4321, "cer": 0.1987,
    "evaluation": {"eval_cer": 0.1987, "eval_loss": 1.5, "eval_wer": 0.4321},
    "client_parameters": 51_200, "dense_parameters": 102_400, "client_parameters_vs_dense": 0.5,
    "bytes_down_per_round": 250_000.0, "bytes_up_per_round": 204_800.0, "dense_bytes_per_round": 409_600,
    "bytes_down_vs_dense": 0.6103515625, "bytes_up_vs_dense": 0.5,
    "client_flops_per_step": 1_500_000.0, "dense_flops_per_step": 3_000_000.0, "flops_vs_dense": 0.5,
    "target": 0.45, "target_metric": "eval_wer", "target_round": 30, "target_client_time_s": 95.0,
    "target_client_bytes": 12_345_678.0, "target_modelled_time_s": None,
    "prefect_flow_run_id": "abc", "prefect_flow_run_url": "http://127.0.0.1:4200/runs/flow-run/abc",
    "mlflow_run_id": "m1", "mlflow_run_url": "http://127.0.0.1:5000/#/experiments/1/runs/m1",
    "mlflow_ui_command": "mlflow ui --backend-store-uri sqlite:////h/mlflow.db --port 5000",
    "tracking_uri": "sqlite:////h/mlflow.db", "storage_url": "file:///h/storage",
}


def test_the_example_holds_every_field() -> None:
    assert set(SPEECH) == set(FIELDS)


def test_text_summary_reads_at_a_glance() -> None:
    lines = as_text(SPEECH).splitlines()
    assert lines[0].split() == ["run", "demo-1", "(fedprune):", "fedprune,", "preset", "tiny,", "finished"]
    text = "\n".join(lines)
    assert "WER 43.2%, CER 19.9%" in text
    assert "51,200 parameters = 0.50 x dense (102,400)" in text
    assert "down 0.61 x dense, up 0.50 x dense (dense: 409,600 bytes each way)" in text
    assert "2m05s for 40 rounds" in text
    assert "per local step: 0.50 x dense FLOPs (1,500,000 of 3,000,000)" in text
    assert "eval_wer 0.45: reached at round 30, after 1m35s of client time and 12,345,678 client bytes" in text
    assert "http://127.0.0.1:4200/runs/flow-run/abc" in text
    assert "http://127.0.0.1:5000/#/experiments/1/runs/m1  (serve it: `mlflow ui --backend-store-uri" in text
    assert "file:///h/storage/fedprune/demo-1" in text
    start = len("final evaluation") + 2  # the longest label, then two spaces: every value starts there
    assert all(line[start - 2:start] == "  " and line[start] != " " for line in lines)


def test_text_summary_of_a_resumed_run_and_a_workload_without_wer() -> None:
    toy = {**SPEECH, "wer": None, "cer": None, "evaluation": {"eval_accuracy": 0.875, "eval_loss": 0.25},
           "resumed": True, "rounds_run": 15, "mlflow_ui_command": None}
    text = as_text(toy)
    assert "accuracy 0.875, loss 0.25" in text and "WER" not in text
    assert "rounds 26-40 (resumed)" in text
    assert "serve it" not in text
    assert "no round left to run" in as_text({**toy, "rounds_run": 0})
    never = as_text({**toy, "target": 0.9, "target_metric": "eval_accuracy", "target_round": None,
                     "target_client_time_s": None, "target_client_bytes": None})
    assert "eval_accuracy 0.9: not reached" in never
    unset = as_text({**toy, "target": None, "target_metric": None, "target_round": None, "flops_vs_dense": None})
    assert "none set (--set target=...)" in unset and "not counted" in unset


def test_summarize_target_and_flops_facts_from_a_known_history() -> None:
    history = [
        {"round": 1.0, "client_time_s_max": 2.0, "bytes_down": 100.0, "bytes_up": 50.0, "clients_done": 2.0},
        {"round": 2.0, "client_time_s_max": 3.0, "bytes_down": 100.0, "bytes_up": 50.0, "clients_done": 2.0,
         "eval_wer": 0.6, "client_flops": 40.0, "dense_flops": 100.0},
        {"round": 3.0, "client_time_s_max": 1.0, "bytes_down": 80.0, "bytes_up": 40.0, "clients_done": 2.0,
         "eval_wer": 0.3, "client_flops": 60.0, "dense_flops": 100.0},
    ]
    assert target_facts(history, 0.5) == {"target": 0.5, "target_metric": "eval_wer", "target_round": 3,
                                          "target_client_time_s": 6.0, "target_client_bytes": 420.0,
                                          "target_modelled_time_s": None}
    modelled = [{**row, "modelled_round_time_s": 10.0 * row["round"]} for row in history]
    assert target_facts(modelled, 0.5)["target_modelled_time_s"] == 60.0
    assert "(1m00s modelled)" in as_text({**SPEECH, "target_modelled_time_s": 60.0})
    assert target_facts(history, 0.2)["target_round"] is None
    assert set(target_facts(history, None).values()) == {None}
    assert flops_facts(history) == {"client_flops_per_step": 50.0, "dense_flops_per_step": 100.0,
                                    "flops_vs_dense": 0.5}
    assert set(flops_facts(history[:1]).values()) == {None}


def test_markdown_artifact_is_a_table_with_links() -> None:
    md = as_markdown(SPEECH)
    assert md.startswith("# FedPrune run demo-1\n")
    url = SPEECH["mlflow_run_url"]
    assert f"| MLflow | [{url}]({url})  (serve it: `mlflow ui" in md
    assert "| final evaluation | WER 43.2%, CER 19.9% |" in md


@pytest.mark.parametrize(("experiment", "run_id", "key"), [
    ("fedprune", "demo-1", "fedprune-demo-1"), ("paper.v2", "Run_A", "paper-v2-run-a"),
])
def test_artifact_keys_follow_prefects_rule(experiment: str, run_id: str, key: str) -> None:
    assert artifact_key(experiment, run_id) == key


@pytest.mark.parametrize(("seconds", "shown"), [
    (0.04, "0.0s"), (4.24, "4.2s"), (59.9, "59.9s"), (59.96, "1m00s"), (425, "7m05s"), (3 * 3600 + 125, "3h02m"),
    (2 * 86400 + 4 * 3600 + 59, "2d04h"),
])
def test_durations(seconds: float, shown: str) -> None:
    assert duration(seconds) == shown


def test_progress_line_shows_pace_and_eta() -> None:
    slow = progress_line(40, 100, {"train_loss": 0.5, "eval_wer": 0.25}, rounds_done=10, elapsed_s=25.0)
    assert slow.startswith("round 40/100 (40.0%) 2.5 s/round, ETA 2m30s ")
    assert "train_loss=0.5" in slow and "eval_wer=0.25" in slow
    fast = progress_line(1000, 30000, {}, rounds_done=200, elapsed_s=50.0)
    assert fast.startswith("round 1000/30000 (3.3%) 4 rounds/s, ETA 2h00m")


def test_task_runs_are_named_by_round_then_step() -> None:
    assert round_task("client-train", client=True).format(round_num=40, client_id=2) == "r000040-client-train-c2"
    assert round_task("aggregate").format(round_num=114) == "r000114-aggregate"
    assert round_task("initialize", round_num=0) == "r000000-initialize"
