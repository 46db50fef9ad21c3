"""Outages ridden through: a toy run with storage, MLflow or the Prefect API down mid-run, against the
same run uninterrupted, side by side in one invocation.

Dedicated loopback servers (SeaweedFS S3, an MLflow server, a Prefect server, as the tests start
them); every run stores in S3 and tracks in MLflow. Once a run has committed round `--at`, one
service is stopped (storage and MLflow: SIGTERM; Prefect: SIGKILL, a crash), kept down `--down`
seconds, and started again on the same port and data. Printed per run: how long the service did
not answer (stop until healthy again), how long the run waited (the ``answers again after`` lines
of its log), its total time and its cost over the uninterrupted run, and whether it ended with the
same final weights and each MLflow step once.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_outages.py                # 40 rounds, down 12 s at round 10
    PYTHONPATH=$PWD .venv/bin/python bench/bench_outages.py --rounds 60 --down 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.flows.conftest import Cli, cli_for
from tests.flows.helpers import final_state, weights_hash
from tests.servers import (
    MlflowServer,
    Outage,
    Restartable,
    S3Server,
    restartable_mlflow,
    restartable_prefect,
    restartable_seaweed,
)

_BACK = re.compile(r"answers again after (\d+) s")
RUNS: tuple[tuple[str, str | None, dict[str, str]], ...] = (
    ("none", None, {}),
    ("storage", "storage", {}),
    ("MLflow", "MLflow", {}),
    ("Prefect API", "Prefect API", {}),
    # Prefect's client gives up after one retry (~2 s): the flow run fails and the CLI runs it again
    ("Prefect API, 1 client retry", "Prefect API", {"PREFECT_CLIENT_MAX_RETRIES": "1"}),
)
"""(label, service stopped or None, extra environment of the run)."""


@dataclass(frozen=True)
class Stack:
    """The dedicated servers, each restartable."""

    s3: S3Server
    mlflow: MlflowServer
    prefect_api: str
    services: dict[str, Restartable]


@dataclass(frozen=True)
class Result:
    """One run: what was down, for how long, and how the run fared."""

    outage: str
    down_s: float | None
    waited_s: float | None
    total_s: float
    how: str
    exit_code: int
    weights: str
    steps_once: bool


@contextmanager
def stack(base: Path) -> Iterator[Stack]:
    with ExitStack() as servers:
        s3, seaweed = servers.enter_context(restartable_seaweed(base / "seaweed", bucket="bench-outages"))
        mlflow, tracking = servers.enter_context(restartable_mlflow(base / "mlflow"))
        api, prefect = servers.enter_context(restartable_prefect(base / "prefect"))
        yield Stack(s3, mlflow, api, {"storage": seaweed, "MLflow": tracking, "Prefect API": prefect})


def latest_round(s3: S3Server, run_id: str) -> Callable[[], int]:
    def latest() -> int:
        try:
            body = s3.client.get_object(Bucket=s3.bucket, Key=f"fedprune/{run_id}/LATEST")["Body"].read()
        except Exception:
            return -1
        return int(json.loads(body)["round"])

    return latest


def steps_once(tracking_uri: str, run_id: str, rounds: int) -> bool:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("fedprune")
    runs = client.search_runs([experiment.experiment_id], f"tags.`fedprune.run_id` = '{run_id}'") if experiment else []
    if len(runs) != 1:
        return False
    history = {k: [m.step for m in client.get_metric_history(runs[0].info.run_id, k)] for k in runs[0].data.metrics}
    return sorted(history["round"]) == list(range(1, rounds + 1)) and all(
        len(steps) == len(set(steps)) for steps in history.values())


def one_run(cli: Cli, servers: Stack, args: tuple[str, ...], run_id: str, outage: str | None,
            at: int, down_s: float) -> Result:
    injected = None
    if outage is not None:
        sig = signal.SIGKILL if outage == "Prefect API" else signal.SIGTERM
        injected = Outage(servers.services[outage], lambda: latest_round(servers.s3, run_id)() >= at, down_s, sig)
        injected.start()
    start = time.monotonic()
    done = cli("run", *args, "--run-id", run_id, timeout=900)
    total = time.monotonic() - start
    if injected is not None:
        injected.join()
    cli.home.mkdir(parents=True, exist_ok=True)
    (cli.home / f"{run_id}.log").write_text(done.stderr)
    waits = [int(m) for m in _BACK.findall(done.stderr)]
    weights = weights_hash(final_state(servers.s3.storage(), run_id).weights) if done.returncode == 0 else ""
    return Result(outage or "none", injected.seconds_down if injected else None, float(sum(waits)) if waits else None,
                  total, _how(done.stderr, outage, waits), done.returncode, weights,
                  steps_once(servers.mlflow.tracking_uri, run_id, args_rounds(args)))


def _how(stderr: str, outage: str | None, waits: list[int]) -> str:
    if outage is None:
        return "-"
    if "went away" in stderr:
        return "flow run again, resumed"
    return "waited in place" if waits else "Prefect client's retries"


def args_rounds(args: tuple[str, ...]) -> int:
    return int(next(a.split("=")[1] for a in args if a.startswith("schedule.num_rounds=")))


def table(results: list[Result]) -> str:
    base = results[0]
    rows = ["| outage | service down (s) | run waited (s) | how | total (s) | vs uninterrupted (s) | exit | "
            "same weights | each step once |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        down = "-" if r.down_s is None else f"{r.down_s:.1f}"
        waited = "-" if r.waited_s is None else f"{r.waited_s:.0f}"
        extra = "-" if r is base else f"{r.total_s - base.total_s:+.1f}"
        rows.append(f"| {r.outage} | {down} | {waited} | {r.how} | {r.total_s:.1f} | {extra} | {r.exit_code} | "
                    f"{'yes' if r.weights == base.weights else 'NO'} | {'yes' if r.steps_once else 'NO'} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--at", type=int, default=10, help="Stop the service once this round is committed.")
    parser.add_argument("--down", type=float, default=12.0, help="Seconds the service stays down.")
    opts = parser.parse_args()
    args = ("--preset", "toy", "--set", f"schedule.num_rounds={opts.rounds}", "--rounds-per-segment", "10",
            "--checkpoint-every", "5")
    base = Path(tempfile.mkdtemp(prefix="fedprune-bench-outages-"))
    with stack(base) as servers:
        cli = cli_for(base / "home", servers.prefect_api, **servers.s3.env(),
                      FEDPRUNE_TRACKING_URI=servers.mlflow.tracking_uri)
        results = []
        for label, outage, env in RUNS:
            run_id = "outage-" + re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
            result = one_run(Cli(cli.home, {**cli.env, **env}), servers, args, run_id, outage, opts.at, opts.down)
            results.append(dataclasses.replace(result, outage=label))
            print(f"{label}: exit {result.exit_code} in {result.total_s:.1f} s", flush=True)
    print(f"\ntoy preset, {opts.rounds} rounds, service down {opts.down:g} s from round {opts.at} "
          f"(Prefect: SIGKILL, the others SIGTERM)\n")
    print(table(results))
    print(f"\nthe runs' logs: {base / 'home'}/outage-*.log")


if __name__ == "__main__":
    main()
