"""Every strategy through the Prefect flow equals `fedprune_core.simulate`, and resumes."""

from __future__ import annotations

import json
import shutil

import pytest

from fedprune_core.presets import preset
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


PRUNEFL = {"reconfig_every": 3, "initial_max_steps": 20, "initial_reconfig_every": 5, "initial_samples": 20}
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
