"""The sweep flow: the paper's experiments on the speech benchmark, one command, resumable.

sweep (flow)
  run-variant x warm-up stages: dense FedAvg (`fedprune_core.sweep`), each stage continuing the
               one before; client training on 2 processes of the process task runner
  run-variant x variants, `parallel` at a time, each its own `fedprune run` process with
               `threads_per_run` torch threads, all starting from the warm-up's weights
  sweep-report: table, CSV and plots into `out_dir` (default FEDPRUNE_HOME/results/<name>) and into
               MLflow (run `<name>-report`)
Every run lands in one MLflow experiment (the sweep's name). Running the sweep again skips the
finished runs and resumes the unfinished ones from their last checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import wait
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from fedprune_core.sweep import Sweep, Variant, paper_sweep
from infra.settings import Settings
from tasks.sweep import PROGRESS_EVERY_S, last_progress, report, run_variant

WARMUP_OPTIONS: dict[str, Any] = {"task_runner": "processes", "max_workers": 2}
VARIANT_OPTIONS: dict[str, Any] = {"task_runner": "threads", "max_workers": 4}


RUNNER: TaskRunner[Any] = ThreadPoolTaskRunner(max_workers=8)


def run_all(plan: Sweep, variants: list[Variant], parallel: int, options: dict[str, Any], threads: int,
            logs: str) -> None:
    """Run `variants`, `parallel` at a time; log each one's latest round every minute and each end."""
    logger = get_run_logger()
    pending, done = list(variants), 0
    running: dict[Any, Variant] = {}
    last_report = time.monotonic()
    while pending or running:
        while pending and len(running) < parallel:
            v = pending.pop(0)
            running[run_variant.with_options(task_run_name=f"run-{v.name}").submit(
                plan.run_id(v), plan.preset, v.overrides, plan.name, options, threads, logs)] = v
        for future in wait(list(running), timeout=5.0).done:
            v = running.pop(future)
            outcome = future.result()  # raises the child's failure, naming its log
            done += 1
            logger.info(f"{plan.run_id(v)}: {outcome} ({done}/{len(variants)}) {last_progress(logs, plan.run_id(v))}")
        if time.monotonic() - last_report >= PROGRESS_EVERY_S:
            last_report = time.monotonic()
            for v in running.values():
                logger.info(f"{plan.run_id(v)}: {last_progress(logs, plan.run_id(v))}")


@flow(name="fedprune-sweep", persist_result=False, task_runner=RUNNER)
def sweep(
    name: str = "paper",
    warmup_rounds: list[int] | None = None,
    rounds: int = 24,
    clients_per_round: int = 4,
    local_steps: int = 5,
    parallel: int = 2,
    threads_per_run: int = 1,
    out_dir: str | None = None,
    log_dir: str | None = None,
    preset: str = "small",
    only: list[str] | None = None,
    warmup_from: str = "",
) -> dict[str, str]:
    """Run the paper's comparisons (see `fedprune_core.sweep.paper_sweep`) and report them.

    Args:
        name: sweep name: MLflow experiment, storage folder and run-id prefix.
        warmup_rounds: rounds of each warm-up stage (default [80, 60]).
        rounds, clients_per_round, local_steps: the size of each variant.
        parallel: variants run at once (one process each).
        threads_per_run: torch threads per variant process.
        out_dir: where the table, CSV and plots are written (default: FEDPRUNE_HOME/results/<name>; pass
            e.g. docs/results to curate a sweep's report into the docs).
        log_dir: each run's output goes to `<log_dir>/<name>/<run id>.log` (default: FEDPRUNE_HOME/sweeps).
        preset: the configuration the runs override ("small": the speech benchmark).
        only: run just these variants (names from `paper_sweep`); all when None.
        warmup_from: "EXPERIMENT/RUN_ID" of a finished warm-up to start the variants from, instead of
            running the warm-up stages.

    Returns:
        {file name: path} of the report.
    """
    if parallel < 1 or threads_per_run < 1:
        raise ValueError(f"parallel={parallel}, threads_per_run={threads_per_run}: both must be >= 1, e.g. 2 and 1")
    plan = paper_sweep(name, tuple(warmup_rounds or (80, 60)), rounds, clients_per_round, local_steps, preset=preset,
                       only=tuple(only or ()), warmup_from=warmup_from)
    logs = str(Path(log_dir) if log_dir else Settings().home / "sweeps") + f"/{name}"
    out = str(Path(out_dir) if out_dir else Settings().home / "results" / name)
    logger = get_run_logger()
    logger.info(f"sweep {name}: {len(plan.warmups)} warm-up stage(s) + {len(plan.variants)} runs, {parallel} at a "
                f"time; logs in {logs}/")
    for stage in plan.warmups:  # each stage starts from the one before
        run_all(plan, [stage], 1, WARMUP_OPTIONS, threads_per_run, logs)
    run_all(plan, list(plan.variants), parallel, VARIANT_OPTIONS, threads_per_run, logs)
    runs = [(plan.run_id(v), v.label, v.groups, int(v.overrides.get("seed", 0))) for v in plan.variants]
    files = report(name, runs, "dense FedAvg", out)
    logger.info(f"sweep {name} report in {out}:\n" + Path(files["results_table.md"]).read_text())
    return files
