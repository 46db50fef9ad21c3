"""Orchestration at scale: what the Prefect flow costs a round at 8, 32 and 128 clients a round, and
how fast the Prefect server's database grows, side by side with `fedprune_core.simulate`.

Workload: the toy MLP (`--set corpus=toy-N` gives it N clients), every client sampled each round,
one local step, checkpoints every 10 rounds, metrics to MLflow (a scratch SQLite store), storage a
scratch directory, thread task runner (4 client-train tasks a round at most, fewer for brief
training: `flows.experiment.local_cohorts`).

1. **Per round.** For each client count, the flow and `simulate` run `--rounds` short and long;
   per-round time is the slope between the two (start-up cancels). The flow's orchestration cost
   is its slope minus simulate's; the cost of each extra client is the growth of that cost from
   8 clients, per client. Targets: flow <= 45 ms a round at 8 clients; <= 3 ms per extra client.
2. **Database.** A fresh Prefect server (SQLite, as the CLI starts it) records two runs of
   `--db-rounds` rounds at 8 clients; the database's bytes (file + WAL) after a warm-up run and
   after each run give bytes per round over the first run and over both. Run twice: FedPrune's default retention
   (`FEDPRUNE_PREFECT_KEEP_ROUNDS=100`) and keeping every task run (`0`). Target: <= 10 KiB a round.

    .venv/bin/python bench/bench_clients.py                           # about 10 minutes on 2 cores
    .venv/bin/python bench/bench_clients.py --clients 8 --rounds 50 150 --db-rounds 1000
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from infra.settings import apply_quiet_defaults

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
apply_quiet_defaults(os.environ)  # as the CLI runs flows
SCRATCH = Path(tempfile.mkdtemp(prefix="fedprune-bench-clients-"))
os.environ["FEDPRUNE_HOME"] = str(SCRATCH / "home")
os.environ["FEDPRUNE_STORAGE_URL"] = f"file://{SCRATCH}/storage"
os.environ["FEDPRUNE_TRACKING_URI"] = f"sqlite:///{SCRATCH}/mlflow.db"

PER_ROUND_TARGET_MS = 45.0
PER_CLIENT_TARGET_MS = 3.0
DB_TARGET_KIB = 10.0


def overrides(clients: int, rounds: int) -> dict[str, Any]:
    """The measured configuration: `clients` toy clients, all sampled, one local step."""
    return {
        "corpus": f"toy-{clients}",
        "schedule": {"num_rounds": rounds, "sparsify_rounds": 5, "refine_rounds": 5, "refine_every": 5},
        "federated": {"clients_per_round": clients, "eval_every": 10_000, "local": {"steps": 1}},
    }


def timed_simulate(over: dict[str, Any]) -> float:
    from fedprune_core.presets import preset
    from fedprune_core.simulate import simulate
    from infra.workloads import load_for

    config = preset("toy", over)
    data = load_for(config, SCRATCH / "data")
    start = time.perf_counter()
    simulate(data.workload, data.clients, config, data.eval_examples)
    return time.perf_counter() - start


def timed_flow(over: dict[str, Any], run_id: str, max_workers: int = 4) -> float:
    """Seconds of one flow run; `max_workers` as the CLI's (client-train tasks a round, at most the cores)."""
    from flows.experiment import experiment

    start = time.perf_counter()
    experiment(preset="toy", overrides=over, run_id=run_id, rounds_per_segment=100, checkpoint_every=10,
               max_workers=max_workers)
    return time.perf_counter() - start


def db_bytes(prefect_home: Path) -> int:
    """The server's SQLite database: its pages in use plus its WAL file, in bytes."""
    path = prefect_home / "prefect.db"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
    wal = path.with_name("prefect.db-wal")
    return pages * size + (wal.stat().st_size if wal.exists() else 0)


def per_round(clients: int, short: int, long: int, max_workers: int) -> tuple[float, float]:
    """(flow, simulate) seconds per round at `clients`, slopes between `short` and `long` rounds."""
    times = {}
    for rounds in (short, long):
        over = overrides(clients, rounds)
        times["sim", rounds] = timed_simulate(over)
        times["flow", rounds] = timed_flow(over, f"c{clients}-r{rounds}-{int(time.time())}", max_workers)
        print(f"  {clients:>4} clients {rounds:>5} rounds: simulate {times['sim', rounds]:.2f} s, "
              f"flow {times['flow', rounds]:.2f} s", flush=True)
    span = long - short
    return (times["flow", long] - times["flow", short]) / span, (times["sim", long] - times["sim", short]) / span


