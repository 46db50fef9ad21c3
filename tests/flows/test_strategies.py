"""Every strategy through the Prefect flow equals `fedprune_core.simulate`, and resumes."""

from __future__ import annotations

import json
import shutil

import pytest

from fedprune_core.engine import ServerState
from fedprune_core.presets import preset
from fedprune_core.simulate import simulate
from fedprune_core.strategies.prunefl import TIME_CONSTANT, TIME_COST
from infra.checkpoint import CheckpointStore
from infra.runs import STATE_OBJECT
from infra.storage import open_storage
from infra.workloads import load
from tests.flows.conftest import Cli
from tests.flows.helpers import final_state, weights_hash
from tests.flows.test_flow import reference

pytestmark = pytest.mark.integration


def rewind(cli: Cli, run_id: str) -> int:
    """What a crash right after the oldest kept checkpoint leaves: later rounds never committed."""
    run_dir = cli.home / "storage" / "fedprune" / run_id
    to_round = min(int(d.name) for d in (run_dir / "rounds").iterdir() if int(d.name) > 0)
    for round_dir in (run_dir / "rounds").iterdir():
        if int(round_dir.name) > to_round:
            shutil.rmtree(round_dir)
    (run_dir / "LATEST").write_text(json.dumps({"round": to_round}))
    return to_round


PRUNEFL = {"reconfig_every": 3, "initial_max_steps": 20, "initial_reconfig_every": 5, "initial_samples": 20,
           "time_model": "constant"}  # the flow and `simulate` would each measure their own time model
RUNS = {
    "fed_dropout": {"strategy": "fed_dropout"},
    "prunefl": {"strategy": "prunefl", "prunefl": PRUNEFL},
    # clients upload squared gradients, and the server keeps them in the checkpointed state
    "fedprune-grad-sq": {"strategy": "fedprune", "pruning": {"score_source": "grad_sq"}},
}


@pytest.mark.parametrize("run_id", list(RUNS))
def test_flow_equals_simulate_and_resumes(cli: Cli, run_id: str) -> None:
    overrides = RUNS[run_id]
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    args = ("run", "--preset", "toy", "--run-id", run_id, "--checkpoint-every", "4", "--rounds-per-segment", "6",
            *sets)
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = weights_hash(reference(overrides))
    assert weights_hash(final_state(cli.home, run_id).weights) == expected

    assert rewind(cli, run_id) < preset("toy").schedule.num_rounds
    resumed = cli("resume", run_id)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = final_state(cli.home, run_id)
    assert state.round_num == preset("toy").schedule.num_rounds
    assert weights_hash(state.weights) == expected


def test_prunefl_measured_time_model_is_measured_once_and_kept_through_a_resume(cli: Cli) -> None:
    """The flow measures the time model in round 0 and every later round, also after a resume, uses
    that one: the run ends where `simulate` from the flow's own round 0 ends."""
    prunefl = {"reconfig_every": 3, "initial_max_steps": 20, "initial_reconfig_every": 5, "initial_samples": 20,
               "time_model": "measured", "profile_repeats": 2}
    args = ("run", "--preset", "toy", "--run-id", "measured", "--checkpoint-every", "4", "--rounds-per-segment", "6",
            "--set", "strategy=prunefl", "--set", f"prunefl={json.dumps(prunefl)}")
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    store = CheckpointStore(open_storage((cli.home / "storage").as_uri()), "fedprune", "measured")
    start = ServerState.from_flat(0, store.load(0).tensors[STATE_OBJECT])
    timing = {k: t for k, t in start.extra.items() if k == TIME_CONSTANT or k.startswith(TIME_COST)}
    assert TIME_CONSTANT in timing and len(timing) == 4  # T0 and the toy's three weights
    config = preset("toy", {"strategy": "prunefl", "prunefl": prunefl})
    data = load(config.model, config.corpus, config.seed, "unused")
    expected = weights_hash(simulate(data.workload, data.clients, config, state=start).state.weights)
    assert weights_hash(final_state(cli.home, "measured").weights) == expected

    assert rewind(cli, "measured") < config.schedule.num_rounds
    resumed = cli("resume", "measured")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = final_state(cli.home, "measured")
    assert weights_hash(state.weights) == expected
    assert all(float(state.extra[k]) == float(t) for k, t in timing.items())
