"""Prefect tasks, one per step of a round: score, mask, dispatch, client_train, aggregate,
evaluate, checkpoint. Each loads its inputs by reference, makes one or two `fedprune_core` calls,
stores the result and returns a reference plus small metrics; no tensor crosses Prefect.

Task runs are named by one scheme (`tasks.options.round_task`): ``r{round:06d}-{step}[-c{client}]``.
Their INFO lines go to the Prefect API (each task run's page) and stay off the console."""

from infra.settings import task_runs_off_console

task_runs_off_console()  # in every process that runs tasks: the flow's, process-pool children, Dask workers
