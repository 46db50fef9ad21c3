"""The experiment flow: one federated pruning run, resumable, tracked, checkpointed.

experiment (parent flow)
  prepare: validate everything, create the run (config, round 0) or find where it stopped
  rounds_segment (child flow run per `rounds_per_segment` rounds)
    per round: [score -> mask] -> dispatch -> client-train x clients (concurrent)
               -> aggregate -> [evaluate] -> [log metrics, flush, checkpoint]
    score and mask run in the rounds that can change masks (`Strategy.keeps_masks`); the others
    (fine-tuning, FedAvg, between PruneFL's reconfigurations) keep the state's scores and masks.
  finalize: artifacts; summarize: the summary the flow returns and its run carries as an artifact
A run is identified by `run_id`; running the flow again with an existing run id resumes it from
its newest checkpoint that verifies (`CheckpointStore.recover`) into the same MLflow run.

The parent flow run is named by the run id and tagged ``run:<id>``, ``strategy:<name>``,
``preset:<name>`` and ``experiment:<name>``; its segments carry the tags too, its task runs none
(`rounds_segment` says why). The MLflow run carries the flow run's id and URL (`PREFECT_TAGS`,
this start's), and the run's status record (`infra.run_status`) says whether it runs, finished,
failed or was interrupted.

The tasks a round runs in the flow's own thread get the run's reference and the lists of clients
and results `quote`d (`_unwalked`): Prefect otherwise walks every field of every parameter of each
task run, looking for futures, and rebuilds each dataclass it passes (about 1 ms a round at 8
clients, 15 ms at 128). None of these is a task's result, so no link of the Prefect UI's graph is
lost; state keys, which are (score's, mask's, checkpoint's), stay plain and keep theirs.
Client-train's parameters stay plain: on prefect-dask's workers a quoted parameter reached the
task-run name still wrapped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

from prefect import flow, get_client, get_run_logger, tags
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext, TagsContext
from prefect.futures import PrefectFuture
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.annotations import quote
from prefect.utilities.urls import url_for

from fedprune_core.config import FederatedConfig
from fedprune_core.participation import (
    RoundFailedError,
    RoundParticipation,
    decide,
    min_clients,
    one_line,
    participation_csv,
    round_failed_message,
)
from fedprune_core.rng import sample_clients
from fedprune_core.simulate import should_evaluate
from flows.summary import artifact_key, as_markdown, duration
from flows.validation import check_run
from infra.checkpoint import CheckpointStore
from infra.cluster import (
    ALL,
    NONE,
    check_shared_storage,
    connect,
    placed_on,
    placement_csv,
    placement_row,
    security_for,
    served_clients,
)
from infra.interrupt import stop_if_requested
from infra.prefect_retention import segment_name, trim_segments
from infra.run_status import RunStatus, StatusWriter, active_writer
from infra.runs import RunOptions, RunRef, open_run
from infra.settings import Settings, load_settings
from infra.stores import mlflow_pages
from infra.tracking import RUN_ID_TAG, Tracker, fail_unfinished_starts, run_params
from tasks.aggregate import aggregate
from tasks.checkpoint import checkpoint
from tasks.client_train import Cohort, Trained, client_train
from tasks.dispatch import Dispatched, dispatch
from tasks.evaluate import evaluate
from tasks.finalize import finalize
from tasks.initialize import initialize
from tasks.mask import mask
from tasks.score import score
from tasks.summarize import summarize


def make_task_runner(options: RunOptions) -> TaskRunner[Any]:
    """Threads (default), processes, a local Dask cluster, or the Dask cluster at `options.dask_address`
    whose workers stand for the clients (prefect-dask; TLS from Dask's configuration)."""
    if options.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=options.max_workers)
    if options.task_runner == "processes":
        return ProcessPoolTaskRunner(max_workers=options.max_workers)
    from prefect_dask import DaskTaskRunner

    if options.dask_address:
        security = security_for(options.dask_address)
        return DaskTaskRunner(address=options.dask_address, client_kwargs={"security": security} if security else None)
    return DaskTaskRunner(cluster_kwargs={"n_workers": options.max_workers, "processes": True})