def database_growth(prefect_home: Path, rounds: int, keep: str, settle_s: float) -> tuple[float, float]:
    """Bytes per round the server's database grew over the first `rounds` rounds at 8 clients, and
    over twice as many (a second run of `rounds` after the first: the file reaches its plateau)."""
    os.environ["FEDPRUNE_PREFECT_KEEP_ROUNDS"] = keep
    timed_flow(overrides(8, 20), f"db-warm-{keep}-{int(time.time())}")  # tables and indexes exist
    time.sleep(settle_s)  # the server records task runs up to its flush interval later
    sizes = [db_bytes(prefect_home)]
    for part in (1, 2):
        timed_flow(overrides(8, rounds), f"db-{keep}-{part}-{int(time.time())}")
        time.sleep(settle_s)
        sizes.append(db_bytes(prefect_home))
        print(f"  keep {keep} rounds: database {sizes[0] / 2**20:.1f} -> {sizes[-1] / 2**20:.1f} MiB over "
              f"{part * rounds} rounds", flush=True)
    return (sizes[1] - sizes[0]) / rounds, (sizes[2] - sizes[0]) / (2 * rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", nargs="+", type=int, default=[8, 32, 128], help="clients a round (8 first)")
    parser.add_argument("--rounds", nargs=2, type=int, default=[100, 300], help="short and long round counts")
    parser.add_argument("--db-rounds", type=int, default=1000, help="rounds of each database run (>= 1000)")
    parser.add_argument("--settle-s", type=float, default=15.0, help="wait for the server's recorder")
    parser.add_argument("--max-workers", type=int, default=4, help="the runs' --max-workers (default: the CLI's)")
    parser.add_argument("--no-db", action="store_true", help="per-round times only")
    args = parser.parse_args()

    from infra.stack import prefect_spec
    from infra.stack.process import free_loopback_port, start_service, stop_service, wait_healthy

    run_dir = SCRATCH / "server"
    spec = prefect_spec(run_dir / "prefect", free_loopback_port())
    wait_healthy(spec, start_service(spec, run_dir), run_dir, 120)
    os.environ["PREFECT_API_URL"] = f"{spec.url}/api"
    print(f"scratch {SCRATCH}; Prefect server {spec.url}", flush=True)
    try:
        timed_flow(overrides(8, 10), "warm-up")  # imports, MLflow tables, the Prefect client
        timed_simulate(overrides(8, 10))
        rows = {c: per_round(c, args.rounds[0], args.rounds[1], args.max_workers) for c in args.clients}
        growth = {} if args.no_db else {
            keep: database_growth(run_dir / "prefect", args.db_rounds, keep, args.settle_s) for keep in ("100", "0")}
    finally:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()
        stop_service(run_dir, "prefect")
    base = args.clients[0]
    orchestration = {c: rows[c][0] - rows[c][1] for c in rows}
    # Prefect reads its settings on import: after PREFECT_API_URL is set
    from flows.experiment import COHORT_MIN_S, local_slots

    print(f"\n--max-workers {args.max_workers}: {local_slots(args.max_workers)} client-train tasks a round at most, "
          f"one per {COHORT_MIN_S * 1000:g} ms of training (`local_cohorts`)")
    print("\n| clients a round | flow ms/round | simulate ms/round | orchestration ms/round | "
          "per extra client (ms) | target |\n|---|---|---|---|---|---|")
    for c, (flow, sim) in rows.items():
        extra = "-" if c == base else f"{(orchestration[c] - orchestration[base]) * 1000 / (c - base):.2f}"
        target = f"flow <= {PER_ROUND_TARGET_MS:g} ms" if c == base else f"<= {PER_CLIENT_TARGET_MS:g} ms"
        print(f"| {c} | {flow * 1000:.1f} | {sim * 1000:.1f} | {orchestration[c] * 1000:.1f} | {extra} | {target} |")
    if not growth:
        return
    print(f"\n| Prefect database, 8 clients a round | KiB a round over {args.db_rounds} rounds | over "
          f"{2 * args.db_rounds} | target |\n|---|---|---|---|")
    for keep, (first, both) in growth.items():
        label = "every task run kept" if keep == "0" else f"task runs of the last {keep} rounds kept (default)"
        print(f"| {label} | {first / 1024:.2f} | {both / 1024:.2f} | <= {DB_TARGET_KIB:g} |")


if __name__ == "__main__":
    main()
