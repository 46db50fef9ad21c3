"""What the fault handling costs a round: this tree's flow against an earlier commit's, side by side.

The toy workload, 8 clients a round, 1 local step, a checkpoint every 10 rounds, MLflow on (the
configuration of the orchestration target). Each side runs the CLI in a child process for a short
and a long run; the per-round cost is the slope between them (start-up cancels), repeated
`--reps` times with the sides interleaved, against one shared local Prefect server.

    .venv/bin/python bench/bench_fault_cost.py                       # against 3e1bead (before issue 27)
    .venv/bin/python bench/bench_fault_cost.py --before HEAD~5 --rounds 20 120 --reps 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETS = ("federated.clients_per_round=8", "federated.local.steps=1", "federated.eval_every=1000000",
        "schedule.sparsify_rounds=4", "schedule.refine_rounds=4")


def timed_run(tree: Path, home: Path, rounds: int, run_id: str) -> float:
    """Seconds of one `fedprune run` of the toy workload in `tree`, in a child process."""
    sets = [a for s in (*SETS, f"schedule.num_rounds={rounds}") for a in ("--set", s)]
    env = {**os.environ, "FEDPRUNE_HOME": str(home), "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "toy", *sets, "--run-id", run_id,
                    "--checkpoint-every", "10"], cwd=tree, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="3e1bead", help="git ref of the code to compare with")
    parser.add_argument("--rounds", type=int, nargs=2, default=(20, 220), help="short and long run")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    scratch = Path(tempfile.mkdtemp(prefix="fedprune-faultcost-"))
    before = scratch / "before"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before), args.before], cwd=ROOT, check=True)
    sys.path.insert(0, str(ROOT))
    from infra.prefect_api import ensure_prefect_api
    from infra.settings import Settings

    os.environ["PREFECT_API_URL"] = ensure_prefect_api(Settings())
    slopes: dict[str, list[float]] = {"before": [], "now": []}
    try:
        for rep in range(args.reps):
            for name, tree in (("before", before), ("now", ROOT)):
                home = scratch / f"{name}-{rep}"
                short, long = (timed_run(tree, home, n, f"r{n}") for n in args.rounds)
                slopes[name].append(1000 * (long - short) / (args.rounds[1] - args.rounds[0]))
                print(f"rep {rep + 1}/{args.reps} {name}: {slopes[name][-1]:.1f} ms a round", file=sys.stderr)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    b, n = statistics.median(slopes["before"]), statistics.median(slopes["now"])
    print(f"| code | ms a round (median of {args.reps}) | each rep |")
    print("|---|---|---|")
    for name, value in (("before", b), ("now", n)):
        print(f"| {name} | {value:.1f} | {', '.join(f'{s:.1f}' for s in slopes[name])} |")
    print(f"now / before: {n / b:.3f}")


if __name__ == "__main__":
    main()