def prepare(
    preset: str,
    overrides: dict[str, Any] | None,
    run_id: str | None,
    experiment_name: str,
    options: RunOptions,
    settings: Settings,
) -> tuple[RunRef, str | None, bool]:
    """Validate all input (`flows.validation.check_run`, as the CLI does), then create the run or find it.

    Returns:
        (ref, mlflow_run_id or None for a new run, whether the run already existed).

    Raises:
        ValueError and infra errors naming the bad value, before anything is written
        (`UnrecoverableRunError`: the run has committed rounds but none verifies).
    """
    checked = check_run(preset, overrides, run_id, experiment_name, options, settings)
    store = CheckpointStore(checked.storage, experiment_name, checked.run_id)
    recovery = checked.recovery  # the newest round that verifies; never round 0 of a committed run
    if recovery.round_num is None:  # new, or it failed before committing round 0: nothing committed to protect
        store.write_config(checked.record)
    if options.dask_address:  # every worker reads the run's storage (the config just written proves it)
        with connect(options.dask_address) as client:
            check_shared_storage(client, settings.storage_url, store.config_key)
    store.recover(recovery)  # damaged rounds set aside, LATEST names the round the run resumes from
    if recovery.warning:
        get_run_logger().warning(recovery.warning)
    mlflow_run_id = recovery.meta.get("mlflow_run_id")
    # On a cluster the workers hold the clients' data; this process holds none of it.
    ref = RunRef(settings.storage_url, settings.s3_endpoint_url, experiment_name, checked.run_id,
                 str(settings.home / "data"), NONE if options.dask_address else ALL)
    return ref, mlflow_run_id, checked.existed


PROGRESS_EVERY_S = 5.0
"""A progress line at most this often (plus every evaluation and the segment's last round)."""


def progress_line(round_num: int, total: int, metrics: dict[str, float], rounds_done: int, elapsed_s: float) -> str:
    """A round's progress line: where the run is, how fast it goes (over the `rounds_done` rounds of the
    last `elapsed_s` seconds), when it ends at that pace, and how it is doing."""
    shown = ("train_loss", "sparsity", "eval_wer", "eval_accuracy", "bytes_down", "client_time_s_max")
    parts = [f"{k}={metrics[k]:.4g}" for k in shown if k in metrics]
    per_round = elapsed_s / max(rounds_done, 1)
    pace = f"{1 / per_round:.3g} rounds/s" if 0 < per_round < 1 else f"{per_round:.3g} s/round"
    eta = f"ETA {duration(per_round * (total - round_num))}"
    return f"round {round_num}/{total} ({100 * round_num / total:.1f}%) {pace}, {eta} " + " ".join(parts)



WATCH_S = 2.0
"""On a cluster, how often a waiting round asks whether its clients' workers are still there."""

Served = Callable[[], Mapping[int, Sequence[str]]]
"""Asks the cluster which clients its workers serve now (client id -> worker names)."""


