"""Finalize: the run's artifacts in MLflow and storage.

The configuration, a per-layer sparsity table, plots of the evaluation metric and sparsity over
rounds, and the final compact model (pruned weights removed, as a client would download it).
"""

from __future__ import annotations

import csv
import io
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from prefect import task

from fedprune_core.engine import layer_sparsity
from fedprune_core.submodel import extract
from infra.runs import RunRef, open_run
from infra.storage import tensors_to_bytes
from infra.tracking import Tracker
from tasks.options import IO_RETRIES


def sparsity_table(masks: dict, specs: dict) -> str:
    """CSV: parameter, shape, entries, kept, sparsity."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["parameter", "shape", "entries", "kept", "sparsity"])
    for name, shape, entries, kept in layer_sparsity(masks, specs):
        writer.writerow([name, "x".join(map(str, shape)), entries, kept, f"{1 - kept / entries:.4f}"])
    return out.getvalue()


def _plot(tracker: Tracker, keys: list[str]) -> bytes | None:
    history = {k: tracker.metric_history(k) for k in keys}
    history = {k: v for k, v in history.items() if v}
    if not history:
        return None
    fig, axes = plt.subplots(len(history), 1, figsize=(7, 2.6 * len(history)), squeeze=False)
    for ax, (key, points) in zip(axes[:, 0], history.items(), strict=True):
        points = sorted(points, key=lambda m: m.step)
        ax.plot([m.step for m in points], [m.value for m in points], marker="." if len(points) < 50 else None)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("round")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


@task(name="finalize", task_run_name="finalize", **IO_RETRIES)
def finalize(ref: RunRef, state_key: str, tracking_uri: str, mlflow_run_id: str) -> None:
    """Writes the run's artifacts to MLflow and the compact model to storage."""
    run = open_run(ref)
    tracker = Tracker(tracking_uri, ref.experiment, run_id=mlflow_run_id)
    state = run.state(state_key, run.config.schedule.num_rounds)
    compact = tensors_to_bytes(extract(state.weights, state.masks, run.strategy.specs))
    run.checkpoints.put_artifact("compact_model.safetensors", compact)
    tracker.log_artifact_bytes("config.json", json.dumps(run.checkpoints.read_config(), indent=2).encode())
    tracker.log_artifact_bytes("sparsity_per_layer.csv", sparsity_table(state.masks, run.strategy.specs).encode())
    tracker.log_artifact_bytes("model/compact_model.safetensors", compact)
    for name, keys in {"plots/eval.png": ["eval_wer", "eval_cer", "eval_accuracy", "eval_loss"],
                       "plots/sparsity.png": ["sparsity", "bytes_down", "train_loss"]}.items():
        png = _plot(tracker, keys)
        if png is not None:
            tracker.log_artifact_bytes(name, png)
