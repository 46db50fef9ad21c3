"""Summarize: what a run reached and what a client carried, against dense, for the end of a run.

A client's model is the payload it downloads in the last round (`fedprune_core.engine.dispatch`);
dense is the full model, which a dense FedAvg client downloads and uploads each round. Traffic is the
run's mean per client and round, read back from the metrics MLflow holds (each round once, also
across resumes).
"""

from __future__ import annotations

from typing import Any

from prefect import task

from fedprune_core.engine import dispatch
from fedprune_core.submodel import extract, float_entries, payload_nbytes
from infra.runs import RunRef, open_run
from infra.tracking import mlflow_client
from tasks.options import IO_RETRIES

TRAFFIC = ("bytes_down", "bytes_up", "clients_done")
"""The per-round metrics traffic is summed from."""


@task(name="summarize", task_run_name="summarize", **IO_RETRIES)
def summarize(ref: RunRef, state_key: str, tracking_uri: str, mlflow_run_id: str) -> dict[str, Any]:
    """Returns the last evaluation's metrics (``evaluation``, with ``wer`` and ``cer`` when the workload
    has them, else None), a client's parameters and bytes per round, dense's, and their ratios
    (the keys of `flows.summary.FIELDS` they name)."""
    run = open_run(ref)
    rounds = run.config.schedule.num_rounds
    state = run.state(state_key, rounds)
    client = dispatch(run.strategy, state, state.masks, rounds, 0)
    dense = extract(state.weights, {}, {})
    mlflow = mlflow_client(tracking_uri)
    metrics = mlflow.get_run(mlflow_run_id).data.metrics
    totals = {k: sum(m.value for m in mlflow.get_metric_history(mlflow_run_id, k)) for k in TRAFFIC}
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
    }
