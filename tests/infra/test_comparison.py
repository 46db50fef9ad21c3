"""The budgets comparison: cost ratios to the same seed's dense run, last-k WER, paired intervals,
findings, plots, and the report task over runs logged to a real MLflow SQLite store."""

from __future__ import annotations

import csv
import io
import math
import statistics
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from infra.comparison import (
    COLUMNS,
    COSTS,
    ComparedRun,
    Group,
    RunRow,
    bootstrap_interval,
    comparisons,
    finding_a,
    finding_b,
    finding_c,
    finding_d,
    finding_e,
    findings,
    groups_of,
    measure,
    paired,
    reached,
    render_time_to_accuracy,
    t_interval,
)
from infra.results import RunResult
from infra.tracking import RUN_ID_TAG, Tracker, find_run
from tasks.sweep import comparison_report

T_975_2 = 4.302652729911275  # Student-t 97.5% quantile, 2 degrees of freedom (tables: 4.303)
PNG = b"\x89PNG\r\n\x1a\n"
ROUNDS = range(1, 7)
EVALS = {2: 0.9, 3: 0.5, 4: 0.30, 5: 0.20, 6: 0.10}  # dense seed 0; the last three average 0.2


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-comparison') / 'mlflow.db'}"


def _history(wer_shift: float, down: float, up: float, params: float, memory: float, rounds: range = ROUNDS,
             done: dict[int, float] | None = None) -> dict[str, list[tuple[int, float]]]:
    """Per-client bytes `down` / `up` (logged summed over the round's clients, 2 unless `done` says)."""
    clients = {r: (done or {}).get(r, 2.0) for r in rounds}
    return {"eval_wer": [(r, w + wer_shift) for r, w in EVALS.items() if r in rounds],
            "eval_cer": [(r, (w + wer_shift) / 2) for r, w in EVALS.items() if r in rounds],
            "clients_done": [(r, clients[r]) for r in rounds],
            "bytes_down": [(r, down * clients[r]) for r in rounds], "bytes_up": [(r, up * clients[r]) for r in rounds],
            "client_params": [(r, params) for r in rounds], "client_peak_memory_bytes": [(r, memory) for r in rounds]}


# dense: one client left out of round 6 (its summed bytes halve, per client they do not)
DENSE = {s: _history(0.01 * s, 1000.0, 800.0, 100.0, 50.0, done={6: 1.0}) for s in range(3)}
FP = {s: _history(0.01 * s + 0.01 * (s + 1), 500.0, 400.0, 50.0, 40.0) for s in range(3)}  # +1, +2, +3 points
ROW = {0: _history(0.05, 600.0, 400.0, 60.0, 45.0, rounds=range(1, 6))}  # seed 0 only, 5 rounds


def _runs() -> list[tuple[ComparedRun, dict[str, list[tuple[int, float]]]]]:
    return ([(ComparedRun(f"dense-{s}", "dense", 1.0, s, "dense"), h) for s, h in DENSE.items()]
            + [(ComparedRun(f"fp50-{s}", "fp", 0.5, s, "FP 50%"), h) for s, h in FP.items()]
            + [(ComparedRun(f"row50-{s}", "fp-row", 0.5, s, "FP row 50%"), h) for s, h in ROW.items()])


def _log(uri: str, experiment: str, run_id: str, history: dict[str, list[tuple[int, float]]]) -> None:
    """Log `history` as a FedPrune run does: one batch of metrics per round, step = round."""
    with Tracker(uri, experiment, run_name=run_id) as tracker:
        tracker.set_tags({RUN_ID_TAG: run_id})
        for r in sorted({r for points in history.values() for r, _ in points}):
            tracker.log_metrics(r, {k: v for k, points in history.items() for step, v in points if step == r})


@pytest.fixture(scope="module")
def logged(sqlite_uri: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str], Path]:
    """The fake experiment logged to MLflow and its report written by the task."""
    experiment = f"budgets-{uuid.uuid4().hex[:8]}"
    for run, history in _runs():
        _log(sqlite_uri, experiment, run.run_id, history)
    out = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FEDPRUNE_TRACKING_URI", sqlite_uri)
        env.setenv("FEDPRUNE_HOME", str(out / "home"))
        files = comparison_report.fn(experiment, [run for run, _ in _runs()], str(out), 3)
    return experiment, files, out