def train_round(
    ref: RunRef,
    round_num: int,
    sampled: list[int],
    dispatched: Dispatched,
    fed: FederatedConfig,
    slots: int,
    served: Served | None = None,
) -> tuple[list[Trained], RoundParticipation]:
    """Train a round's clients under the client-failure policy (`fedprune_core.participation`).

    The clients go out in cohorts, one client-train task each (`cohorts`). A client that failed, or
    whose task failed after its retries or has not finished `client_timeout_s` after it was sent, is
    left out; if fewer than `min_clients` finished, the failed ones are sent again, up to
    `round_tries` times. A straggler's task is not stopped: what it uploads late is never read.

    On a cluster (`served` given) each cohort's task is placed on a worker that serves all its
    clients, and a client that no worker serves (before it is sent, or because its worker left
    while it waited) fails like any other.

    Returns:
        The finished clients' results (in client order) and who took part.

    Raises:
        RoundFailedError: naming the clients, when no try made the round.
    """
    finished: dict[int, Trained] = {}
    failed: dict[int, str] = {}
    pending = sorted(dispatched.payloads)
    for _ in range(fed.round_tries):
        now = served() if served is not None else None
        failed = _unserved(pending, now)
        futures = {group: _submit(ref, round_num, {c: dispatched.payloads[c] for c in group}, served is not None)
                   for group in cohorts([c for c in pending if c not in failed], slots, now)}
        deadline = None if fed.client_timeout_s is None else time.monotonic() + fed.client_timeout_s
        for group, future in futures.items():
            given_up = _wait(future, deadline, fed, _still_served(served, group))
            state = future.state
            if given_up is None and state.is_completed():
                cohort = future.result()
                finished |= {t.stats.client_id: t for t in cohort.trained}
                failed |= dict(cohort.failed)
            elif given_up is None and state.is_final():
                error = future.result(raise_on_failure=False)
                failed |= dict.fromkeys(group, one_line(error) if isinstance(error, BaseException) else str(state.name))
            else:
                late = f"missed the deadline (federated.client_timeout_s={fed.client_timeout_s})"
                failed |= dict.fromkeys(group, given_up or late)
        decided = decide(round_num, sampled, list(finished), failed, fed, dispatched.recorded)
        if decided is not None:
            return [finished[c] for c in decided.done], decided
        pending = sorted(failed)
    needed = len(dispatched.recorded.done) if dispatched.recorded is not None else min_clients(fed)
    raise RoundFailedError(round_failed_message(round_num, failed, len(finished), needed, fed.round_tries))


