"""Evaluate: the (masked) global model on the held-out set."""

from __future__ import annotations

from prefect import task

from fedprune_core.engine import evaluate as evaluate_state
from infra.runs import RunRef, open_run
from tasks.options import IO_RETRIES, round_task


@task(name="evaluate", task_run_name=round_task("evaluate"), **IO_RETRIES)
def evaluate(ref: RunRef, round_num: int, state_key: str) -> dict[str, float]:
    """Returns metrics prefixed `eval_` (e.g. eval_wer, eval_cer, eval_loss)."""
    run = open_run(ref)
    metrics = evaluate_state(run.data.workload, run.state(state_key, round_num), run.data.eval_examples)
    return {f"eval_{k}": v for k, v in metrics.items()}