def test_the_csv_has_ratios_to_the_same_seed_dense_run_and_the_last_three_evaluations(
        logged: tuple[str, dict[str, str], Path]) -> None:
    _, files, _ = logged
    rows = list(csv.DictReader(io.StringIO(Path(files["comparison.csv"]).read_text())))
    assert tuple(rows[0]) == COLUMNS
    assert COLUMNS[:11] == ("method", "budget", "seed", "client_params", "bytes_down", "bytes_up", "flops", "memory",
                            "wer", "cer", "rounds")
    by_id = {r["run_id"]: r for r in rows}
    assert len(rows) == 7
    for s in range(3):
        dense, fp = by_id[f"dense-{s}"], by_id[f"fp50-{s}"]
        assert (dense["method"], dense["budget"], dense["seed"], dense["rounds"]) == ("dense", "1", str(s), "6")
        assert [float(dense[c]) for c in ("client_params", "bytes_down", "bytes_up", "memory")] == [1.0] * 4
        assert float(dense["wer"]) == pytest.approx(0.2 + 0.01 * s) and float(dense["cer"]) == pytest.approx(
            (0.2 + 0.01 * s) / 2)
        # per client: dense's round 6 with one client does not lower its bytes
        assert [float(fp[c]) for c in ("client_params", "bytes_down", "bytes_up", "memory")] == pytest.approx(
            [0.5, 0.5, 0.5, 0.8])
        assert float(fp["wer"]) == pytest.approx(0.2 + 0.02 * s + 0.01) and fp["budget"] == "0.5"
        assert dense["flops"] == fp["flops"] == ""  # client_flops not logged
    row = by_id["row50-0"]
    assert row["rounds"] == "5" and float(row["wer"]) == pytest.approx((0.5 + 0.30 + 0.20) / 3 + 0.05)  # rounds 3-5
    assert float(row["bytes_down"]) == pytest.approx(0.6) and row["label"] == "FP row 50%"


def test_the_tables_hold_the_paired_t_interval_and_no_interval_for_one_pair(
        logged: tuple[str, dict[str, str], Path]) -> None:
    _, files, _ = logged
    md = Path(files["comparison.md"]).read_text()
    half = T_975_2 * 1.0 / math.sqrt(3)  # diffs 1, 2, 3 points: mean 2, sd 1
    assert f"[{2 - half:+.2f}, {2 + half:+.2f}]" == "[-0.48, +4.48]"
    assert "| fp @ 0.5 | 3 | 23.00 ± 2.00 | +2.00 [-0.48, +4.48] | — | 0.500 | 0.500 | 0.500 | n/a | 0.800 |" in md
    assert "| fp @ 0.5 − dense | 0, 1, 2 | +1.00, +2.00, +3.00 | +2.00 | [-0.48, +4.48] |" in md
    assert "| fp-row @ 0.5 | 1 | 38.33 | +18.33 (n=1, no interval) | +17.33 (n=1, no interval) |" in md
    assert "| fp-row @ 0.5 − fp @ 0.5 | 0 | +17.33 | +17.33 | n/a | n/a |" in md
    assert "## Findings" in md and "| e |" in md


def test_the_report_goes_to_out_dir_and_mlflow_and_the_plots_are_png(
        logged: tuple[str, dict[str, str], Path], sqlite_uri: str) -> None:
    experiment, files, out = logged
    assert set(files) == {"comparison.csv", "comparison.md", "comparison_wer_vs_budget.png",
                          "comparison_wer_vs_bytes.png", "comparison_wer_over_rounds.png"}
    for name, path in files.items():
        assert Path(path) == out / name
        if name.endswith(".png"):
            assert Path(path).read_bytes()[:8] == PNG
    client = MlflowClient(sqlite_uri)
    report = find_run(client, experiment, f"{experiment}-report")
    assert report is not None
    assert {a.path for a in client.list_artifacts(report, "comparison")} == {f"comparison/{n}" for n in files}


def test_the_pilots_table_marks_the_chosen_setting_and_a_diverged_run() -> None:
    from infra.comparison import render_pilots

    table = render_pilots([("SGD lr 0.2", math.nan, False), ("SGD lr 1", 0.5013, True)], k=3)
    assert "| SGD lr 0.2 | diverged (NaN) |  |" in table and "| SGD lr 1 | 50.1 | yes |" in table
    assert "last 3 evaluations" in table
    assert render_pilots([]) == ""


