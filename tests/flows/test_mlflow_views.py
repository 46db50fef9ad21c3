"""What a run shows in MLflow, read back from real runs: plots during the run, mask changes that add
up, the phase tag, a dense run's table, and the compact speech model loaded by MLflow's own loader."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from torchaudio.models import RNNT

from fedprune_core.engine import masked_weights
from fedprune_core.presets import preset
from fedprune_core.speech.workload import SpeechWorkload
from infra.mlflow_model import compact_module, read_audio
from infra.speech_data import MANIFEST, read_manifest
from infra.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, PHASE_TAG, find_run
from infra.workloads import load
from tests.flows.conftest import Cli
from tests.flows.helpers import final_state
from tests.flows.test_resume import ROUNDS, kill_after_round

pytestmark = pytest.mark.integration

PLOTS = {"plots/metrics.png", "plots/layer_sparsity.png", "plots/mask_changes.png", "plots/mask_changes.csv",
         "plots/bytes.png"}


def client_of(cli: Cli) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cli.home / 'mlflow.db'}")


def mlflow_run(cli: Cli, run_id: str) -> str:
    found = find_run(client_of(cli), "fedprune", run_id)
    assert found is not None, f"run {run_id} is not in MLflow"
    return found


def artifact_csv(client: MlflowClient, mlflow_run_id: str, path: str, tmp: Path) -> list[dict[str, str]]:
    text = Path(client.download_artifacts(mlflow_run_id, path, str(tmp))).read_text()
    return list(csv.DictReader(io.StringIO(text)))


def test_plots_and_the_phase_show_during_the_run_and_mask_changes_add_up(cli: Cli, tmp_path: Path) -> None:
    kill_after_round(cli, "killed", 6)  # the first checkpoint (round 3) drew the plots; the run never ended
    client, mlflow_run_id = client_of(cli), mlflow_run(cli, "killed")
    run = client.get_run(mlflow_run_id)
    assert run.info.status == "RUNNING"
    assert run.data.tags[PHASE_TAG] in ("sparsify", "refine")  # round 3's phase, or round 6's if tagged before the kill
    assert {a.path for a in client.list_artifacts(mlflow_run_id, "plots")} == PLOTS
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    resumed = cli("resume", "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert client.get_run(mlflow_run_id).data.tags[PHASE_TAG] == "finetune"
    changes = artifact_csv(client, mlflow_run_id, "plots/mask_changes.csv", tmp_path)
    rounds = [int(c["round"]) for c in changes]
    config = preset("toy", {"schedule": {"num_rounds": ROUNDS}})
    assert rounds == sorted(set(rounds)) and 1 in rounds  # each round once across the kill and the resume
    assert max(rounds) <= config.schedule.sparsify_rounds + config.schedule.refine_rounds  # frozen after
    layers = artifact_csv(client, mlflow_run_id, "sparsity_per_layer.csv", tmp_path)
    prunable = [row for row in layers if row["prunable"] == "True"]
    pruned_now = sum(int(row["entries"]) - int(row["kept"]) for row in prunable)
    assert sum(int(c["pruned"]) - int(c["regrown"]) for c in changes) == pruned_now
    assert int(changes[-1]["kept"]) == sum(int(row["kept"]) for row in prunable)
    state = final_state(cli.home, "killed")
    assert pruned_now == sum(int((~m).sum()) for m in state.masks.values())


def test_a_dense_run_tables_every_parameter_whole_and_draws_no_mask_plots(cli: Cli, tmp_path: Path) -> None:
    done = cli("run", "--preset", "toy", "--set", "strategy=fedavg", "--run-id", "dense")
    assert done.returncode == 0, done.stderr[-3000:]
    client, mlflow_run_id = client_of(cli), mlflow_run(cli, "dense")
    assert {a.path for a in client.list_artifacts(mlflow_run_id, "plots")} == {"plots/metrics.png", "plots/bytes.png"}
    assert PHASE_TAG not in client.get_run(mlflow_run_id).data.tags
    rows = artifact_csv(client, mlflow_run_id, "sparsity_per_layer.csv", tmp_path)
    model = load("toy", "toy", 0, "unused").workload.build_model()
    assert [r["parameter"] for r in rows] == [n for n, _ in model.named_parameters()]
    assert all(r["kept"] == r["entries"] and r["sparsity"] == "0.0000" and r["prunable"] == "False" for r in rows)


@pytest.fixture
def tracking_uri_of(cli: Cli) -> Iterator[str]:
    """MLflow's global tracking URI set to the run's store for the test (`runs:/` and `models:/` URIs use it)."""
    uri = f"sqlite:///{cli.home / 'mlflow.db'}"
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(before)


@torch.no_grad()
def first_logits(model: RNNT, features: torch.Tensor, frames: torch.Tensor, blank: int) -> torch.Tensor:
    """``(1, T', 1, V)``: the joint's scores at every encoder frame after the blank start symbol."""
    encodings, lengths = model.transcribe(features, frames)
    one = torch.ones(1, dtype=torch.int32)
    prediction, _, _ = model.predict(torch.full((1, 1), blank), one, None)
    return model.join(encodings, lengths, prediction, one)[0]


SHORT_SPEECH = ("--preset", "tiny", "--set", "schedule.num_rounds=3", "--set", "schedule.sparsify_rounds=1",
                "--set", "schedule.refine_rounds=1", "--set", "federated.eval_every=3",
                "--set", "federated.local.lr=1e-9")
"""Three rounds of the speech preset, pruned to its sparsity; clients step at a rate of 1e-9, so the model keeps
its initial weights, whose transcripts are characters (a few trained rounds emit only blanks: "" = "")."""


def test_the_compact_speech_model_loads_with_mlflow_transcribes_as_the_server_and_registers(
    cli: Cli, tracking_uri_of: str
) -> None:
    done = cli("run", *SHORT_SPEECH, "--run-id", "speech")
    assert done.returncode == 0, done.stderr[-3000:]
    mlflow_run_id = mlflow_run(cli, "speech")
    listed = {a.path for a in client_of(cli).list_artifacts(mlflow_run_id, "model")}
    assert {"model/MLmodel", "model/artifacts", "model/code"} <= listed
    assert not any(p.endswith(".pkl") for p in listed)  # models from code: nothing pickled

    folder = sorted((cli.home / "data").glob("*/test_speakers/*"))[0]
    utterances = read_manifest(folder / MANIFEST)[:3]
    wavs = [str(folder / f"{u.utterance_id}.wav") for u in utterances]
    model = mlflow.pyfunc.load_model(f"runs:/{mlflow_run_id}/model")
    texts = model.predict(wavs)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts) and any(texts)
    assert model.predict(pd.DataFrame({"audio": wavs})) == texts

    config = preset("tiny")
    workload = load(config.model, config.corpus, config.seed, str(cli.home / "data")).workload
    assert isinstance(workload, SpeechWorkload)
    state = final_state(cli.home, "speech")
    server = workload.build_model()
    server.load_state_dict(masked_weights(state), strict=False)
    assert workload.transcribe(server.eval(), utterances) == texts  # the server's decoder, the same audio

    settings_path = Path(mlflow.artifacts.download_artifacts(f"runs:/{mlflow_run_id}/model/artifacts/model.json"))
    weights = mlflow.artifacts.download_artifacts(f"runs:/{mlflow_run_id}/model/artifacts/compact_model.safetensors")
    from safetensors.torch import load_file

    compact = compact_module(json.loads(settings_path.read_text()), load_file(weights))
    audio = read_audio(wavs[0])
    features, frames = workload.collate(utterances[:1]).features, workload.collate(utterances[:1]).feature_lengths
    assert torch.equal(audio, utterances[0].audio)
    blank = workload.vocabulary.blank  # the compact network scores what the masked full one does
    torch.testing.assert_close(first_logits(compact, features, frames, blank),
                               first_logits(server, features, frames, blank), rtol=1e-4, atol=1e-5)

    version = mlflow.register_model(f"runs:/{mlflow_run_id}/model", "fedprune-speech-test")
    assert int(version.version) == 1 and version.run_id == mlflow_run_id
    assert mlflow.pyfunc.load_model("models:/fedprune-speech-test/1").predict(wavs[:1]) == texts[:1]
