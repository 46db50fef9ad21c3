"""Orchestration cost: the Prefect flow against `fedprune_core.simulate`, side by side in one run.

1. No-op workload (clients train nothing): the flow's overhead per round, from the slope between
   a short and a long run of each (fixed start-up costs cancel). Target: <= 50 ms per round.
   Measured twice: mostly fine-tune rounds (masks kept, so no score and mask tasks), and rounds
   that all score and mask (sparsifying throughout). Both round counts are whole numbers of
   100-round segments, so the slope includes each segment's start (its child flow run, created
   once the server has taken the previous segment's records) and the server's recording.
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
from collections.abc import Callable
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


def compare(
    preset_name: str, overrides: Callable[[int], dict[str, Any]], short: int, long: int, tag: str
) -> dict[str, float]:
    """Times of simulate and the flow at `short` and `long` rounds; `overrides(rounds)` configures each."""
    times: dict[str, float] = {}
    for rounds in (short, long):
        over = overrides(rounds)
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

    from infra.prefect_api import prefect_api_for_script
    from infra.settings import Settings

    with prefect_api_for_script(Settings()) as url:
        print(f"Prefect API: {url}", flush=True)
        run_benchmarks(args)


def run_benchmarks(args: argparse.Namespace) -> None:
    """Both parts; prints a Markdown table."""
    def noop(rounds: int, remask_every_round: bool) -> dict[str, Any]:
        # A few sparsify and refine rounds, then fine-tuning (masks kept: no score and mask tasks);
        # or sparsifying throughout (score and mask tasks every round).
        schedule = {"sparsify_rounds": rounds, "refine_rounds": 0} if remask_every_round else {
            "sparsify_rounds": 5, "refine_rounds": 5, "refine_every": 5}
        return {"model": "noop", "schedule": {**schedule, "num_rounds": rounds}, "federated": {"eval_every": 10_000}}

    s, n = args.noop_rounds
    compare("toy", lambda r: noop(r, False), 10, 11, "warm-up")  # imports, MLflow tables, Prefect client
    rows = []
    for remask, label in ((False, "fine-tune rounds (masks kept)"), (True, "rounds that score and mask")):
        t = compare("toy", lambda r, remask=remask: noop(r, remask), s, n, "noop-remask" if remask else "noop")
        per_round = ((t[f"flow{n}"] - t[f"flow{s}"]) - (t[f"sim{n}"] - t[f"sim{s}"])) / (n - s)
        rows.append((f"no-op workload, {label}: flow overhead per round", f"{per_round * 1000:.1f} ms",
                     "<= 50 ms", f"{per_round * 1000 / 50:.2f}"))
    if not args.skip_real:
        s, n = args.rounds

        def short_schedule(rounds: int) -> dict[str, Any]:
            return {"schedule": {"num_rounds": rounds, "sparsify_rounds": 1, "refine_rounds": 1, "refine_every": 1}}

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
