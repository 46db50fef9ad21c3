"""The sweep flow end to end on the tiny preset: warm-up, variants from its weights, report (to --out-dir, and by
default under FEDPRUNE_HOME), re-run skips."""

from __future__ import annotations

import csv
import time

import pytest
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL, temporary_settings

from fedprune_core.sweep import Sweep, Variant
from flows.sweep import VARIANT_OPTIONS, run_all, stop_if_failed
from infra.checkpoint import CheckpointStore
from infra.storage import open_storage
from tests.flows.conftest import Cli
from tests.flows.helpers import final_state, weights_hash

pytestmark = pytest.mark.integration

ARGS = ("sweep", "--name", "swt", "--preset", "tiny", "--warmup-rounds", "2", "--rounds", "6",
        "--clients-per-round", "2", "--local-steps", "1", "--only", "dense,fp-s50")


def test_sweep_runs_variants_from_the_warmup_reports_and_skips_finished_runs(cli: Cli) -> None:
    out = cli.home / "report"
    done = cli(*ARGS, "--out-dir", str(out), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr

    storage = open_storage((cli.home / "storage").as_uri())
    warm = final_state(storage, "swt-warmup", "swt")
    assert warm.round_num == 2
    for run_id in ("swt-dense", "swt-fp-s50"):
        store = CheckpointStore(storage, "swt", run_id)
        assert store.read_config()["experiment"]["init_from"] == "swt-warmup"
        start = store.load(0).tensors["state"]
        assert weights_hash({k[8:]: t for k, t in start.items() if k.startswith("weights/")}) == weights_hash(
            warm.weights)
        assert final_state(storage, run_id, "swt").round_num == 6

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["run_id"] for r in rows] == ["swt-dense", "swt-fp-s50"]
    assert 0.45 < float(rows[1]["sparsity"]) < 0.55 and float(rows[0]["sparsity"]) == 0.0
    assert all(0.0 <= float(r["wer_last2"]) <= 5.0 and 0.0 <= float(r["wer_final"]) <= 5.0 for r in rows)
    table = (out / "results_table.md").read_text()
    assert "| dense FedAvg | 1 |" in table and "FP S=0.5" in table
    for png in ("wer_vs_sparsity.png", "wer_over_rounds.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = MlflowClient(f"sqlite:///{cli.home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("swt")
    tags = {r.data.tags.get("fedprune.run_id") for r in client.search_runs([experiment.experiment_id])}
    assert tags == {"swt-warmup", "swt-dense", "swt-fp-s50", "swt-report"}

    start_time = time.monotonic()
    again = cli(*ARGS, timeout=300)  # without --out-dir: the report goes to FEDPRUNE_HOME/results/<name>
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count(": skipped (") == 3
    assert time.monotonic() - start_time < 120
    default_out = cli.home / "results" / "swt"
    assert (default_out / "results.csv").read_text() == (out / "results.csv").read_text()
    assert (default_out / "wer_over_rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags.get("fedprune.run_id") for r in runs).count("swt-report") == 1


def test_a_failed_run_leaves_the_others_going_and_the_sweep_then_names_it(
        cli: Cli, prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run_all` (the sweep's and the comparison's runner): a run that fails is reported, the next one
    still runs to its end, and `stop_if_failed` then fails the flow naming the failed run and its log."""
    for key, value in cli.env.items():  # the runs are child processes: they inherit this environment
        monkeypatch.setenv(key, value)
    plan = Sweep("fails", "toy", (), (
        Variant("bad", "bad", (), {"schedule": {"num_rounds": -3}}),  # refused before any work: exit 2
        Variant("good", "good", (), {"schedule": {"num_rounds": 2, "sparsify_rounds": 1, "refine_rounds": 0}}),
    ))
    logs = str(cli.home / "logs")

    @flow(persist_result=False)
    def both() -> list[str]:
        return run_all(plan, list(plan.variants), 1, VARIANT_OPTIONS, 1, logs)

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):  # Prefect reads its settings once a process
        failed = both()
        APILogHandler().flush()  # while the server is up: it stops before this process exits
    assert failed == ["fails-bad"]
    assert final_state(open_storage((cli.home / "storage").as_uri()), "fails-good", "fails").round_num == 2
    assert "num_rounds" in (cli.home / "logs" / "fails-bad.log").read_text()
    with pytest.raises(RuntimeError, match=r"1 run\(s\) failed: fails-bad; their logs are in .*/logs/"):
        stop_if_failed(failed, logs)
