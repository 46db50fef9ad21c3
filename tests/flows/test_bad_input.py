"""Bad input to every command: exit code 2, exactly one line on stderr that names the value given,
no file written under FEDPRUNE_HOME, and no flow run on the Prefect server.

Each case runs `fedprune` in a child process, as a user does. `check_services` may create the
empty storage directory (as every run does); no other path under FEDPRUNE_HOME may appear or change.
A case marked `EXISTING` runs against a home that holds one finished run, `existing`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import SyncPrefectClient

from fedprune_core.config import MAX_ROUNDS, MAX_SEED
from tests.flows.conftest import Cli

pytestmark = pytest.mark.integration

HUGE = "100000000000000000000"  # > 2**64: what made the Prefect server's flow-run listing fail
FRESH, EXISTING = "fresh", "existing"


@dataclass(frozen=True)
class Case:
    """`fedprune ARGS` (with ENV on top of the test's) must fail naming `shown` on its one stderr line.

    "{inputs}" in args or env stands for a directory of prepared files (see `inputs`).
    """

    args: tuple[str, ...]
    shown: str
    env: dict[str, str] = field(default_factory=dict)
    home: str = FRESH


def case(*args: str, shown: str, env: dict[str, str] | None = None, home: str = FRESH) -> Any:
    return pytest.param(Case(args, shown, env or {}, home), id=" ".join(args)[:60] + (f" {env}" if env else ""))


RUN = ("run", "--preset", "toy")
CASES = [
    # reported
    case(*RUN, "--set", f"schedule.num_rounds={HUGE}", shown=f"{HUGE} must be in [0, {MAX_ROUNDS}] (MAX_ROUNDS)"),
    case(*RUN, "--run-id", "existing", "--set", "pruning.sparsity=0.3", home=EXISTING,
         shown="pruning.sparsity: 0.5 stored, 0.3 given"),
    case(*RUN, "--run-id", "existing", "--keep-last", "5", home=EXISTING, shown="options.keep_last: 3 stored, 5 given"),
    case("run", "--preset", "tiny", "--run-id", "existing", home=EXISTING, shown="corpus: 'toy' stored, 'test' given"),
    case(*RUN, "--experiment", "../x", shown="experiment='../x'"),
    case(*RUN, "--config", "{inputs}/array.json", shown="array.json' holds an array, not an object"),
    case(*RUN, env={"FEDPRUNE_TRACKING_URI": "notascheme"}, shown="FEDPRUNE_TRACKING_URI='notascheme'"),
    case(*RUN, "--config", "{inputs}/empty.json", shown="empty.json' is empty"),
    case(*RUN, "--config", "{inputs}/invalid.json", shown="invalid.json' is not valid JSON (Expecting value at line 2"),
    # options of `run`
    case(*RUN, "--rounds-per-segment", "ten", shown="'ten'"),
    case(*RUN, "--rounds-per-segment", "-5", shown="rounds_per_segment=-5"),
    case(*RUN, "--keep-every", HUGE, shown=f"keep_every={HUGE}"),
    case(*RUN, "--task-runner", "bogus", shown="task_runner='bogus'"),
    case(*RUN, "--max-workers", "0", shown="max_workers=0"),
    case(*RUN, "--max-workers", "100000", shown="max_workers=100000"),
    case(*RUN, "--run-id", "a/b", shown="run_id='a/b'"),
    case(*RUN, "--run-id", "a.b", shown="run_id='a.b'"),
    case(*RUN, "--run-id", "a b", shown="run_id='a b'"),
    case(*RUN, "--run-id", "r" * 65, shown=f"run_id='{'r' * 65}'"),
    case(*RUN, "--config", "{inputs}", shown="--config '{inputs}' cannot be read (Is a directory)"),
    case(*RUN, "--config", "{inputs}/binary.json", shown="binary.json' cannot be read (UnicodeDecodeError)"),
    case(*RUN, "--config", "{inputs}/missing.json", shown="missing.json' cannot be read (No such file or directory)"),
    case(*RUN, "--config", "{inputs}/section.json", "--set", "pruning.sparsity=0.3",
         shown="'pruning.sparsity=0.3' sets a key inside 'pruning', which is a value (0.5)"),
    # --set
    case(*RUN, "--set", "pruning.sparsity", shown="--set 'pruning.sparsity' must look like section.key=value"),
    case(*RUN, "--set", "pruning..sparsity=0.3", shown="--set 'pruning..sparsity=0.3'"),
    case(*RUN, "--set", "pruning.sparsity=abc", shown="'pruning.sparsity'='abc' must be of type float"),
    case(*RUN, "--set", "pruning.sparsity=[0.1, 0.2]", shown="'pruning.sparsity'=[0.1, 0.2] must be of type float"),
    case(*RUN, "--set", "schedule.num_rounds=true", shown="'schedule.num_rounds'=True must be of type int"),
    case(*RUN, "--set", "federated.local.steps=1e20", shown="'federated.local.steps'=1e+20 must be of type int"),
    case(*RUN, "--set", "pruning.sparsity=NaN", shown="sparsity=nan"),
    case(*RUN, "--set", "federated.server_lr=Infinity", shown="'federated.server_lr'=inf must be a finite number"),
    case(*RUN, "--set", "prunefl.removal_halflife=1e999", shown="'prunefl.removal_halflife'=inf"),
    case(*RUN, "--set", "pruning.sparsity=1.0", shown="sparsity=1.0 must be a fraction in [0, 1)"),
    case(*RUN, "--set", "federated.clients_per_round=0", shown="clients_per_round=0"),
    case(*RUN, "--set", "federated.clients_per_round=9", shown="clients_per_round=9 exceeds the 8 clients"),
    case(*RUN, "--set", "seed=-1", shown=f"'seed'=-1 must be in [0, {MAX_SEED}]"),
    case(*RUN, "--set", f"seed={2**63}", shown=f"'seed'={2**63}"),
    case(*RUN, "--set", "federated.local.max_grad_norm=\"abc\"", shown="'federated.local.max_grad_norm'='abc'"),
    case(*RUN, "--set", "fed_dropout.layer_rates=[1]", shown='{"layer_rates": [1]}'),
    case(*RUN, "--set", "pruning=0.5", shown="'pruning'=0.5 must be a mapping"),
    case(*RUN, "--set", "name=\"a b\"", shown="name='a b'"),
    case(*RUN, "--set", "schedule.ramp=exp", shown="ramp='exp'"),
    case("run", "--preset", "tiny", "--set", "corpus=nope", shown="corpus='nope'"),
    case("run", "--preset", "tiny", "--set", "model=nope", shown="model='nope' is not served by a registered workload"),
    # settings
    case(*RUN, env={"FEDPRUNE_STORAGE_URL": "ftp://host/x"}, shown="'ftp://host/x' has unsupported scheme 'ftp'"),
    case(*RUN, env={"FEDPRUNE_STORAGE_URL": "s3://bucket", "FEDPRUNE_S3_ENDPOINT_URL": "http://127.0.0.1:9"},
         shown="S3 endpoint http://127.0.0.1:9 is unreachable"),
    case(*RUN, env={"FEDPRUNE_S3_ENDPOINT_URL": "notaurl"}, shown="FEDPRUNE_S3_ENDPOINT_URL='notaurl'"),
    case(*RUN, env={"FEDPRUNE_HOME": "{inputs}/array.json"}, shown="array.json' must be a directory"),
    case(*RUN, env={"FEDPRUNE_PREFECT_PORT": "70000"}, shown="FEDPRUNE_PREFECT_PORT='70000'"),
    case(*RUN, env={"PREFECT_API_URL": "notaurl"}, shown="PREFECT_API_URL='notaurl'"),
    # other commands
    case("resume", "no-such-run", shown="run_id='no-such-run' does not exist"),
    case("resume", "a b", shown="run_id='a b'"),
    case("resume", "existing", "--experiment", "../x", home=EXISTING, shown="experiment='../x'"),
    case("runs", "list", "--experiment", "../x", shown="experiment='../x'"),
    case("runs", "list", env={"FEDPRUNE_STORAGE_URL": "ftp://host/x"}, shown="'ftp://host/x'"),
    case("sweep", "--warmup-rounds", "x", shown="--warmup-rounds 'x'"),
    case("sweep", "--warmup-rounds", HUGE, shown=HUGE),
    case("sweep", "--preset", "nope", shown="preset='nope'"),
    case("sweep", "--name", "a b", shown="'a b'"),
    case("sweep", "--parallel", "100000", shown="--parallel 100000"),
    case("sweep", "--clients-per-round", "100", shown="clients_per_round=100 exceeds the 64 clients"),
    case("sweep", "--out-dir", "{inputs}/array.json/results", shown="array.json/results' must be a directory"),
    case("compare", "--rounds", "6", shown="rounds=6"),
    case("compare", "--budgets", "0.5,1.5", shown="--budgets '0.5,1.5'"),
    case("compare", "--seeds", "x", shown="--seeds 'x'"),
    case("compare", "--seeds", HUGE, shown=HUGE),
    case("compare", "--name", "a b", shown="'a b'"),
    case("compare", "--budgets", "0.9,0.01,0.005", shown="middle budget 0.01 is below the smallest client"),
    case("data", "generate", "--corpus", "nope", shown="corpus='nope'"),
    case("stack", "status", env={"FEDPRUNE_S3_PORT": "60000"}, shown="FEDPRUNE_S3_PORT='60000'"),
    case("stack", "up", "--bogus", shown="No such option: --bogus"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files the cases pass as --config, FEDPRUNE_HOME or --out-dir."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "array.json").write_text('[{"pruning": {"sparsity": 0.3}}]')
    (folder / "empty.json").write_text("\n")
    (folder / "invalid.json").write_text('{"pruning":\n')
    (folder / "binary.json").write_bytes(b"\xff\xfe\x00{")
    (folder / "section.json").write_text('{"pruning": 0.5}')
    return folder


@pytest.fixture(scope="module")
def existing(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Path:
    """A home holding one finished toy run, `existing`."""
    home = tmp_path_factory.mktemp("existing") / "home"
    done = _cli(home, prefect_api)(*RUN, "--run-id", "existing")
    assert done.returncode == 0, done.stderr[-3000:]
    return home


def _cli(home: Path, prefect_api: str, extra: dict[str, str] | None = None) -> Cli:
    env = {**os.environ, "FEDPRUNE_HOME": str(home), "PREFECT_API_URL": prefect_api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(extra or {})}
    for key in ("FEDPRUNE_STORAGE_URL", "FEDPRUNE_TRACKING_URI", "FEDPRUNE_S3_ENDPOINT_URL"):
        if key not in (extra or {}):
            env.pop(key, None)
    return Cli(home, env)


def flow_runs(prefect_api: str) -> int:
    """How many flow runs the Prefect server holds."""
    with SyncPrefectClient(prefect_api) as client:
        return client.count_flow_runs()


def tree(home: Path) -> dict[str, tuple[int, int]]:
    """Every path under `home`: files with (size, mtime in ns), directories as (-1, 0)."""
    if not home.is_dir():
        return {}
    return {str(p.relative_to(home)): (-1, 0) if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(home.rglob("*"))}


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    bad: Case, request: pytest.FixtureRequest, tmp_path: Path, inputs: Path, prefect_api: str
) -> None:
    home: Path = request.getfixturevalue("existing") if bad.home == EXISTING else tmp_path / "home"
    env = {k: v.replace("{inputs}", str(inputs)) for k, v in bad.env.items()}
    args = [a.replace("{inputs}", str(inputs)) for a in bad.args]
    before, runs_before = tree(home), flow_runs(prefect_api)
    done = _cli(home, prefect_api, env)(*args, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(lines) == 1, done.stderr
    assert bad.shown.replace("{inputs}", str(inputs)) in lines[0]
    after = tree(home)
    changed = {path for path in after if after[path] != before.get(path)}
    assert changed <= {"storage"} and set(before) <= set(after), changed
    assert flow_runs(prefect_api) == runs_before


@pytest.mark.parametrize(("overrides", "run_id", "experiment", "shown"), [
    ({"schedule": {"num_rounds": int(HUGE)}}, None, "fedprune", f"{HUGE} must be in [0, {MAX_ROUNDS}]"),
    ({}, "a/b", "fedprune", "run_id='a/b'"),
    ({}, None, "../x", "experiment='../x'"),
    ({"pruning": {"sparsity": 0.3}}, "existing", "fedprune", "pruning.sparsity: 0.5 stored, 0.3 given"),
])  # fmt: skip
def test_the_flow_checks_what_the_cli_checks_before_writing(
    existing: Path, overrides: dict[str, Any], run_id: str | None, experiment: str, shown: str
) -> None:
    # A deployment's parameters never pass the CLI: `prepare` runs the same checks, in the same words.
    from flows.experiment import prepare
    from flows.validation import check_run
    from infra.runs import RunOptions
    from infra.settings import Settings

    settings, before = Settings(home=existing), tree(existing)
    with pytest.raises(ValueError) as from_cli:
        check_run("toy", overrides, run_id, experiment, RunOptions(), settings)
    with pytest.raises(ValueError) as from_flow:
        prepare("toy", overrides, run_id, experiment, RunOptions(), settings)
    assert shown in str(from_flow.value) and str(from_flow.value) == str(from_cli.value)
    assert tree(existing) == before
