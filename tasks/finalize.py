"""Finalize: the run's artifacts in MLflow and storage.

The configuration, every parameter's sparsity, the run's plots (`infra.plots`, drawn a last time)
and the final compact model (pruned weights removed, as a client would download it): in storage as
safetensors, in MLflow as an MLflow model a speech run's users load and transcribe with
(`infra.mlflow_model`).
"""

from __future__ import annotations

import csv
import io
import json

from prefect import task
from torch import nn

from fedprune_core.engine import layer_sparsity
from fedprune_core.prunable import PrunableSpec
from fedprune_core.speech.workload import SpeechWorkload
from fedprune_core.submodel import extract
from fedprune_core.types import MaskDict
from infra.mlflow_model import MODEL_PATH, WEIGHTS, log_model, speech_settings
from infra.plots import log_plots
from infra.runs import Run, RunRef, open_run
from infra.storage import tensors_to_bytes
from infra.tracking import Tracker
from tasks.options import IO_RETRIES


def sparsity_table(model: nn.Module, masks: MaskDict, specs: dict[str, PrunableSpec]) -> str:
    """CSV, one line per parameter of `model` (in its order): parameter, shape, entries, kept, sparsity,
    and whether the strategy prunes or slices it (``prunable``); a dense run's lines keep every entry."""
    kept = {name: k for name, _, _, k in layer_sparsity(masks, specs)}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["parameter", "shape", "entries", "kept", "sparsity", "prunable"])
    for name, p in model.named_parameters():
        held = kept.get(name, p.numel())
        writer.writerow([name, "x".join(map(str, p.shape)), p.numel(), held, f"{1 - held / p.numel():.4f}",
                         name in specs])
    return out.getvalue()


def log_compact_model(tracker: Tracker, run: Run, compact: bytes) -> None:
    """Store the compact model as artifact ``model/`` of the run: a speech run's as an MLflow model,
    any other's as its bare safetensors (``model/compact_model.safetensors``)."""
    workload = run.data.workload
    if isinstance(workload, SpeechWorkload):
        log_model(tracker, speech_settings(run.config, workload), compact)
    else:
        tracker.log_artifact_bytes(f"{MODEL_PATH}/{WEIGHTS}", compact)


@task(name="finalize", task_run_name="finalize", **IO_RETRIES)
def finalize(ref: RunRef, state_key: str, tracking_uri: str, mlflow_run_id: str) -> None:
    """Writes the run's artifacts to MLflow and the compact model to storage."""
    run = open_run(ref)
    tracker = Tracker(tracking_uri, ref.experiment, run_id=mlflow_run_id)
    state = run.state(state_key, run.config.schedule.num_rounds)
    compact = tensors_to_bytes(extract(state.weights, state.masks, run.strategy.specs))
    run.checkpoints.put_artifact(WEIGHTS, compact)
    tracker.log_artifact_bytes("config.json", json.dumps(run.checkpoints.read_config(), indent=2).encode())
    table = sparsity_table(run.data.workload.build_model(), state.masks, run.strategy.specs)
    tracker.log_artifact_bytes("sparsity_per_layer.csv", table.encode())
    log_plots(tracker, run, state)
    log_compact_model(tracker, run, compact)
