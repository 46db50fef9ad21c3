"""Bad input: one clear line naming the value, the rule and the fix; exit code 2; nothing stored."""

from __future__ import annotations

import time

import pytest

from tests.flows.conftest import Cli

CASES = [
    (("run", "--preset", "nope"), "preset='nope'"),
    (("run", "--preset", "toy", "--set", "strategy=magic"), "strategy='magic'"),
    (("run", "--preset", "toy", "--set", "pruning.pattern=diagonal"), "pattern='diagonal'"),
    (("run", "--preset", "toy", "--set", "pruning.sparsty=0.5"), "unknown config key 'pruning.sparsty'"),
    (("run", "--preset", "toy", "--set", "schedule.num_rounds=0"), "num_rounds=0"),
    (("run", "--preset", "toy", "--set", "federated.clients_per_round=99"), "clients_per_round=99"),
    (("run", "--preset", "toy", "--set", "pruning.sparsity=1.0"), "sparsity=1.0"),
    (("run", "--preset", "toy", "--run-id", "../etc"), "run_id='../etc'"),
    (("run", "--preset", "toy", "--checkpoint-every", "0"), "checkpoint_every=0"),
    (("resume", "no-such-run"), "run_id='no-such-run' does not exist"),
    (("resume", "a/b"), "run_id='a/b'"),
    (("run", "--preset", "toy", "--set", "init_from=no-such-run"), "init_from='no-such-run': no committed checkpoint"),
    (("run", "--preset", "toy", "--set", "init_from=a/b/c"), "init_from='a/b/c' must be"),
    (("sweep", "--only", "fp-s99"), "only='fp-s99' is not a variant"),
    (("sweep", "--parallel", "0"), "--parallel 0"),
    (("sweep", "--rounds", "2"), "rounds=2"),
]


@pytest.mark.parametrize(("args", "message"), CASES)
def test_bad_input_exits_2_fast_and_touches_nothing(cli: Cli, args: tuple[str, ...], message: str) -> None:
    start = time.monotonic()
    done = cli(*args, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - start < 30
    assert not (cli.home / "storage" / "fedprune").exists()


def test_unreachable_s3_and_mlflow_fail_fast(cli: Cli) -> None:
    s3 = Cli(cli.home, {**cli.env, "FEDPRUNE_STORAGE_URL": "s3://bucket", "FEDPRUNE_S3_ENDPOINT_URL":
                        "http://127.0.0.1:9"})
    done = s3("run", "--preset", "toy", timeout=60)
    assert done.returncode == 2 and "127.0.0.1:9" in done.stderr
    tracking = Cli(cli.home, {**cli.env, "FEDPRUNE_TRACKING_URI": "http://127.0.0.1:9"})
    done = tracking("run", "--preset", "toy", timeout=60)
    assert done.returncode == 2 and "127.0.0.1:9" in done.stderr