def test_a_missing_run_is_named(sqlite_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPRUNE_TRACKING_URI", sqlite_uri)
    with pytest.raises(ValueError, match="run 'nowhere' is not in MLflow experiment"):
        comparison_report.fn("budgets-none", [ComparedRun("nowhere", "fp", 0.5, 0, "fp")], str(tmp_path))


# ----------------------------------------------------------------------------- pure parts


def _result(history: dict[str, list[tuple[int, float]]]) -> RunResult:
    return RunResult("r", "r", (), 0, history)


def test_measure_needs_k_evaluations_and_at_least_three() -> None:
    run = ComparedRun("r", "fp", 0.5, 0, "fp")
    with pytest.raises(ValueError, match="k=2 must be >= 3"):
        measure(run, _result(FP[0]), _result(DENSE[0]), k=2)
    four = measure(run, _result(FP[0]), _result(DENSE[0]), k=4)
    assert four.wer == pytest.approx((0.5 + 0.3 + 0.2 + 0.1) / 4 + 0.01)
    assert math.isnan(measure(run, _result(FP[0]), _result(DENSE[0]), k=6).wer)  # only 5 evaluations
    alone = measure(run, _result(FP[0]), None)  # no dense run of its seed
    assert all(math.isnan(v) for v in alone.costs.values()) and alone.wer == pytest.approx(0.21)


def test_t_interval_is_the_hand_computed_one_and_needs_two_values() -> None:
    interval = t_interval([1.0, 2.0, 3.0])
    assert interval is not None
    assert (interval.low, interval.high) == pytest.approx((2 - T_975_2 / math.sqrt(3), 2 + T_975_2 / math.sqrt(3)))
    assert t_interval([1.0]) is None and t_interval([]) is None


def test_the_bootstrap_interval_is_seeded_within_the_data_and_needs_two_values() -> None:
    values = [1.0, 2.5, 3.7, 10.0, 4.2, 0.3, 7.7, 5.5]
    first, again = bootstrap_interval(values), bootstrap_interval(values)
    assert first == again and first is not None
    assert 0.3 <= first.low < statistics.fmean(values) < first.high <= 10.0
    assert bootstrap_interval(values, seed=1) != first  # the seed is what makes it repeat
    assert bootstrap_interval([4.0]) is None


def _group(method: str, budget: float | None, wers: dict[int, float], eval_sd: float = math.nan) -> Group:
    rows = [RunRow(ComparedRun(f"{method}-{s}", method, budget, s, method), dict.fromkeys(COSTS, 1.0), w, w / 2, 10,
                   eval_sd) for s, w in wers.items()]
    (group,) = groups_of(rows)
    return group


def test_paired_uses_only_the_seeds_both_ran() -> None:
    p = paired(_group("fp", 0.5, {0: 0.3, 1: 0.4, 5: 0.9}), _group("dense", 1.0, {0: 0.2, 1: 0.1, 2: 0.5}))
    assert p.seeds == (0, 1) and p.diffs == pytest.approx((0.1, 0.3)) and p.t is not None
    one = paired(_group("fp", 0.5, {0: 0.3}), _group("dense", 1.0, {0: 0.2, 1: 0.1}))
    assert one.diffs == pytest.approx((0.1,)) and one.t is None and one.bootstrap is None


def _pts(base: float, diffs: list[float]) -> dict[int, float]:
    """WER per seed: `base` plus `diffs` (in WER points) seed by seed."""
    return {s: base + d / 100 for s, d in enumerate(diffs)}


def test_adaptive_over_uniform_is_marked_from_the_interval() -> None:
    fp = _group("fp", 0.5, _pts(0.3, [0, 0, 0]))
    assert finding_c([fp, _group("fp-uniform", 0.5, _pts(0.3, [5, 6, 4]))])[0] == "supported"
    assert finding_c([fp, _group("fp-uniform", 0.5, _pts(0.3, [5, -3, -1]))])[0] == "inconclusive"
    equal = finding_c([fp, _group("fp-uniform", 0.5, _pts(0.3, [0.1, -0.1, 0.0]))])
    assert equal[0] == "not supported" and "t-95% [" in equal[1]
    assert finding_c([_group("fp", 0.5, {0: 0.3}), _group("fp-uniform", 0.5, {0: 0.5})])[0] == "inconclusive"
    assert finding_c([fp]) == ("inconclusive", "no fp and fp-uniform runs at budget 0.5")


def test_refinement_is_marked_at_every_budget_both_ran() -> None:
    fp = [_group("fp", 0.5, _pts(0.3, [0, 0, 0])), _group("fp", 0.35, _pts(0.4, [0, 0, 0]))]
    helps = _group("fp-norefine", 0.5, _pts(0.3, [3, 4, 5]))
    assert finding_d([*fp, helps])[0] == "supported"
    mark, evidence = finding_d([*fp, helps, _group("fp-norefine", 0.35, _pts(0.4, [-3, -4, -5]))])
    assert mark == "not supported" and "fp @ 0.5 − fp-norefine @ 0.5" in evidence and "@ 0.35" in evidence


def test_column_not_worse_than_row() -> None:
    fp = _group("fp", 0.5, _pts(0.3, [0, 0, 0]))
    assert finding_b([fp, _group("fp-row", 0.5, _pts(0.3, [1, 2, 3]))])[0] == "supported"
    assert finding_b([fp, _group("fp-row", 0.5, _pts(0.3, [-4, -5, -6]))])[0] == "not supported"
    assert finding_b([fp, _group("fp-row", 0.5, _pts(0.3, [-4, 5, 0]))])[0] == "inconclusive"


def test_weight_score_close_to_gradient_and_more_stable() -> None:
    fp = _group("fp", 0.5, {0: 0.20, 1: 0.21, 2: 0.22}, eval_sd=0.005)
    noisier = _group("fp-gradient", 0.5, {0: 0.20, 1: 0.215, 2: 0.23}, eval_sd=0.01)  # diffs 0, .5, 1 pts
    mark, evidence = finding_a([fp, noisier])
    assert mark == "supported" and "(≈: supported)" in evidence
    steadier = _group("fp-gradient", 0.5, {0: 0.20, 1: 0.205, 2: 0.21}, eval_sd=0.01)  # sd over seeds smaller
    assert finding_a([fp, steadier])[0] == "not supported"
    far = _group("fp-grad_sq", 0.5, {0: 0.30, 1: 0.32, 2: 0.34}, eval_sd=0.02)  # 10-12 points worse
    assert finding_a([fp, noisier, far])[0] == "not supported"


def test_sgd_gradient_score_is_judged_against_fp_with_sgd_clients() -> None:
    fp = _group("fp", 0.5, {0: 0.20, 1: 0.21, 2: 0.22}, eval_sd=0.005)
    sgd = _group("fp-sgd", 0.5, {0: 0.60, 1: 0.62, 2: 0.64}, eval_sd=0.005)
    sgd_grad = _group("fp-sgd-grad_sq", 0.5, {0: 0.60, 1: 0.625, 2: 0.65}, eval_sd=0.01)  # diffs 0, .5, 1 pts
    mark, evidence = finding_a([fp, sgd, sgd_grad])  # 40 points from FP, but within 1 of its own reference
    assert mark == "supported" and "fp-sgd vs fp-sgd-grad_sq" in evidence
    pairs = {(p.name, p.reference) for p in comparisons([fp, sgd, sgd_grad])}
    assert {("fp-sgd-grad_sq @ 0.5", "fp-sgd @ 0.5"), ("fp-sgd-grad_sq @ 0.5", "fp @ 0.5")} <= pairs
    assert finding_a([fp])[0] == "inconclusive"


def test_degradation_above_thirty_percent_sparsity() -> None:
    dense = _group("dense", 1.0, _pts(0.2, [0, 0, 0]))
    holds = _group("fp", 0.75, _pts(0.2, [-0.5, 0.5, 0.1]))
    falls = _group("fp", 0.5, _pts(0.2, [3, 4, 5]))  # t-95% [+1.52, +6.48]
    assert finding_e([dense, holds, falls])[0] == "supported"
    assert finding_e([dense, _group("fp", 0.75, _pts(0.2, [2, 3, 4])), falls])[0] == "not supported"
    assert finding_e([dense, holds, _group("fp", 0.5, _pts(0.2, [5, -3, 0]))])[0] == "inconclusive"
    assert finding_e([dense, holds])[0] == "inconclusive"  # nothing below budget 0.7


def test_every_finding_is_marked_with_one_of_three_words() -> None:
    marked = findings([_group("dense", 1.0, {0: 0.2})])
    assert [f.name for f in marked] == ["a", "b", "c", "d", "e"]
    assert {f.mark for f in marked} == {"inconclusive"}


def test_time_to_accuracy_sums_traffic_and_time_up_to_the_first_evaluation_at_the_target() -> None:
    history = {"eval_wer": [(4, 0.9), (8, 0.18), (12, 0.25), (16, 0.1)],
               "bytes_down": [(r, 100.0) for r in range(1, 17)], "bytes_up": [(r, 10.0) for r in range(1, 17)],
               "client_time_s_max": [(r, 0.5) for r in range(1, 17)]}
    assert reached(_result(history), 0.2) == (8, 8 * 110.0, 4.0, pytest.approx(math.nan, nan_ok=True))
    assert reached(_result(history), 0.1)[0] == 16  # type: ignore[index]
    assert reached(_result(history), 0.05) is None
    row = RunRow(ComparedRun("r", "fp", 0.5, 0, "fp"), dict.fromkeys(COSTS, 1.0), 0.2, 0.1, 16, 0.0)
    never = RunRow(ComparedRun("q", "fp", 0.5, 1, "fp"), dict.fromkeys(COSTS, 1.0), 0.3, 0.1, 16, 0.0)
    table = render_time_to_accuracy(groups_of([row, never]), {"r": _result(history), "q": _result({})}, 0.2)
    assert "| fp @ 0.5 | 1/2 | 8.0 | 0.0 | 4.0 | - |" in table
