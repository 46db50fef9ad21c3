"""The sweep report: rows, ratios to dense, seeds' spread, CSV and plots, from given histories."""

from __future__ import annotations

import csv
import io
import math

import pytest

from infra.results import RunResult, plot_wer_over_rounds, plot_wer_vs_sparsity, render_csv, render_table, summarize


def run(run_id: str, label: str, wer: float, sparsity: float, down: float, seed: int = 0,
        groups: tuple[str, ...] = ("sparsity",)) -> RunResult:
    history = {"eval_wer": [(7, 0.9), (14, wer + 0.02), (21, wer - 0.02)], "eval_cer": [(14, wer / 2)],
               "sparsity": [(1, 0.0), (14, sparsity)],
               "bytes_down": [(1, down), (14, down)], "client_time_s_mean": [(1, 2.0)],
               "client_peak_memory_bytes": [(1, 100.0)]}
    return RunResult(run_id, label, groups, seed, history)


def test_rows_average_seeds_and_divide_by_dense() -> None:
    results = [run("d0", "dense", 0.20, 0.0, 1000.0), run("d1", "dense", 0.30, 0.0, 1000.0, seed=1),
               run("f0", "fp", 0.30, 0.5, 500.0)]
    rows = summarize(results, "dense")
    assert [r.label for r in rows] == ["dense", "fp"]
    # WER = mean of the last two evaluations (wer + 0.02 and wer - 0.02), then mean over seeds.
    assert rows[0].wer == pytest.approx(0.25) and rows[0].wer_sd == pytest.approx(math.sqrt(0.005))
    assert rows[0].final_wers == pytest.approx((0.18, 0.28))
    assert rows[1].client_size == pytest.approx(0.5) and rows[1].sparsity == 0.5
    table = render_table(rows, "dense")
    assert "| dense | 2 | 25.0 ± 7.1 | 1.000 | 18.0 / 28.0 |" in table
    assert "| fp | 1 | 30.0 | 1.200 | 28.0 | 15.0 | 0.500 | 0.500 | 1.000 | 1.000 |" in table


def test_summarize_needs_the_dense_baseline() -> None:
    with pytest.raises(ValueError, match="no run labelled 'dense'"):
        summarize([run("f0", "fp", 0.3, 0.5, 500.0)], "dense")


def test_csv_and_plots() -> None:
    results = [run("d0", "dense", 0.2, 0.0, 1000.0), run("f0", "fp", 0.3, 0.5, 500.0, groups=("sparsity", "seed"))]
    rows = list(csv.DictReader(io.StringIO(render_csv(results))))
    assert [(r["run_id"], r["wer_last2"], r["wer_final"], r["sparsity"]) for r in rows] == [
        ("d0", "0.2000", "0.1800", "0.0000"), ("f0", "0.3000", "0.2800", "0.5000")]
    for png in (plot_wer_vs_sparsity(results), plot_wer_over_rounds(results)):
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
