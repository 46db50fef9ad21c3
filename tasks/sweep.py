"""Sweep tasks: run one experiment as its own `fedprune run` process, and write the sweep's reports.

Each variant runs in a child process with its own torch thread count, so a sweep uses the
machine's cores side by side (threads in one process would share torch's global RNG lock and
its thread pool). The child's flow run reports to the same Prefect API and MLflow tracking as
the sweep. A finished run (its compact model stored) is skipped; an unfinished one resumes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import task

from infra import comparison, results
from infra.checkpoint import CheckpointStore
from infra.errors import StorageKeyError
from infra.settings import Settings, child_env
from infra.storage import open_storage
from infra.tracking import RUN_ID_TAG, Tracker, find_run
from tasks.options import NO_PERSIST

PROGRESS_EVERY_S = 60.0


def is_finished(settings: Settings, experiment: str, run_id: str) -> bool:
    """Whether `run_id` ran to its end (finalize stored its compact model)."""
    store = CheckpointStore(open_storage(settings.storage_url, settings.s3_endpoint_url), experiment, run_id)
    try:
        store.get_artifact("compact_model.safetensors")
    except StorageKeyError:
        return False
    return True


def last_progress(log_dir: str, run_id: str) -> str:
    """The run's latest progress line ("round i/N ...") from its log, or "starting"."""
    log = Path(log_dir) / f"{run_id}.log"
    lines = [line for line in log.read_text(errors="replace").splitlines() if " - round " in line] if log.exists() \
        else []
    return lines[-1].split(" - ", 1)[-1] if lines else "starting"


@task(name="run-variant", task_run_name="variant-{run_id}", **NO_PERSIST)
def run_variant(
    run_id: str, preset: str, overrides: dict[str, Any], experiment: str, options: dict[str, Any], threads: int,
    log_dir: str,
) -> str:
    """Run (or resume, or skip when finished) one experiment in a child `fedprune run` process.

    Returns:
        "skipped" (it had finished earlier) or "ran". The caller logs progress (task-run INFO lines
        stay off the console, see `infra.settings.task_runs_off_console`).

    Raises:
        RuntimeError: the child failed; names its log file and quotes its last lines.
    """
    settings = Settings()
    if is_finished(settings, experiment, run_id):
        return "skipped"
    log = Path(log_dir) / f"{run_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(overrides, f)
    command = [sys.executable, "-m", "flows.cli", "run", "--preset", preset, "--config", f.name,
               "--run-id", run_id, "--experiment", experiment]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    env = child_env({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    with log.open("a") as out:
        child = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    Path(f.name).unlink(missing_ok=True)
    if child.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{run_id} exited with {child.returncode}; log {log}:\n{tail}")
    return "ran"


@task(name="sweep-report", task_run_name="sweep-report", **NO_PERSIST)
def report(
    experiment: str, runs: list[tuple[str, str, tuple[str, ...], int]], dense_label: str, out_dir: str,
) -> dict[str, str]:
    """Table, CSV and plots of the sweep into `out_dir` and, as artifacts, into an MLflow run
    `<experiment>-report` of the same experiment. Returns {file name: path}."""
    settings = Settings()
    client = MlflowClient(settings.tracking_uri)
    found = results.collect(client, experiment, runs)  # raises naming a missing run
    rows = results.summarize(found, dense_label)
    files = {
        "results_table.md": results.render_table(rows, dense_label).encode(),
        "results.csv": results.render_csv(found).encode(),
        "wer_vs_sparsity.png": results.plot_wer_vs_sparsity(found),
        "wer_over_rounds.png": results.plot_wer_over_rounds(found),
    }
    return _publish(settings, client, experiment, files, out_dir, "sweep")


@task(name="comparison-report", task_run_name="comparison-report", **NO_PERSIST)
def comparison_report(
    experiment: str, runs: list[comparison.ComparedRun], out_dir: str, k: int = comparison.MIN_EVALS,
    pilots: list[tuple[str, float, bool]] | None = None,
) -> dict[str, str]:
    """The budgets comparison of `runs` (`infra.comparison`: comparison.csv, comparison.md, three
    plots; WER the mean of the last `k` evaluations; the `pilots`' table, see
    `infra.comparison.render_pilots`) into `out_dir` and, as artifacts under `comparison/`, into the
    MLflow run `<experiment>-report`. Returns {file name: path}."""
    settings = Settings()
    client = MlflowClient(settings.tracking_uri)
    found = comparison.collect(client, experiment, runs)  # raises naming a missing run
    files = comparison.report_files(runs, found, k, pilots or [])
    return _publish(settings, client, experiment, files, out_dir, "comparison")


def _publish(
    settings: Settings, client: MlflowClient, experiment: str, files: dict[str, bytes], out_dir: str, folder: str,
) -> dict[str, str]:
    """Write `files` into `out_dir` and, under `folder/`, as artifacts of the MLflow run `<experiment>-report`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report_id = f"{experiment}-report"
    with Tracker(settings.tracking_uri, experiment, run_name=report_id,
                 run_id=find_run(client, experiment, report_id)) as tracker:
        tracker.set_tags({RUN_ID_TAG: report_id, "fedprune.kind": "sweep-report"})
        for name, data in files.items():
            (out / name).write_bytes(data)
            tracker.log_artifact_bytes(f"{folder}/{name}", data)
    return {name: str(out / name) for name in files}
