"""A sweep's results, read back from MLflow: the table, WER against sparsity, WER over rounds.

`collect` reads each run's metric histories (one `get_metric_history` per metric); `summarize`
turns them into one row per run; the `render_*` functions format rows as Markdown, CSV and PNG.
Nothing here trains or evaluates: it only reads what the runs logged.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from infra.tracking import find_run  # noqa: E402

LAST_EVALS = 2  # the table's WER: mean of the last two evaluations
METRICS = ("eval_wer", "eval_cer", "sparsity", "bytes_down", "client_time_s_mean", "client_peak_memory_bytes")


@dataclass(frozen=True)
class RunResult:
    """One run as logged: its metric histories as (round, value) pairs."""

    run_id: str
    label: str
    groups: tuple[str, ...]
    seed: int
    history: dict[str, list[tuple[int, float]]]

    def final(self, key: str) -> float:
        points = self.history.get(key) or []
        return points[-1][1] if points else math.nan

    def mean(self, key: str, last: int | None = None) -> float:
        """Mean of the logged values, or of the `last` ones (the final evaluations are less sensitive
        to the last round's client sample than the final one alone)."""
        points = (self.history.get(key) or [])[-last if last else 0:]
        return statistics.fmean(v for _, v in points) if points else math.nan


def collect(client: MlflowClient, experiment: str, runs: Sequence[tuple[str, str, tuple[str, ...], int]],
            metrics: Sequence[str] = METRICS) -> list[RunResult]:
    """The histories of `metrics` of `runs` ((fedprune run id, label, groups, seed)) in MLflow
    experiment `experiment` (a metric a run did not log has an empty history).

    Raises:
        ValueError: naming a run that is not in the experiment.
    """
    results = []
    for run_id, label, groups, seed in runs:
        mlflow_id = find_run(client, experiment, run_id)
        if mlflow_id is None:
            raise ValueError(f"run {run_id!r} is not in MLflow experiment {experiment!r}: run (or resume) it first")
        history = {}
        for key in metrics:
            points = sorted(client.get_metric_history(mlflow_id, key), key=lambda m: m.step)
            history[key] = [(m.step, m.value) for m in points]
        results.append(RunResult(run_id, label, groups, seed, history))
    return results


@dataclass(frozen=True)
class Row:
    """One configuration of the table: the mean (and spread) over its seeds."""

    label: str
    wers: tuple[float, ...]
    final_wers: tuple[float, ...]
    cer: float
    sparsity: float
    client_size: float
    client_time: float
    client_memory: float

    @property
    def wer(self) -> float:
        return statistics.fmean(self.wers)

    @property
    def wer_sd(self) -> float:
        return statistics.stdev(self.wers) if len(self.wers) > 1 else math.nan


def summarize(results: Sequence[RunResult], dense_label: str) -> list[Row]:
    """Rows in first-seen label order; client size, time and memory relative to `dense_label`."""
    by_label: dict[str, list[RunResult]] = {}
    for r in results:
        by_label.setdefault(r.label, []).append(r)
    if dense_label not in by_label:
        raise ValueError(f"no run labelled {dense_label!r}: the table needs the dense baseline")
    dense = by_label[dense_label]

    def ratio(key: str, runs: list[RunResult]) -> float:
        return statistics.fmean(r.mean(key) for r in runs) / statistics.fmean(d.mean(key) for d in dense)

    return [
        Row(label, tuple(r.mean("eval_wer", LAST_EVALS) for r in runs), tuple(r.final("eval_wer") for r in runs),
            statistics.fmean(r.mean("eval_cer", LAST_EVALS) for r in runs),
            statistics.fmean(r.final("sparsity") for r in runs), ratio("bytes_down", runs),
            ratio("client_time_s_mean", runs), ratio("client_peak_memory_bytes", runs))
        for label, runs in by_label.items()
    ]


def render_table(rows: Sequence[Row], dense_label: str) -> str:
    """Markdown: WER (mean of the last two evaluations; mean ± sd over seeds), its ratio to dense,
    the final evaluation's WER, CER, sparsity, client cost ratios."""
    dense = next(r for r in rows if r.label == dense_label)
    lines = ["| run | seeds | WER % | WER / dense | final-eval WER % | CER % | final sparsity "
             "| client download / dense | client time / dense | client memory / dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = f" ± {100 * r.wer_sd:.1f}" if len(r.wers) > 1 else ""
        final = " / ".join(f"{100 * w:.1f}" for w in r.final_wers)
        lines.append(f"| {r.label} | {len(r.wers)} | {100 * r.wer:.1f}{spread} | {r.wer / dense.wer:.3f} | {final} "
                     f"| {100 * r.cer:.1f} | {r.sparsity:.3f} | {r.client_size:.3f} | {r.client_time:.3f} "
                     f"| {r.client_memory:.3f} |")
    return "\n".join(lines) + "\n"


def render_csv(results: Sequence[RunResult]) -> str:
    """One line per run: WER (last two evaluations' mean, and final), CER, final sparsity, mean client cost."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run_id", "label", "seed", "wer_last2", "wer_final", "cer_last2", "sparsity", "bytes_down_mean",
                     "client_time_s_mean", "client_peak_memory_bytes_mean"])
    for r in results:
        writer.writerow([r.run_id, r.label, r.seed, f"{r.mean('eval_wer', LAST_EVALS):.4f}",
                         f"{r.final('eval_wer'):.4f}", f"{r.mean('eval_cer', LAST_EVALS):.4f}",
                         f"{r.final('sparsity'):.4f}", f"{r.mean('bytes_down'):.0f}",
                         f"{r.mean('client_time_s_mean'):.3f}", f"{r.mean('client_peak_memory_bytes'):.0f}"])
    return buf.getvalue()


def figure_png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def plot_wer_vs_sparsity(results: Sequence[RunResult], group: str = "sparsity") -> bytes:
    """Held-out-speaker WER against final sparsity for the runs of `group` (each seed a point)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    runs = sorted((r for r in results if group in r.groups), key=lambda r: r.final("sparsity"))
    xs, ys = [r.final("sparsity") for r in runs], [100 * r.mean("eval_wer", LAST_EVALS) for r in runs]
    ax.plot(xs, ys, marker="o")
    for r in results:
        if "seed" in r.groups and group not in r.groups:
            ax.plot(r.final("sparsity"), 100 * r.mean("eval_wer", LAST_EVALS), marker="x", color="grey",
                    linestyle="none")
    ax.set_xlabel("sparsity (share of prunable weights removed)")
    ax.set_ylabel("WER % (held-out speakers, mean of the last 2 evaluations)")
    ax.set_title("FP (column, adaptive, weight L2, refined): WER against sparsity\n(x: other seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    return figure_png(fig)


def plot_wer_over_rounds(results: Sequence[RunResult], seed: int = 0) -> bytes:
    """WER over rounds, one line per configuration (seed `seed` only)."""
    fig, ax = plt.subplots(figsize=(11, 5.5))
    styles = ("-", "--", ":", "-.")
    shown = [r for r in results if r.seed == seed and r.history.get("eval_wer")]
    for i, r in enumerate(shown):
        points = r.history["eval_wer"]
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker=".", label=r.label,
                linestyle=styles[(i // 10) % len(styles)])
    ax.set_ylim(top=min(ax.get_ylim()[1], 105.0))  # above 100%: off the chart (see the table)
    ax.set_title(f"seed {seed}; WER above 100% is off the chart", fontsize=9)
    ax.set_xlabel("round (after the warm-up)")
    ax.set_ylabel("WER % (held-out speakers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot: lines stay visible
    return figure_png(fig)
