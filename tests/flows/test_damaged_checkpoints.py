"""A finished run whose newest checkpoint is damaged resumes from the newest round that verifies.

Each damage is done by hand to a finished toy run (12 rounds, a checkpoint every 3, all kept);
`fedprune resume` must then end with the run's own final weights, replaying the rounds after the
round it resumed from, set the damage aside under `damaged/`, say so in one warning line, and
leave one MLflow run holding each step once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from infra.checkpoint import CheckpointStore
from infra.storage import LocalStorage
from tests.flows.conftest import Cli
from tests.flows.helpers import final_state, weights_hash

pytestmark = pytest.mark.integration

ROUNDS = 12  # the toy preset's
ARGS = ("--preset", "toy", "--checkpoint-every", "3", "--keep-last", "10")
NEWEST = "rounds/000012"


def _flip_state(run: Path) -> None:
    path = run / NEWEST / "state.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate_manifest(run: Path) -> None:
    path = run / NEWEST / "manifest.json"
    path.write_bytes(path.read_bytes()[:50])


DAMAGES: dict[str, tuple[Callable[[Path], object], str]] = {
    # damage -> (how, the reason round 12 is set aside for; "" when round 12 itself is intact)
    "flipped-state": (_flip_state, "checksum"),
    "truncated-manifest": (_truncate_manifest, "bad-manifest"),
    "deleted-state": (lambda run: (run / NEWEST / "state.safetensors").unlink(), "missing-object"),
    "garbage-latest": (lambda run: (run / "LATEST").write_bytes(b"\x00not json"), ""),
    "deleted-latest": (lambda run: (run / "LATEST").unlink(), ""),
}
CASES = [(damage, "resume") for damage in DAMAGES] + [("flipped-state", "run")]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_one_mlflow_run_with_each_step_once(cli: Cli, run_id: str) -> None:
    client = MlflowClient(f"sqlite:///{cli.home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedprune")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], f"tags.`fedprune.run_id` = '{run_id}'")
    assert len(runs) == 1, "resume must reopen the same MLflow run"
    for key in ("train_loss", "sparsity", "round"):
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, key)]
        assert sorted(steps) == list(range(1, ROUNDS + 1)), key


@pytest.mark.parametrize(("damage", "command"), CASES)
def test_a_damaged_newest_checkpoint_resumes_from_the_newest_round_that_verifies(
    cli: Cli, damage: str, command: str
) -> None:
    first = cli("run", *ARGS, "--run-id", "hurt")
    assert first.returncode == 0, first.stderr[-3000:]
    uninterrupted = weights_hash(final_state(cli.home, "hurt").weights)
    run = cli.home / "storage" / "fedprune" / "hurt"
    intact = _files(run / NEWEST)
    how, reason = DAMAGES[damage]
    how(run)
    found = _files(run / NEWEST) if reason else {}  # what must turn up under damaged/, as found
    found |= {"LATEST": (run / "LATEST").read_bytes()} if damage == "garbage-latest" else {}

    resumed = cli("resume", "hurt", "--json") if command == "resume" else cli("run", *ARGS, "--run-id", "hurt",
                                                                               "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["resumed"] is True

    ended = final_state(cli.home, "hurt")
    assert ended.round_num == ROUNDS and weights_hash(ended.weights) == uninterrupted
    warnings = [line for line in resumed.stderr.splitlines() if "the newest round that verifies" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], resumed.stderr[-3000:]
    aside = _files(run / "damaged") if (run / "damaged").exists() else {}
    if reason:  # round 12 was set aside as found, and rounds 10-12 were computed again
        assert "resumes from round 9" in warnings[0] and f"round 12 ({reason})" in warnings[0]
        assert {name.split("/", 1)[0] for name in aside} == {next(iter(aside)).split("/", 1)[0]}
        assert next(iter(aside)).startswith(f"000012-{reason}-")
        assert {name.split("/", 1)[1]: data for name, data in aside.items()} == found
        again = _files(run / NEWEST)  # recommitted (a new manifest), with the bytes the first run wrote
        assert again["state.safetensors"] == intact["state.safetensors"]
        manifests = [json.loads(files["manifest.json"]) for files in (again, intact)]
        assert manifests[0]["created"] != manifests[1]["created"]
        assert [{k: v for k, v in m.items() if k != "created"} for m in manifests] == [
            {k: v for k, v in manifests[1].items() if k != "created"}] * 2
    else:  # round 12 itself verifies: the run resumes (and ends) there
        assert "resumes from round 12" in warnings[0]
        assert {name.split("/", 1)[1]: data for name, data in aside.items()} == found  # LATEST, or nothing
        assert _files(run / NEWEST) == intact
    _assert_one_mlflow_run_with_each_step_once(cli, "hurt")


def test_a_run_whose_rounds_all_fail_their_checks_stops_with_exit_2(cli: Cli) -> None:
    storage = LocalStorage(cli.home / "storage")
    store = CheckpointStore(storage, "fedprune", "broken")
    store.write_config({"preset": "toy", "overrides": {}, "options": {}, "experiment": {}})
    for round_num in (0, 3):
        store.commit(round_num, {"state": {"w": torch.full((2,), float(round_num))}}, {"mlflow_run_id": "x"})
        storage.put_bytes(store.object_key(round_num, "state"), b"overwritten")
    before = _files(cli.home / "storage")
    for command in (("resume", "broken"), ("run", *ARGS, "--run-id", "broken")):
        done = cli(*command, timeout=120)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "'fedprune/broken'" in done.stderr and "none verifies" in done.stderr
        assert "rounds: 0 (checksum), 3 (checksum)" in done.stderr and "Traceback" not in done.stderr
    assert _files(cli.home / "storage") == before  # nothing set aside, nothing started over
