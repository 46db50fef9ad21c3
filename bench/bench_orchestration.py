"""Orchestration cost: the Prefect flow against `fedprune_core.simulate`, side by side in one run.

1. No-op workload (clients train nothing): the flow's overhead per round, from the slope between
   a short and a long run of each (fixed start-up costs cancel). Target: <= 50 ms per round.
   Both round counts are whole numbers of 100-round segments: the Prefect server records task
   runs from events behind the flow, and the next segment's flow run is created only once it has
   caught up, so the slope includes the server's work per round, not only the flow process's.
2. A real workload (default: the `small` preset): flow time / simulate time over the same rounds,
   both per round (slope) and in total. Target: <= 1.10.

    .venv/bin/python bench/bench_orchestration.py                      # both parts
    .venv/bin/python bench/bench_orchestration.py --preset tiny --rounds 4 8

Runs against the local Prefect server (started on demand as the CLI does, stopped after if it
started it); runs and tracking go to a scratch folder, the speech corpus cache is the CLI's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

from infra.settings import apply_quiet_defaults

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
apply_quiet_defaults(os.environ)  # as the CLI runs flows
_SCRATCH = tempfile.mkdtemp(prefix="fedprune-bench-")
# Runs and tracking in a scratch folder; the speech corpus cache stays shared with the CLI's (FEDPRUNE_HOME/data).
os.environ.setdefault("FEDPRUNE_STORAGE_URL", f"file://{_SCRATCH}/storage")
os.environ.setdefault("FEDPRUNE_TRACKING_URI", f"sqlite:///{_SCRATCH}/mlflow.db")



def timed_simulate(preset_name: str, overrides: dict[str, Any]) -> float:
    from fedprune_core.presets import preset
    from fedprune_core.simulate import simulate
    from infra.settings import Settings
    from infra.workloads import load_for

    config = preset(preset_name, overrides)
    data = load_for(config, Settings().home / "data")
    start = time.perf_counter()
    simulate(data.workload, data.clients, config, data.eval_examples)
    return time.perf_counter() - start


def timed_flow(preset_name: str, overrides: dict[str, Any], run_id: str) -> float:
    from flows.experiment import experiment

    start = time.perf_counter()
    experiment(preset=preset_name, overrides=overrides, run_id=run_id, rounds_per_segment=100, checkpoint_every=10)
    return time.perf_counter() - start


def compare(preset_name: str, base: dict[str, Any], short: int, long: int, tag: str) -> dict[str, float]:
    """Times of simulate and the flow at `short` and `long` rounds of the same configuration."""
    times: dict[str, float] = {}
    for rounds in (short, long):
        over = {**base, "schedule": {**base.get("schedule", {}), "num_rounds": rounds}}
        times[f"sim{rounds}"] = timed_simulate(preset_name, over)
        times[f"flow{rounds}"] = timed_flow(preset_name, over, f"bench-{tag}-{rounds}-{int(time.time())}")
        sim, flow = times[f"sim{rounds}"], times[f"flow{rounds}"]
        print(f"  {tag} {rounds:>4} rounds: simulate {sim:.2f} s, flow {flow:.2f} s",
              flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="real-workload preset (default small)")
    parser.add_argument("--rounds", nargs=2, type=int, default=[2, 4], help="short and long round counts")
    parser.add_argument("--noop-rounds", nargs=2, type=int, default=[100, 300],
                        help="short and long no-op round counts (whole 100-round segments)")
    parser.add_argument("--skip-real", action="store_true")
    args = parser.parse_args()

    from infra.prefect_api import ensure_prefect_api
    from infra.settings import Settings
    from infra.stack import read_pid, stop_service

    settings = Settings()
    started = read_pid(settings.stack_dir, "prefect") is None and not os.environ.get("PREFECT_API_URL")
    print(f"Prefect API: {ensure_prefect_api(settings)}", flush=True)
    try:
        run_benchmarks(args)
    finally:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()
        if started:
            stop_service(settings.stack_dir, "prefect")


def run_benchmarks(args: argparse.Namespace) -> None:
    """Both parts; prints a Markdown table."""
    noop = {"model": "noop", "schedule": {"sparsify_rounds": 5, "refine_rounds": 5, "refine_every": 5},
            "federated": {"eval_every": 10_000}}
    s, n = args.noop_rounds
    compare("toy", noop, 10, 11, "warm-up")  # imports, MLflow tables, Prefect client: not per-round costs
    t = compare("toy", noop, s, n, "noop")
    per_round = ((t[f"flow{n}"] - t[f"flow{s}"]) - (t[f"sim{n}"] - t[f"sim{s}"])) / (n - s)
    rows = [("no-op workload: flow overhead per round", f"{per_round * 1000:.1f} ms", "<= 50 ms",
             f"{per_round * 1000 / 50:.2f}")]
    if not args.skip_real:
        s, n = args.rounds
        short_schedule = {"schedule": {"sparsify_rounds": 1, "refine_rounds": 1, "refine_every": 1}}
        t = compare(args.preset, short_schedule, s, n, args.preset)
        slope = (t[f"flow{n}"] - t[f"flow{s}"]) / (t[f"sim{n}"] - t[f"sim{s}"])
        total = t[f"flow{n}"] / t[f"sim{n}"]
        rows.append((f"{args.preset}: flow / simulate per round (slope {s}->{n} rounds)", f"{slope:.3f}", "<= 1.10",
                     f"{slope / 1.10:.2f}"))
        rows.append((f"{args.preset}: flow / simulate in total ({n} rounds, incl. start-up)", f"{total:.3f}", "-", "-"))
    print("\n| measure | value | target | value / target |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
