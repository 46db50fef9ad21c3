"""The sweep flow: the paper's experiments on the speech benchmark, one command, resumable.

sweep (flow)
  run-variant x warm-up stages: dense FedAvg (`fedprune_core.sweep`), each stage continuing the
               one before; client training on 2 processes of the process task runner
  run-variant x variants, `parallel` at a time, each its own `fedprune run` process with
               `threads_per_run` torch threads, all starting from the warm-up's weights
  sweep-report: table, CSV and plots into `out_dir` (default FEDPRUNE_HOME/results/<name>) and into
               MLflow (run `<name>-report`)
compare (flow): every method at matched client download budgets, trained from scratch on `demo`,
  over paired seeds (`fedprune_core.sweep.compare_sweep`); a Federated Dropout server-lr pilot
  first; then `comparison-report` (`infra.comparison`).

Every run lands in one MLflow experiment (the sweep's name). Running the sweep again skips the
finished runs and resumes the unfinished ones from their last checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger
from prefect.futures import PrefectConcurrentFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from fedprune_core.budgets import Knobs, knobs_for, seeded_model
from fedprune_core.presets import preset as make_preset
from fedprune_core.speech.model import build_model
from fedprune_core.sweep import (
    COMPARE_BUDGETS,
    COMPARE_SEEDS,
    SGD_LRS,
    Sweep,
    Variant,
    compare_sweep,
    fd_lr_pilot,
    paper_sweep,
    sgd_lr_pilot,
)
from infra import results
from infra.comparison import ComparedRun
from infra.settings import Settings
from tasks.sweep import PROGRESS_EVERY_S, comparison_report, last_progress, report, run_variant

WARMUP_OPTIONS: dict[str, Any] = {"task_runner": "processes", "max_workers": 2}
VARIANT_OPTIONS: dict[str, Any] = {"task_runner": "threads", "max_workers": 4}


RUNNER: TaskRunner[Any] = ThreadPoolTaskRunner(max_workers=8)


def run_all(plan: Sweep, variants: list[Variant], parallel: int, options: dict[str, Any], threads: int,
            logs: str) -> list[str]:
    """Run `variants`, `parallel` at a time; log each one's latest round every minute and each end.

    A run that fails is logged (its error and log file) and the others go on. Returns the failed
    run ids (running the sweep again retries them)."""
    logger = get_run_logger()
    pending, done = list(variants), 0
    running: dict[Any, Variant] = {}
    failed: list[str] = []
    last_report = time.monotonic()
    while pending or running:
        while pending and len(running) < parallel:
            v = pending.pop(0)
            running[run_variant.with_options(task_run_name=f"run-{v.name}").submit(
                plan.run_id(v), plan.preset, v.overrides, plan.name, options, threads, logs)] = v
        for future in first_done(list(running)):
            v = running.pop(future)
            done += 1
            outcome = future.result(raise_on_failure=False)  # the child's failure names its log
            if isinstance(outcome, BaseException):
                failed.append(plan.run_id(v))
                logger.error(f"{plan.run_id(v)}: failed ({done}/{len(variants)}): {outcome}")
                continue
            logger.info(f"{plan.run_id(v)}: {outcome} ({done}/{len(variants)}) {last_progress(logs, plan.run_id(v))}")
        if time.monotonic() - last_report >= PROGRESS_EVERY_S:
            last_report = time.monotonic()
            for v in running.values():
                logger.info(f"{plan.run_id(v)}: {last_progress(logs, plan.run_id(v))}")
    return failed


def first_done(futures: list[PrefectConcurrentFuture[Any]], timeout: float = 5.0) -> list[PrefectConcurrentFuture[Any]]:
    """The `futures` whose runs have ended, as soon as one has (or none after `timeout` seconds).

    Prefect's `wait` returns when every future is done or at its timeout, so a run that ended (or
    was skipped) beside a running one held its slot for the whole timeout."""
    by_thread = {f.wrapped_future: f for f in futures}
    done, _ = concurrent.futures.wait(by_thread, timeout, return_when=concurrent.futures.FIRST_COMPLETED)
    return [by_thread[d] for d in done]


def stop_if_failed(failed: list[str], logs: str) -> None:
    """Raise naming the `failed` runs and where their logs are (none failed: return)."""
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(failed)}; their logs are in {logs}/ (run the "
                           "sweep again to retry them)")


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
        stop_if_failed(run_all(plan, [stage], 1, WARMUP_OPTIONS, threads_per_run, logs), logs)
    stop_if_failed(run_all(plan, list(plan.variants), parallel, VARIANT_OPTIONS, threads_per_run, logs), logs)
    runs = [(plan.run_id(v), v.label, v.groups, int(v.overrides.get("seed", 0))) for v in plan.variants]
    files = report(name, runs, "dense FedAvg", out)
    logger.info(f"sweep {name} report in {out}:\n" + Path(files["results_table.md"]).read_text())
    return files


def compare_knobs(budgets: tuple[float, ...]) -> list[Knobs]:
    """Each method's knob for each budget, computed on the `demo` model's seeded initialization
    (`fedprune_core.budgets.knobs_for`)."""
    config = make_preset("demo")
    return knobs_for(config, seeded_model(lambda: build_model(config.model)), budgets)


def middle_knobs(knobs: list[Knobs]) -> Knobs:
    """The middle budget's knobs, where the pilots run.

    Raises:
        ValueError: Federated Dropout cannot get a client down to the middle budget.
    """
    middle = knobs[len(knobs) // 2]
    if middle.fd_rate is None:
        raise ValueError(f"--budgets: the middle budget {middle.share} is below the smallest client Federated Dropout "
                         "can make; choose larger budgets, e.g. 0.75,0.5,0.35")
    return middle


Tried = list[tuple[Variant, float, float]]
"""Pilot runs: (run, the value it tried, its WER)."""


def pilot_results(name: str, pilot: list[Variant], last: int, key: tuple[str, ...]) -> Tried:
    """Each pilot run with the value it tried (its override at path `key`) and its WER (mean of its
    `last` evaluations)."""
    found = results.collect(MlflowClient(Settings().tracking_uri), name,
                            [(f"{name}-{v.name}", v.label, v.groups, 0) for v in pilot])
    return [(v, _at(v.overrides, key), r.mean("eval_wer", last)) for v, r in zip(pilot, found, strict=True)]


def best_lr(tried: Tried) -> float:
    """The value of the pilot run with the lowest WER (a run whose WER is not a number, diverged,
    counts as the worst); the smallest such value on a tie."""
    return min(sorted(tried, key=lambda t: t[1]), key=lambda t: math.inf if math.isnan(t[2]) else t[2])[1]


def _at(tree: dict[str, Any], key: tuple[str, ...]) -> float:
    for part in key:
        tree = tree[part]
    return float(tree)  # type: ignore[arg-type]


@flow(name="fedprune-compare", persist_result=False, task_runner=RUNNER)
def compare(
    name: str = "compare",
    rounds: int = 32,
    seeds: list[int] | None = None,
    budgets: list[float] | None = None,
    parallel: int = 2,
    threads_per_run: int = 1,
    last_evals: int = 3,
    out_dir: str | None = None,
    log_dir: str | None = None,
) -> dict[str, str]:
    """Every method at matched client budgets, trained from scratch, over paired seeds; then the report.

    First the pilots (seed 0, middle budget): Federated Dropout with each server learning rate of
    `FD_SERVER_LRS`, and Federated Pruning with SGD clients at each client learning rate of `SGD_LRS`;
    the comparison's Federated Dropout and SGD runs use the best of each. Then every run of
    `compare_sweep`, `parallel` at a time; a run that fails leaves the others going, the report
    leaves it out, and the flow then fails naming it. Running it again skips the finished runs and
    resumes the others; the pilots' choices are read back from MLflow, so they are the same.

    Args:
        name: MLflow experiment, storage folder and run-id prefix.
        rounds: rounds of each run.
        seeds: paired seeds (default `COMPARE_SEEDS`); adding seeds later runs only the new runs.
        budgets: client download budgets, shares of the dense parameters (default `COMPARE_BUDGETS`).
        parallel, threads_per_run: runs at once (a process each) and torch threads in each.
        last_evals: a run's WER is the mean of its last this many evaluations.
        out_dir: the report's directory (default FEDPRUNE_HOME/results/<name>).
        log_dir: each run's output in `<log_dir>/<name>/<run id>.log` (default FEDPRUNE_HOME/sweeps).
    """
    if parallel < 1 or threads_per_run < 1 or last_evals < 1:
        raise ValueError(f"parallel={parallel}, threads_per_run={threads_per_run}, last_evals={last_evals}: each must "
                         "be >= 1, e.g. 2, 1 and 3")
    seeds_, budgets_ = tuple(seeds or COMPARE_SEEDS), tuple(budgets or COMPARE_BUDGETS)
    knobs = compare_knobs(budgets_)
    middle = middle_knobs(knobs)
    assert middle.fd_rate is not None  # for mypy: middle_knobs checked it
    logs = str(Path(log_dir) if log_dir else Settings().home / "sweeps") + f"/{name}"
    out = str(Path(out_dir) if out_dir else Settings().home / "results" / name)
    logger = get_run_logger()
    for k in knobs:
        logger.info(f"budget {k.share}: FP sparsity {k.fp_sparsity}, PruneFL max density {k.prunefl_density}, "
                    f"Federated Dropout rate {k.fd_rate} (rows), {k.fd_hidden_rate} (hidden units)")
    fd_pilot = fd_lr_pilot(name, rounds, middle.fd_rate)
    sgd_pilot = sgd_lr_pilot(name, rounds, middle.fp_sparsity) if middle.fp_sparsity is not None else []
    pilots = [*fd_pilot, *sgd_pilot]
    stop_if_failed(run_all(Sweep(name, "demo", (), tuple(pilots)), pilots, parallel, VARIANT_OPTIONS, threads_per_run,
                           logs), logs)
    fd_tried = pilot_results(name, fd_pilot, last_evals, ("federated", "server_lr"))
    sgd_tried = pilot_results(name, sgd_pilot, last_evals, ("federated", "local", "lr")) if sgd_pilot else []
    lr, sgd_lr = best_lr(fd_tried), best_lr(sgd_tried) if sgd_tried else SGD_LRS[0]
    pilot_table = [(v.label, wer, value == chosen)
                   for tried, chosen in ((fd_tried, lr), (sgd_tried, sgd_lr)) for v, value, wer in tried]
    plan, arms = compare_sweep(name, rounds, seeds_, knobs, lr, sgd_lr)
    logger.info(f"compare {name}: Federated Dropout's server lr {lr:g}, SGD clients' lr {sgd_lr:g}; "
                f"{len(plan.variants)} runs, {parallel} at a time; logs in {logs}/")
    failed = run_all(plan, list(plan.variants), parallel, VARIANT_OPTIONS, threads_per_run, logs)
    compared = [ComparedRun(plan.run_id(v), a.method, a.budget, a.seed, v.label)
                for v in plan.variants for a in [arms[plan.run_id(v)]] if plan.run_id(v) not in failed]
    files = comparison_report(name, compared, out, last_evals, pilot_table)
    logger.info(f"compare {name}: report in {out}" + (f", without the {len(failed)} failed run(s)" if failed else ""))
    stop_if_failed(failed, logs)
    return files
