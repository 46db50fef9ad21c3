"""The sweep flow: the paper's experiments on the speech benchmark, one command, resumable.

sweep (flow)
  run-variant x warm-up stages: dense FedAvg (`fedprune_core.sweep`), each stage continuing the
               one before; client training on 2 processes of the process task runner
  run-variant x variants, `parallel` at a time, each its own `fedprune run` process with
               `threads_per_run` torch threads, all starting from the warm-up's weights
  sweep-report: table, CSV and plots into `out_dir` and into MLflow (run `<name>-report`)
Every run lands in one MLflow experiment (the sweep's name). Running the sweep again skips the
finished runs and resumes the unfinished ones from their last checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import wait
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from fedprune_core.sweep import paper_sweep
from infra.settings import Settings
from tasks.sweep import report, run_variant

WARMUP_OPTIONS: dict[str, Any] = {"task_runner": "processes", "max_workers": 2}
VARIANT_OPTIONS: dict[str, Any] = {"task_runner": "threads", "max_workers": 4}


RUNNER: TaskRunner[Any] = ThreadPoolTaskRunner(max_workers=8)


@flow(name="fedprune-sweep", persist_result=False, task_runner=RUNNER)
def sweep(
    name: str = "paper",
    warmup_rounds: list[int] | None = None,
    rounds: int = 24,
    clients_per_round: int = 4,
    local_steps: int = 5,
    parallel: int = 2,
    threads_per_run: int = 1,
    out_dir: str = "docs/results",
    log_dir: str | None = None,
    preset: str = "small",
    only: list[str] | None = None,
) -> dict[str, str]:
    """Run the paper's comparisons (see `fedprune_core.sweep.paper_sweep`) and report them.

    Args:
        name: sweep name: MLflow experiment, storage folder and run-id prefix.
        warmup_rounds: rounds of each warm-up stage (default [80, 60]).
        rounds, clients_per_round, local_steps: the size of each variant.
        parallel: variants run at once (one process each).
        threads_per_run: torch threads per variant process.
        out_dir: where the table, CSV and plots are written.
        log_dir: each run's output goes to `<log_dir>/<name>/<run id>.log` (default: FEDPRUNE_HOME/sweeps).
        preset: the configuration the runs override ("small": the speech benchmark).
        only: run just these variants (names from `paper_sweep`); all when None.

    Returns:
        {file name: path} of the report.
    """
    if parallel < 1 or threads_per_run < 1:
        raise ValueError(f"parallel={parallel}, threads_per_run={threads_per_run}: both must be >= 1, e.g. 2 and 1")
    plan = paper_sweep(name, tuple(warmup_rounds or (80, 60)), rounds, clients_per_round, local_steps, preset=preset,
                       only=tuple(only or ()))
    logs = str(Path(log_dir) if log_dir else Settings().home / "sweeps") + f"/{name}"
    logger = get_run_logger()
    logger.info(f"sweep {name}: {len(plan.warmups)} warm-up stage(s) + {len(plan.variants)} runs, {parallel} at a "
                f"time; logs in {logs}/")
    for stage in plan.warmups:
        run_variant.with_options(task_run_name=f"run-{stage.name}")(
            plan.run_id(stage), plan.preset, stage.overrides, name, WARMUP_OPTIONS, threads_per_run, logs)
    pending = list(plan.variants)
    running: list[Any] = []
    done = 0
    while pending or running:
        while pending and len(running) < parallel:
            v = pending.pop(0)
            future = run_variant.with_options(task_run_name=f"run-{v.name}").submit(
                plan.run_id(v), plan.preset, v.overrides, name, VARIANT_OPTIONS, threads_per_run, logs)
            running.append(future)
        finished = wait(running, timeout=5.0).done
        for future in finished:
            future.result()  # raises the child's failure
            running.remove(future)
            done += 1
            logger.info(f"sweep {name}: {done}/{len(plan.variants)} runs done")
    runs = [(plan.run_id(v), v.label, v.groups, int(v.overrides.get("seed", 0))) for v in plan.variants]
    return report(name, runs, "dense FedAvg", out_dir)
