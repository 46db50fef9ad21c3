"""`make run`'s demo: through the real CLI and Prefect flow, the `demo` preset's WER falls while each
client holds about half the model."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fedprune_core.config import ExperimentConfig
from fedprune_core.engine import ServerState
from fedprune_core.presets import preset
from fedprune_core.prunable import find_prunable
from fedprune_core.speech.model import build_model
from fedprune_core.submodel import extract
from fedprune_core.types import Payload
from tests.flows.conftest import Cli
from tests.flows.helpers import final_state

SHORT = ("--set", "schedule.num_rounds=20", "--set", "federated.eval_every=10")
"""The demo's first 20 of 24 rounds (sparsify 1-8, refine 9-16, fine-tune 17-20), evaluated at 10 and 20."""
MAX_FINAL_WER = 0.45
"""Measured on the 2-core VM with `simulate` (the numbers of the flow as `make run` runs it, one intra-op
thread), seeds 0, 1, 2: WER 0.81, 0.82, 0.81 at round 10 and 0.16, 0.14, 0.14 at round 20."""


def make_run() -> tuple[dict[str, str], list[str]]:
    """The environment assignments and `fedprune` arguments of the Makefile's `run` recipe (the README's
    main command)."""
    lines = (Path(__file__).parents[2] / "Makefile").read_text().splitlines()
    recipe = lines[lines.index("run: setup") + 1].split()
    command = recipe.index(".venv/bin/fedprune")
    return dict(a.split("=", 1) for a in recipe[:command]), recipe[command + 1:]


def client_share(state: ServerState, config: ExperimentConfig) -> float:
    """Float entries of the payload a client downloads under `state`'s masks, against the dense model's."""
    p = config.pruning
    specs = find_prunable(build_model(config.model), p.prunable, p.pattern, p.include_1d)

    def floats(payload: Payload) -> int:
        return sum(t.numel() for t in payload.values() if t.is_floating_point())

    return floats(extract(state.weights, state.masks, specs)) / floats(extract(state.weights, {}, {}))


def test_make_run_runs_the_demo_preset() -> None:
    assert make_run() == ({"OMP_NUM_THREADS": "1"}, ["run", "--preset", "demo"])


def test_demo_dense_is_the_demo_as_dense_fedavg() -> None:
    assert preset("demo-dense").replace({"strategy": "fedprune", "name": "demo"}) == preset("demo")


@pytest.mark.integration
def test_the_demo_learns_while_each_client_holds_half_the_model(cli: Cli) -> None:
    env, args = make_run()
    done = Cli(cli.home, {**cli.env, **env})(*args, "--run-id", "demo", *SHORT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{cli.home / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("fedprune").experiment_id])[0]
    wer = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval_wer")}
    assert sorted(wer) == [10, 20]
    assert wer[20] < MAX_FINAL_WER and wer[10] - wer[20] > 0.3, wer  # falls clearly, from near 100%
    state = final_state(cli.home, "demo")
    assert state.round_num == 20
    assert 0.4 < client_share(state, preset("demo")) < 0.55