def cohorts(
    clients: Sequence[int], slots: int, served: Mapping[int, Sequence[str]] | None = None
) -> list[tuple[int, ...]]:
    """The round's client-train tasks: which clients each trains.

    On a cluster (`served`: client id -> the workers serving it) one task per set of workers, placed
    on them; otherwise at most `slots` tasks of consecutive clients, as even as can be (the task
    runner runs `slots` at once: `local_slots`; fewer for brief training: `local_cohorts`). Training
    does not depend on the grouping.
    """
    if served is not None:
        groups: dict[tuple[str, ...], list[int]] = {}
        for c in clients:
            groups.setdefault(tuple(sorted(served[c])), []).append(c)
        return [tuple(group) for group in groups.values()]
    ordered = sorted(clients)
    count = min(max(slots, 1), len(ordered))
    return [tuple(ordered[i * len(ordered) // count:(i + 1) * len(ordered) // count]) for i in range(count)]


COHORT_MIN_S = 0.05
"""The least training a local client-train task should carry: a task run costs Prefect about 5 ms
(`bench/bench_clients.py`), so a cohort of less work is cheaper joined to another."""


def local_cohorts(slots: int, clients: int, last_round: Sequence[Trained]) -> int:
    """How many client-train tasks a local round sends for `clients` clients: `slots` (`local_slots`), or
    fewer where the last round's clients trained so briefly (`ClientStats.wall_time_s`, mean per client)
    that a task would carry less than `COHORT_MIN_S` of training (the toy workload: one task a round).
    The first round of a segment, with no last round, uses every slot. Training does not depend on it."""
    if not last_round:
        return slots
    work = clients * sum(t.stats.wall_time_s for t in last_round) / len(last_round)
    return max(1, min(slots, int(work / COHORT_MIN_S)))


def local_slots(max_workers: int) -> int:
    """How many client-train tasks a round sends to a local task runner: `max_workers`, but no more than
    this process may use CPU cores. Each task trains its clients one after another; more tasks than cores
    run no faster and each costs Prefect a task run (about 5 ms, `bench/bench_clients.py`), and thread
    tasks beyond the cores contend for the interpreter lock."""
    return max(1, min(max_workers, len(os.sched_getaffinity(0))))


def _unserved(clients: list[int], served: Mapping[int, Sequence[str]] | None) -> dict[int, str]:
    if served is None:
        return {}
    return {c: f"no worker serves client {c}: start `fedprune worker --clients {c}`"
            for c in clients if not served.get(c)}


def _still_served(served: Served | None, group: tuple[int, ...]) -> Callable[[], bool] | None:
    return None if served is None else lambda: all(served().get(c) for c in group)


T = TypeVar("T")


def _unwalked(value: T) -> T:
    """`value` as a task parameter Prefect does not look into (`quote`); the task gets `value` itself."""
    return cast(T, quote(value))


def _submit(ref: RunRef, round_num: int, payloads: dict[int, str], placed: bool) -> PrefectFuture[Cohort]:
    if not placed:
        return client_train.submit(ref, round_num, payloads)
    with placed_on(sorted(payloads)):
        return client_train.submit(ref, round_num, payloads)


def _wait(
    future: PrefectFuture[Any], deadline: float | None, fed: FederatedConfig, still_served: Callable[[], bool] | None
) -> str | None:
    """Wait until `future` is final (None), its deadline passes, or its client's worker is gone (the reason)."""
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        step = left if still_served is None else (WATCH_S if left is None else min(left, WATCH_S))
        future.wait(step)
        if future.state.is_final():
            return None
        if left is not None and left <= (step or 0.0):
            return f"missed the deadline (federated.client_timeout_s={fed.client_timeout_s})"
        if still_served is not None and not still_served():
            return "no worker serves it any more (its worker left the cluster)"


@flow(name="fedprune-rounds", persist_result=False)
def rounds_segment(ref: RunRef, first: int, last: int, state_key: str, tracking_uri: str, mlflow_run_id: str) -> str:
    """Rounds `first`..`last` of a run; returns the key of the last committed state.

    The run's tags (`run_labels`) are on its flow runs, not on its task runs: Prefect asks its server
    for a concurrency slot of every tag of every tagged task run (tag-based concurrency limits), one
    request of about 3 ms a task run (`bench/bench_clients.py`), so a run's task runs go untagged.
    """
    with TagsContext(current_tags=set()):
        return _run_rounds(ref, first, last, state_key, tracking_uri, mlflow_run_id)


def _run_rounds(ref: RunRef, first: int, last: int, state_key: str, tracking_uri: str, mlflow_run_id: str) -> str:
    run = open_run(ref)
    cfg, options = run.config, run.options
    tracker = Tracker(tracking_uri, ref.experiment, run_id=mlflow_run_id)
    logger = get_run_logger()
    began = shown = time.monotonic()
    left_out: list[RoundParticipation] = []
    served = _cluster_view(options)
    placements: list[dict[str, Any]] = []
    status = active_writer(ref.experiment, ref.run_id)  # the parent flow's, in this process
    slots = local_slots(options.max_workers)
    trained: list[Trained] = []
    quoted = _unwalked(ref)  # what the round's own tasks get
    for r in range(first, last + 1):
        stop_if_requested()  # a Ctrl-C that Python or Prefect swallowed stops the run here
        scores_key = masks_key = None  # the state's own
        if not run.strategy.keeps_masks(r):
            scores_key = score(quoted, r, state_key)
            masks_key = mask(quoted, r, state_key, scores_key)
        sampled = sample_clients(len(run.data.clients), cfg.federated.clients_per_round, cfg.seed, r)
        dispatched = dispatch(quoted, r, state_key, masks_key, _unwalked(sampled))
        trained, participation = train_round(ref, r, sampled, dispatched, cfg.federated,
                                             local_cohorts(slots, len(sampled), trained), served)
        placements += [placement_row(r, t.stats, t.placement) for t in trained] if served else []
        aggregated = aggregate(quoted, r, state_key, scores_key, masks_key, _unwalked(trained),
                               _unwalked(participation))
        state_key, metrics = aggregated.state_key, dict(aggregated.metrics)
        if not participation.complete:
            left_out.append(participation)
            logger.warning(participation.summary())
        evaluated = should_evaluate(r, cfg)
        if evaluated:
            metrics |= evaluate(quoted, r, state_key)
        tracker.log_metrics(r, metrics)
        if status is not None:
            status.progress(r, metrics)
        if evaluated or r == last or time.monotonic() - shown >= PROGRESS_EVERY_S:
            logger.info(progress_line(r, cfg.schedule.num_rounds, metrics, r - first + 1, time.monotonic() - began))
            shown = time.monotonic()
        if r % options.checkpoint_every == 0 or r == last:
            tracker.flush()
            if placements:  # before the commit: a crash before it reruns these rounds, which write them again
                run.record_placement(r, placements)
            state_key = checkpoint(quoted, r, state_key, mlflow_run_id, _unwalked(left_out))
            if status is not None:
                status.committed(r)
            if left_out:
                tracker.log_artifact_bytes("participation.csv", participation_csv(run.participation_records()).encode())
                left_out = []
            if placements:
                tracker.log_artifact_bytes("placement.csv", placement_csv(run.placement_rows(r)).encode())
                placements = []
    tracker.flush()
    return state_key


def _cluster_view(options: RunOptions) -> Served | None:
    """On a cluster (`options.dask_address`), who serves which client, asked through the segment's
    Dask client; None otherwise."""
    if not options.dask_address:
        return None
    context = FlowRunContext.get()
    assert context is not None, "a segment runs inside its flow run"
    runner: Any = context.task_runner  # a prefect_dask DaskTaskRunner
    return lambda: served_clients(runner.client)


PREFECT_ID_TAG = "fedprune.prefect_flow_run_id"
PREFECT_URL_TAG = "fedprune.prefect_flow_run_url"
"""MLflow tags of a run: its Prefect flow run (this start's), and that run's page in the Prefect UI."""


def _flow_run_name() -> str:
    """A parent flow run's first name: its run id when given (the CLI always gives one), else Prefect's."""
    from prefect.runtime import flow_run

    return str(flow_run.parameters.get("run_id") or flow_run.name)


def run_labels(ref: RunRef, preset: str, strategy: str) -> tuple[str, ...]:
    """The Prefect tags of a run's flow runs and task runs."""
    return (f"run:{ref.run_id}", f"strategy:{strategy}", f"preset:{preset}", f"experiment:{ref.experiment}")


def _label_flow_run(run_id: str, labels: tuple[str, ...]) -> dict[str, str]:
    """Name this flow run `run_id` and add `labels` to its tags (a deployment's own tags stay).

    Returns:
        The MLflow tags naming it: `PREFECT_ID_TAG`, `PREFECT_URL_TAG`.
    """
    context = FlowRunContext.get()
    assert context is not None and context.flow_run is not None, "called inside the experiment flow"
    flow_run = context.flow_run
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, name=run_id, tags=sorted(set(flow_run.tags) | set(labels)))
    return {PREFECT_ID_TAG: str(flow_run.id), PREFECT_URL_TAG: url_for("flow-run", obj_id=flow_run.id) or ""}


@flow(name="fedprune-experiment", flow_run_name=_flow_run_name, persist_result=False)
def experiment(
    preset: str = "tiny",
    overrides: dict[str, Any] | None = None,
    run_id: str | None = None,
    experiment_name: str = "fedprune",
    rounds_per_segment: int = 100,
    checkpoint_every: int = 10,
    keep_last: int = 3,
    keep_every: int = 1000,
    task_runner: str = "threads",
    max_workers: int = 4,
    dask_address: str | None = None,
    insecure: bool = False,
) -> dict[str, Any]:
    """Run (or resume) one federated pruning experiment.

    Args:
        preset: a named configuration from `fedprune_core.presets` ("toy", "tiny", "small").
        overrides: nested overrides of the preset, e.g. {"pruning": {"sparsity": 0.3}}.
        run_id: the run to create or resume; a new id is made when None.
        experiment_name: MLflow experiment and storage folder.
        rounds_per_segment, checkpoint_every, keep_last, keep_every, task_runner, max_workers, dask_address,
            insecure: see `infra.runs.RunOptions`.

    Returns:
        The run's summary (`flows.summary.FIELDS`), which its flow run also carries as an artifact.
    """
    began = time.monotonic()
    options = RunOptions(rounds_per_segment, checkpoint_every, keep_last, keep_every, task_runner, max_workers,
                         dask_address, insecure)
    settings = load_settings()
    ref, mlflow_run_id, existed = prepare(preset, overrides, run_id, experiment_name, options, settings)
    run = open_run(ref)
    labels = run_labels(ref, preset, run.config.strategy)
    prefect_tags = _label_flow_run(ref.run_id, labels)
    mlflow_tags = {RUN_ID_TAG: ref.run_id, "fedprune.strategy": run.config.strategy, **prefect_tags}
    if mlflow_run_id is None:  # nothing committed: an earlier start of this run id died before round 0
        fail_unfinished_starts(settings.tracking_uri, experiment_name, ref.run_id)
    start = _status_record(ref, preset, run.config.strategy, run.config.schedule.num_rounds,
                           run.checkpoints.latest_round())
    # A run that stops on an error ends its MLflow run as FAILED, the reason in a tag (`Tracker.__exit__`),
    # and its status record as failed or interrupted; resuming it sets both running again.
    with (StatusWriter(run.storage, start, latest_committed=run.checkpoints.latest_round) as status,
          Tracker(settings.tracking_uri, experiment_name, run_name=ref.run_id, run_id=mlflow_run_id,
                  tags=mlflow_tags) as tracker):
        tracker.set_tags(prefect_tags)  # a resumed run: this start's flow run
        if mlflow_run_id is None:
            tracker.log_params(run_params(preset, ref.run_id, run.config, options.__dict__))
            state_key = initialize(ref, tracker.run_id)
            status.committed(0)
        latest = run.checkpoints.latest_round() or 0
        state_key = run.checkpoint_key(latest)
        total = run.config.schedule.num_rounds
        for first in range(latest + 1, total + 1, options.rounds_per_segment):
            last = min(first + options.rounds_per_segment - 1, total)
            segment = rounds_segment.with_options(
                task_runner=make_task_runner(options), flow_run_name=segment_name(ref.run_id, first, last)
            )
            # The parent flow run's heartbeat covers its segments (one process). A segment with its own
            # heartbeat thread would wait up to 1 s at its end for that thread to wake and stop.
            # The segment's flow run carries the run's tags; its task runs none (`rounds_segment`).
            with tags(*labels), temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                state_key = segment(ref, first, last, state_key, settings.tracking_uri, tracker.run_id)
            trim_segments(ref.run_id, last, settings.prefect_keep_rounds)  # the Prefect database stays small
            stop_if_requested()
        finalize(ref, state_key, settings.tracking_uri, tracker.run_id)
        facts = summarize(ref, state_key, settings.tracking_uri, tracker.run_id)
    summary = {
        "run_id": ref.run_id, "experiment": experiment_name, "preset": preset, "strategy": run.config.strategy,
        "status": "finished", "resumed": existed, "rounds": total, "rounds_run": total - latest,
        "time_s": time.monotonic() - began, **facts,
        "prefect_flow_run_id": prefect_tags[PREFECT_ID_TAG], "prefect_flow_run_url": prefect_tags[PREFECT_URL_TAG],
        **mlflow_pages(settings.tracking_uri, tracker.experiment_id, tracker.run_id),
        "storage_url": settings.storage_url,
    }
    create_markdown_artifact(as_markdown(summary), key=artifact_key(experiment_name, ref.run_id),
                             description=f"FedPrune run {ref.run_id}: its result, a client's size and traffic")
    return summary


def _status_record(ref: RunRef, preset: str, strategy: str, rounds: int, committed: int | None) -> RunStatus:
    """A run's status record as it (re)starts from `committed`."""
    now = time.time()
    return RunStatus(ref.experiment, ref.run_id, "running", committed or 0, committed, rounds, now, now,
                     strategy=strategy, preset=preset)

