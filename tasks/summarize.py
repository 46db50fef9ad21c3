"""Summarize: what a run reached and what a client carried and computed, against dense, for the end of a run.

A client's model is the payload it downloads in the last round (`fedprune_core.engine.dispatch`);
dense is the full model, which a dense FedAvg client downloads and uploads each round. Traffic is the
run's mean per client and round, and FLOPs the mean per local step over the rounds that counted them,
read back from the metrics MLflow holds (each round once, also across resumes). With the run's
`target`, the first round that reached it and the clients' time and bytes up to it
(`fedprune_core.budget.reached`).
"""

from __future__ import annotations

from typing import Any

from mlflow.tracking import MlflowClient
from prefect import task

from fedprune_core.budget import MODELLED, TARGET_METRICS, reached
from fedprune_core.engine import dispatch
from fedprune_core.submodel import extract, float_entries, payload_nbytes
from infra.runs import RunRef, open_run
from infra.tracking import mlflow_client
from tasks.options import IO_RETRIES

TRAFFIC = ("bytes_down", "bytes_up", "clients_done")
"""The per-round metrics traffic is summed from."""
HISTORY = (*TRAFFIC, "client_time_s_max", "client_flops", "dense_flops", MODELLED, *TARGET_METRICS)
"""The per-round metrics read back for the summary."""


def metric_history(mlflow: MlflowClient, run_id: str, keys: tuple[str, ...]) -> list[dict[str, float]]:
    """The run's per-round metrics `keys`, one dict per round (with ``round``), in round order."""
    rows: dict[int, dict[str, float]] = {}
    for key in keys:
        for m in mlflow.get_metric_history(run_id, key):
            rows.setdefault(m.step, {"round": float(m.step)})[key] = m.value
    return [rows[r] for r in sorted(rows)]


def flops_facts(history: list[dict[str, float]]) -> dict[str, float | None]:
    """A client's and dense's FLOPs per local step (means over the rounds that counted them) and their ratio."""
    counted = [row for row in history if "dense_flops" in row]
    if not counted:
        return {"client_flops_per_step": None, "dense_flops_per_step": None, "flops_vs_dense": None}
    client = sum(row["client_flops"] for row in counted) / len(counted)
    dense = sum(row["dense_flops"] for row in counted) / len(counted)
    return {"client_flops_per_step": client, "dense_flops_per_step": dense, "flops_vs_dense": client / dense}


def target_facts(history: list[dict[str, float]], target: float | None) -> dict[str, Any]:
    """Where the run first reached `target` on its headline metric (all None without a target or when never)."""
    metric = next((k for k in TARGET_METRICS if any(k in row for row in history)), None)
    hit = reached(history, metric, target) if metric is not None and target is not None else None
    return {"target": target, "target_metric": metric if target is not None else None,
            "target_round": hit.round_num if hit else None, "target_client_time_s": hit.client_time_s if hit else None,
            "target_client_bytes": hit.client_bytes if hit else None,
            "target_modelled_time_s": hit.modelled_time_s if hit else None}


@task(name="summarize", task_run_name="summarize", **IO_RETRIES)
def summarize(ref: RunRef, state_key: str, tracking_uri: str, mlflow_run_id: str) -> dict[str, Any]:
    """Returns the last evaluation's metrics (``evaluation``, with ``wer`` and ``cer`` when the workload
    has them, else None), a client's parameters, bytes per round and FLOPs per step, dense's, their
    ratios, and the run's target facts (the keys of `flows.summary.FIELDS` they name)."""
    run = open_run(ref)
    rounds = run.config.schedule.num_rounds
    state = run.state(state_key, rounds)
    client = dispatch(run.strategy, state, state.masks, rounds, 0)
    dense = extract(state.weights, {}, {})
    mlflow = mlflow_client(tracking_uri)
    metrics = mlflow.get_run(mlflow_run_id).data.metrics
    history = metric_history(mlflow, mlflow_run_id, HISTORY)
    totals = {k: sum(row.get(k, 0.0) for row in history) for k in TRAFFIC}
    clients = max(totals["clients_done"], 1.0)
    evaluation = {k: v for k, v in sorted(metrics.items()) if k.startswith("eval_")}
    sizes = {"client_parameters": float_entries(client), "dense_parameters": float_entries(dense),
             "bytes_down_per_round": totals["bytes_down"] / clients, "bytes_up_per_round": totals["bytes_up"] / clients,
             "dense_bytes_per_round": payload_nbytes(dense)}
    return {
        "wer": evaluation.get("eval_wer"), "cer": evaluation.get("eval_cer"), "evaluation": evaluation, **sizes,
        "client_parameters_vs_dense": sizes["client_parameters"] / sizes["dense_parameters"],
        "bytes_down_vs_dense": sizes["bytes_down_per_round"] / sizes["dense_bytes_per_round"],
        "bytes_up_vs_dense": sizes["bytes_up_per_round"] / sizes["dense_bytes_per_round"],
        **flops_facts(history), **target_facts(history, run.config.target),
    }
