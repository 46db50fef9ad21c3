"""Checkpoint: commit a round's state atomically, apply retention, drop covered work objects.

Before the commit drops the masks of the rounds it covers, it records what their changes did
(`infra.plots.save_mask_changes`); after it, it sets the run's phase tag and, when due
(`infra.plots.Throttle`), draws the run's plots again, so a long run shows them long before it ends.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task

from fedprune_core.engine import ServerState
from fedprune_core.mask_history import MaskChange, mask_changes
from fedprune_core.participation import RoundParticipation, one_line
from fedprune_core.schedule import phase_at
from infra.plots import Throttle, log_plots, save_mask_changes
from infra.runs import Run, RunRef, open_run
from infra.settings import load_settings
from infra.tracking import PHASE_TAG, Tracker, strategy_phases
from tasks.mask import MASKS
from tasks.options import IO_RETRIES, round_task

PLOTS = Throttle()
"""When each run's plots are due again in this process."""
_TAGGED: dict[str, str] = {}
"""The phase this process last tagged each MLflow run with."""


@task(name="checkpoint", task_run_name=round_task("checkpoint"), **IO_RETRIES)
def checkpoint(
    ref: RunRef,
    round_num: int,
    state_key: str,
    mlflow_run_id: str,
    left_out: list[RoundParticipation] | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Returns the committed state's key (the next round reads from it). `left_out`: the rounds since the
    previous checkpoint that left a client out, kept in the manifest. `tracking_uri`: the run's MLflow
    (None: the settings' `FEDPRUNE_TRACKING_URI`, as the flow's)."""
    run = open_run(ref)
    meta: dict[str, Any] = {
        "phase": phase_at(max(round_num, 1), run.config.schedule),
        "seed": run.config.seed,
        "mlflow_run_id": mlflow_run_id,
    }
    if left_out:
        meta["left_out"] = [p.to_json() for p in left_out]
    if changes := covered_mask_changes(run, round_num):
        save_mask_changes(run.storage, run.checkpoints.base, round_num, changes)
    state = run.state(state_key, round_num)
    key = run.commit(state, meta)
    report(run, state, mlflow_run_id, tracking_uri or load_settings().tracking_uri)
    return key


def covered_mask_changes(run: Run, round_num: int) -> list[MaskChange]:
    """The mask changes of the rounds after the last checkpoint up to `round_num`, from the masks of
    the rounds that made masks (their work objects); the first checkpoint also records round 0's
    masks against dense ones (PruneFL's initial pruning)."""
    previous = run.checkpoints.latest_round()
    if previous is None or previous >= round_num:
        return []
    made = [r for r in range(previous + 1, round_num + 1) if not run.strategy.keeps_masks(r)]
    if not made and previous > 0:
        return []
    before = run.state(run.checkpoint_key(previous), previous).masks
    rounds = [(r, run.get(run.work_key(r, MASKS))) for r in made]
    if previous == 0:
        rounds, before = [(0, before), *rounds], {}
    return mask_changes(before, rounds, run.strategy.specs)


def report(run: Run, state: ServerState, mlflow_run_id: str, tracking_uri: str) -> None:
    """Set the run's phase tag when the phase changed and, when due, log its plots. A failure (MLflow
    unreachable, say) is a warning and waits for nothing: a later checkpoint and the run's end try again."""
    phase = phase_at(max(state.round_num, 1), run.config.schedule) if strategy_phases(run.config) else None
    tag_due = phase is not None and _TAGGED.get(mlflow_run_id) != phase
    plots_due = state.round_num < run.config.schedule.num_rounds and PLOTS.due(mlflow_run_id)  # finalize draws the last
    if not (tag_due or plots_due):
        return
    started = time.monotonic()
    try:
        tracker = Tracker(tracking_uri, run.ref.experiment, run_id=mlflow_run_id, outage_budget_s=0)
        if tag_due and phase is not None:
            tracker.set_tags({PHASE_TAG: phase})
            _TAGGED[mlflow_run_id] = phase
        if plots_due:
            log_plots(tracker, run, state)
    except Exception as error:  # noqa: BLE001 - the tag and plots are a view of the run, never a reason to stop it
        get_run_logger().warning(f"phase tag or plots of round {state.round_num} not logged ({one_line(error)}): "
                                 "a later checkpoint tries again")
    if plots_due:
        PLOTS.drawn(mlflow_run_id, started)
