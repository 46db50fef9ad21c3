"""Scale: a 30,000-round run of the tiny model through the Prefect flow (issue 6, item 5).

Runs `fedprune run --preset tiny` for `--rounds` rounds as a child process (the flow process)
against the local Prefect server (started on demand as the CLI does), samples the flow process's
resident memory every `--sample-s` seconds, and at the end prints:

- time per round in windows of 100 rounds (from the MLflow timestamps of each round's metrics)
  at round 1,000, 5,000, 10,000, ... and the last one, as a ratio to the window at round 1,000;
- the flow process's resident memory at the start and the end of the run, and its peak;
- the size of the Prefect server's SQLite database (with its write-ahead log), and how much it grew
  during the run (every sample line shows it too: with retention it levels off).

The run is resumable: if the machine stops, run the same command again; it resumes the run from
its last checkpoint (memory is then sampled for the resumed process).

    .venv/bin/python bench/bench_scale.py                         # 30,000 rounds (hours)
    .venv/bin/python bench/bench_scale.py --rounds 400 --windows 100 300   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from infra.prefect_api import ensure_prefect_api
from infra.settings import Settings, child_env
from infra.tracking import find_run


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (Linux /proc), 0 once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def db_bytes(db: Path) -> int:
    """Bytes of the SQLite database `db` and its write-ahead log (0 where absent)."""
    return sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())


def round_times(client: MlflowClient, experiment: str, run_id: str) -> dict[int, float]:
    """Wall-clock seconds (MLflow timestamp) at which each round's metrics were logged."""
    mlflow_id = find_run(client, experiment, run_id)
    assert mlflow_id is not None, f"run {run_id!r} is not in MLflow experiment {experiment!r}"
    return {m.step: m.timestamp / 1000 for m in client.get_metric_history(mlflow_id, "train_loss")}


def window_time(times: dict[int, float], start: int, size: int = 100) -> float:
    """Median seconds per round over rounds `start`..`start + size` (logged timestamps)."""
    steps = [r for r in range(start, start + size + 1) if r in times and r - 1 in times]
    return statistics.median(times[r] - times[r - 1] for r in steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30_000)
    parser.add_argument("--run-id", default="scale-30k")
    parser.add_argument("--windows", type=int, nargs="+", default=[1000, 5000, 10000, 15000, 20000, 25000, 29900])
    parser.add_argument("--sample-s", type=float, default=10.0)
    args = parser.parse_args()

    settings = Settings()
    api = ensure_prefect_api(settings)
    db = settings.home / "prefect" / "prefect.db"
    db_before = db_bytes(db)
    overrides = {"schedule": {"num_rounds": args.rounds, "sparsify_rounds": max(1, args.rounds // 30),
                              "refine_rounds": max(0, args.rounds // 6), "refine_every": 100},
                 "federated": {"eval_every": 1000}}
    command = [sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--run-id", args.run_id,
               "--experiment", "scale", "--checkpoint-every", "100", "--keep-every", "5000",
               "--config", "/dev/stdin"]
    env = child_env({"PREFECT_API_URL": api, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    log_path = settings.home / "bench" / f"{args.run_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    samples: list[tuple[float, int]] = []
    start = log_path.stat().st_size if log_path.exists() else 0  # a resumed run appends to the log
    with log_path.open("a") as log:
        child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 text=True)
        assert child.stdin is not None
        child.stdin.write(json.dumps(overrides))
        child.stdin.close()
        print(f"flow process {child.pid}; log {log_path}", flush=True)
        while child.poll() is None:
            with log_path.open("rb") as handle:
                handle.seek(start)
                new = handle.read().decode(errors="replace")
            lines = [x for x in new.splitlines()[-20:] if " - round " in x]
            if lines:  # rounds are running: sample the flow process
                samples.append((time.time(), rss_bytes(child.pid)))
                print(f"  rss {samples[-1][1] / 2**20:.0f} MiB, Prefect db {db_bytes(db) / 2**20:.1f} MiB | "
                      f"{lines[-1].split(' - ', 1)[-1][:90]}", flush=True)
            time.sleep(args.sample_s)
    if child.returncode != 0:
        sys.exit(f"the run failed (exit {child.returncode}); see {log_path}")

    times = round_times(MlflowClient(settings.tracking_uri), "scale", args.run_id)
    windows = [w for w in args.windows if w + 100 <= max(times)]
    base = window_time(times, windows[0])
    print("\n| rounds | s / round (median) | / first window |\n|---|---|---|")
    for w in windows:
        t = window_time(times, w)
        print(f"| {w}-{w + 100} | {t:.3f} | {t / base:.2f} |")
    rss = [r for _, r in samples if r]
    print(f"\nflow process RSS: first sample {rss[0] / 2**20:.0f} MiB, last {rss[-1] / 2**20:.0f} MiB, "
          f"peak {max(rss) / 2**20:.0f} MiB ({len(rss)} samples)")
    size = db_bytes(db)
    print(f"Prefect database {db} (+ its WAL): {size / 2**20:.1f} MiB ({(size - db_before) / 2**20:+.1f} MiB during "
          f"this process's rounds)" if db.exists() else
          f"Prefect database: not at {db} (an external server?)")


if __name__ == "__main__":
    main()
