"""Failed and late clients are left out of their rounds; who took part is recorded and replayed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fedprune_core.presets import preset
from fedprune_core.rng import sample_clients
from fedprune_core.simulate import simulate
from infra.speech_data import MANIFEST, read_index
from infra.tracking import FAILURE_TAG
from infra.workloads import load
from tests.flows.conftest import Cli
from tests.flows.helpers import final_state, weights_hash

pytestmark = pytest.mark.integration

ROUNDS = 6
OVERRIDES = {
    "schedule": {"num_rounds": ROUNDS, "sparsify_rounds": 2, "refine_rounds": 2},
    "federated": {"clients_per_round": 3, "min_clients": 2, "eval_every": 100, "local": {"steps": 1}},
}
SETS = ("--set", f"schedule.num_rounds={ROUNDS}", "--set", "schedule.sparsify_rounds=2", "--set",
        "schedule.refine_rounds=2", "--set", "federated.clients_per_round=3", "--set", "federated.min_clients=2",
        "--set", "federated.eval_every=100", "--set", "federated.local.steps=1")
ARGS = ("--preset", "tiny", *SETS, "--checkpoint-every", "2", "--keep-last", "10")


def corpus_root(home: Path) -> Path:
    (root,) = [p.parent for p in (home / "data").glob("*/index.json")]
    return root


def first_audio(home: Path, client: int) -> Path:
    """The first audio file of training client `client` in the run's corpus."""
    root = corpus_root(home)
    speaker = list(read_index(root)["splits"]["train"])[client]
    manifest = root / "train" / speaker / MANIFEST
    return manifest.parent / json.loads(manifest.read_text().splitlines()[0])["audio"]


def reference_weights(home: Path) -> str:
    config = preset("tiny", OVERRIDES)
    data = load(config.model, config.corpus, config.seed, str(home / "data"))
    return weights_hash(simulate(data.workload, data.clients, config).state.weights)


def mlflow_run(home: Path, run_id: str):  # noqa: ANN201 - an MLflow Run
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fedprune").experiment_id],
                                f"tags.`fedprune.run_id` = '{run_id}'")
    return client, run


def test_a_client_with_corrupt_audio_is_left_out_recorded_and_replayed(cli: Cli) -> None:
    assert cli("data", "generate", "--corpus", "test").returncode == 0
    config = preset("tiny", OVERRIDES)
    sampled = {r: sample_clients(4, 3, config.seed, r) for r in range(1, ROUNDS + 1)}
    bad = next(c for c in range(4) if 0 < sum(c in s for s in sampled.values()) < ROUNDS)
    hit = [r for r, s in sampled.items() if bad in s]
    audio = first_audio(cli.home, bad)
    original = audio.read_bytes()
    audio.write_bytes(b"RIFF not a wave file")

    done = cli("run", *ARGS, "--run-id", "flaky")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"left out client {bad}: ClientDataError" in done.stderr
    whole = weights_hash(final_state(cli.home, "flaky").weights)
    assert whole == reference_weights(cli.home), "the flow under failures must equal simulate under failures"

    client, run = mlflow_run(cli.home, "flaky")
    left_out = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "clients_left_out")}
    assert left_out == {r: float(r in hit) for r in range(1, ROUNDS + 1)}
    table = Path(client.download_artifacts(run.info.run_id, "participation.csv")).read_text().splitlines()
    assert {line.split(",")[0] for line in table[1:]} == {str(r) for r in hit}
    assert sum(f",{bad},left_out," in line for line in table) == len(hit)
    base = cli.home / "storage" / "fedprune" / "flaky"
    manifests = [json.loads((base / "rounds" / f"{r:06d}" / "manifest.json").read_text()) for r in (2, 4, 6)]
    assert sorted(p["round"] for m in manifests for p in m["meta"].get("left_out", [])) == hit

    # A crash after round 2: rounds 3-6 run again, now with the client's audio repaired. The recorded
    # rounds must train the clients they trained the first time, so the run ends where it did.
    audio.write_bytes(original)
    assert reference_weights(cli.home) != whole, "with the audio repaired, a fresh run would differ"
    for r in (4, 6):
        shutil.rmtree(base / "rounds" / f"{r:06d}")
    (base / "LATEST").write_text(json.dumps({"round": 2}))
    resumed = cli("resume", "flaky")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert weights_hash(final_state(cli.home, "flaky").weights) == whole


def test_clients_past_the_deadline_stop_the_run_naming_them_and_fail_its_mlflow_run(cli: Cli) -> None:
    done = cli("run", *ARGS, "--run-id", "late", "--set", "federated.client_timeout_s=0.001",
               "--set", "federated.round_tries=2")
    assert done.returncode != 0
    assert "round 1: 0 of the sampled clients finished in 2 tries, 2 needed" in done.stderr
    assert "missed the deadline (federated.client_timeout_s=0.001)" in done.stderr
    _, run = mlflow_run(cli.home, "late")
    assert run.info.status == "FAILED"
    assert run.data.tags[FAILURE_TAG].startswith("RoundFailedError: round 1:")


def test_a_start_that_fails_before_round_0_leaves_no_running_mlflow_run(cli: Cli) -> None:
    """PruneFL's initial pruning reads one client's data before round 0: unreadable, the start fails and
    its MLflow run ends FAILED with the run id and the reason; a start killed before round 0 (its run left
    RUNNING) is ended FAILED when the run id is started again."""
    assert cli("data", "generate", "--corpus", "test").returncode == 0
    audio = first_audio(cli.home, 1)
    original = audio.read_bytes()
    audio.write_bytes(b"RIFF not a wave file")
    prunefl = ("--set", "strategy=prunefl", "--set", "prunefl.initial_client=1", "--set",
               "prunefl.initial_max_steps=2", "--set", "prunefl.initial_reconfig_every=1")
    failed = cli("run", *ARGS, *prunefl, "--run-id", "early")
    assert failed.returncode != 0
    client, run = mlflow_run(cli.home, "early")
    assert run.info.status == "FAILED"
    assert "ClientDataError: client 1" in run.data.tags[FAILURE_TAG]

    killed = client.create_run(run.info.experiment_id, run_name="early", tags={"fedprune.run_id": "early"})
    audio.write_bytes(original)
    done = cli("run", *ARGS, *prunefl, "--run-id", "early")
    assert done.returncode == 0, done.stderr[-3000:]
    runs = client.search_runs([run.info.experiment_id], "tags.`fedprune.run_id` = 'early'")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED", "FINISHED"]
    assert client.get_run(killed.info.run_id).info.status == "FAILED"
