"""The budgets comparison, read back from MLflow: per-run costs against dense, paired WER statistics,
tables, the paper's findings marked against the intervals, and plots.

Each method runs at matched client download budgets with paired seeds (the same seed samples the
same clients in every method), so a method is compared with dense FedAvg, and with FP at the same
budget, by the per-seed differences of their WER: only seeds that both ran count, and an interval
needs at least two of them. Every WER difference is the method's WER minus the reference's: above 0,
the method is worse.

Per run (`measure`): `client_params`, `bytes_down`, `bytes_up`, `flops` and `memory` are the mean
over rounds of the logged per-round metric (`COSTS`) divided by that of the dense run of the same
seed; `bytes_down` and `bytes_up` are first divided by the round's `clients_done` (the logged ones
sum over the clients that took part), so they are per client. A metric that was not logged, or a
seed without a dense run, gives NaN (an empty cell in the CSV). `wer` and `cer` are the means of
the last k evaluations (NaN with fewer than k); `rounds` counts the rounds that logged `bytes_down`.
Nothing here trains or evaluates: it only reads what the runs logged.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from mlflow.tracking import MlflowClient
from scipy import stats

from fedprune_core import budget
from fedprune_core.budget import MODELLED
from infra import results
from infra.results import RunResult, figure_png, plt

DENSE = "dense"
FP = "fp"
COSTS = {"client_params": "client_params", "bytes_down": "bytes_down", "bytes_up": "bytes_up",
         "flops": "client_flops", "memory": "client_peak_memory_bytes"}
"""CSV column -> the per-round metric whose mean over rounds is divided by dense's."""
PER_CLIENT = ("bytes_down", "bytes_up")
"""Metrics logged as sums over a round's clients: divided by `clients_done` first."""
METRICS = ("eval_wer", "eval_cer", "clients_done", "client_time_s_max", MODELLED, *COSTS.values())
COLUMNS = ("method", "budget", "seed", *COSTS, "wer", "cer", "rounds", "run_id", "label")
LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 20220918  # fixed: the same runs give the same bootstrap interval
MARGIN = 0.02
"""WER difference (2 points) within which two methods count as equivalent (findings a, b, c, d)."""
DEGRADATION_BUDGET = 0.7
"""Budgets below this (sparsity above ~30%) are where finding (e) expects FP to fall behind dense."""
MIN_EVALS = 3
TARGET_WER = 0.2
"""The WER whose first reaching the time-to-accuracy table reports (PruneFL's own claim: time to a target)."""


@dataclass(frozen=True)
class ComparedRun:
    """One run of the comparison.

    Attributes:
        run_id: the FedPrune run id (MLflow tag `fedprune.run_id`).
        method: e.g. "dense", "fp", "fp-row", "fd-hidden", "prunefl" (`DENSE` and `FP` are the references).
        budget: target share of the dense download (1.0 for dense); None for a run outside the budget grid.
        seed: the experiment seed; runs of the same seed sampled the same clients.
        label: how tables and plots name a run outside the grid.
    """

    run_id: str
    method: str
    budget: float | None
    seed: int
    label: str


@dataclass(frozen=True)
class RunRow:
    """One run measured: cost ratios to the same seed's dense run, WER and CER of the last evaluations."""

    run: ComparedRun
    costs: dict[str, float]
    wer: float
    cer: float
    rounds: int
    eval_sd: float
    """Standard deviation of the last k evaluations' WER (NaN below two)."""


@dataclass(frozen=True)
class Interval:
    """A confidence interval [low, high]."""

    low: float
    high: float


@dataclass(frozen=True)
class Paired:
    """Per-seed differences of WER, `name` minus `reference`, over the seeds both ran.

    `t` is the Student-t interval of their mean, `bootstrap` the percentile interval of the mean
    over resampled seeds; both None with fewer than two pairs.
    """

    name: str
    reference: str
    seeds: tuple[int, ...]
    diffs: tuple[float, ...]
    t: Interval | None
    bootstrap: Interval | None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs) if self.diffs else math.nan


@dataclass(frozen=True)
class Group:
    """The runs of one method at one budget (or, outside the grid, of one label), one per seed."""

    method: str
    budget: float | None
    name: str
    rows: tuple[RunRow, ...]

    def wers(self) -> dict[int, float]:
        """Seed -> WER, for the seeds with a WER."""
        return {r.run.seed: r.wer for r in self.rows if math.isfinite(r.wer)}

    def wer_sd(self) -> float:
        values = list(self.wers().values())
        return statistics.stdev(values) if len(values) > 1 else math.nan

    def eval_sd(self) -> float:
        """Mean over seeds of the sd of the last evaluations (NaN when no run has one)."""
        values = [r.eval_sd for r in self.rows if math.isfinite(r.eval_sd)]
        return statistics.fmean(values) if values else math.nan

    def cost(self, key: str) -> float:
        values = [r.costs[key] for r in self.rows if math.isfinite(r.costs[key])]
        return statistics.fmean(values) if values else math.nan


@dataclass(frozen=True)
class Finding:
    """One of the paper's findings, marked "supported", "not supported" or "inconclusive"."""

    name: str
    claim: str
    mark: str
    evidence: str


# ----------------------------------------------------------------------------- reading and measuring


def collect(client: MlflowClient, experiment: str, runs: Sequence[ComparedRun]) -> list[RunResult]:
    """The metric histories of `runs` (`results.collect`, raising for a run not in `experiment`)."""
    return results.collect(client, experiment, [(r.run_id, r.label, (), r.seed) for r in runs], METRICS)


def _per_round(result: RunResult, key: str) -> list[float]:
    points = result.history.get(key) or []
    if key not in PER_CLIENT:
        return [v for _, v in points]
    done = dict(result.history.get("clients_done") or [])
    return [v / done[r] if done.get(r) else v for r, v in points]


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def last_evaluations(result: RunResult, key: str, k: int) -> list[float]:
    """The last `k` logged values of `key` (all of them when fewer)."""
    return [v for _, v in (result.history.get(key) or [])[-k:]]


def measure(run: ComparedRun, result: RunResult, dense: RunResult | None, k: int = MIN_EVALS) -> RunRow:
    """`run`'s row: costs relative to `dense` (the same seed's dense run; None: NaN), WER and CER
    as the mean of the last `k` evaluations (NaN with fewer than k)."""
    if k < MIN_EVALS:
        raise ValueError(f"k={k} must be >= {MIN_EVALS}: the WER of a run is the mean of at least 3 evaluations")
    costs = {}
    for column, key in COSTS.items():
        reference = _mean(_per_round(dense, key)) if dense is not None else math.nan
        costs[column] = _mean(_per_round(result, key)) / reference if reference else math.nan
    wers, cers = last_evaluations(result, "eval_wer", k), last_evaluations(result, "eval_cer", k)
    return RunRow(run, costs, _mean(wers) if len(wers) == k else math.nan, _mean(cers) if len(cers) == k else math.nan,
                  len(result.history.get("bytes_down") or []), statistics.stdev(wers) if len(wers) > 1 else math.nan)


def measure_all(runs: Sequence[ComparedRun], found: Sequence[RunResult], k: int = MIN_EVALS) -> list[RunRow]:
    """Rows of `runs` (with their histories `found`, in the same order), each against its seed's dense run."""
    dense = {run.seed: result for run, result in zip(runs, found, strict=True) if run.method == DENSE}
    return [measure(run, result, dense.get(run.seed), k) for run, result in zip(runs, found, strict=True)]


def render_csv(rows: Sequence[RunRow]) -> str:
    """One line per run, the columns of `COLUMNS` (run_id and label last); NaN is an empty cell."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        budget = "" if r.run.budget is None else f"{r.run.budget:g}"
        numbers = [*(r.costs[c] for c in COSTS), r.wer, r.cer]
        writer.writerow([r.run.method, budget, r.run.seed, *("" if math.isnan(v) else f"{v:.6f}" for v in numbers),
                         r.rounds, r.run.run_id, r.run.label])
    return buf.getvalue()


# ----------------------------------------------------------------------------- paired statistics


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval | None:
    """Student-t interval of the mean of `values`; None with fewer than two."""
    n = len(values)
    if n < 2:
        return None
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    mean = statistics.fmean(values)
    return Interval(mean - half, mean + half)


def bootstrap_interval(values: Sequence[float], level: float = LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> Interval | None:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement from a
    generator seeded with `seed`); None with fewer than two."""
    if len(values) < 2:
        return None
    x = np.asarray(values, dtype=np.float64)
    means = x[np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(low), float(high))


def paired(group: Group, reference: Group) -> Paired:
    """WER of `group` minus that of `reference`, seed by seed, over the seeds both have."""
    mine, theirs = group.wers(), reference.wers()
    seeds = tuple(sorted(mine.keys() & theirs.keys()))
    diffs = tuple(mine[s] - theirs[s] for s in seeds)
    return Paired(group.name, reference.name, seeds, diffs, t_interval(diffs), bootstrap_interval(diffs))


def _name(method: str, budget: float | None, label: str) -> str:
    if method == DENSE:
        return DENSE
    return f"{method} @ {budget:g}" if budget is not None else label


def groups_of(rows: Sequence[RunRow]) -> list[Group]:
    """Rows grouped by method and budget (dense: one group; outside the grid: by label), first seen first."""
    grouped: dict[tuple[str, float | None, str], list[RunRow]] = {}
    for r in rows:
        budget = None if r.run.method == DENSE else r.run.budget
        key = (r.run.method, budget, r.run.label if budget is None and r.run.method != DENSE else "")
        grouped.setdefault(key, []).append(r)
    return [Group(m, b, _name(m, b, label), tuple(rs)) for (m, b, label), rs in grouped.items()]


def find_group(groups: Sequence[Group], method: str, budget: float | None = None) -> Group | None:
    """The group of `method` at `budget` (dense: whatever its budget), or None."""
    for g in groups:
        same = g.budget is not None and budget is not None and math.isclose(g.budget, budget)
        if g.method == method and (method == DENSE or same):
            return g
    return None


SCORE_PAIRS: tuple[tuple[str, str], ...] = (
    ("fp-gradient", FP), ("fp-grad_sq", FP), ("fp-weight_x_grad_sq", FP), ("fp-sgd-grad_sq", "fp-sgd"))
"""(gradient-score variant, its weight-score reference at budget 0.5): Adam clients against FP, SGD
clients against FP with SGD clients (finding a)."""


def comparisons(groups: Sequence[Group]) -> list[Paired]:
    """Every group against dense, every grid group but FP's against FP at the same budget, and each
    SGD gradient-score variant against its weight-score reference (`SCORE_PAIRS`)."""
    dense = find_group(groups, DENSE)
    out = []
    for g in groups:
        if g.method == DENSE:
            continue
        if dense is not None:
            out.append(paired(g, dense))
        fp = find_group(groups, FP, g.budget) if g.budget is not None and g.method != FP else None
        if fp is not None:
            out.append(paired(g, fp))
        own = dict(SCORE_PAIRS).get(g.method)
        ref = find_group(groups, own, g.budget) if own not in (None, FP) and g.budget is not None else None
        if ref is not None:
            out.append(paired(g, ref))
    return out


# ----------------------------------------------------------------------------- findings

Mark = tuple[str, str]
"""(mark, evidence) of one comparison."""


def _pts(x: float) -> str:
    return f"{100 * x:+.2f}"


def _interval(i: Interval | None) -> str:
    return "n/a" if i is None else f"[{_pts(i.low)}, {_pts(i.high)}]"


def describe(p: Paired) -> str:
    """`p` in words: mean difference, both intervals (WER points) and the number of pairs."""
    if not p.diffs:
        return f"{p.name} − {p.reference}: no seed in common"
    return (f"{p.name} − {p.reference}: {_pts(p.mean)} pts, t-95% {_interval(p.t)}, bootstrap-95% "
            f"{_interval(p.bootstrap)}, n={len(p.diffs)}")


def _combine(marks: Sequence[str]) -> str:
    if "not supported" in marks:
        return "not supported"
    return "supported" if marks and all(m == "supported" for m in marks) else "inconclusive"


def _equivalent(p: Paired) -> str:
    """Within ±MARGIN: supported; entirely outside it: not supported; else inconclusive."""
    if p.t is None:
        return "inconclusive"
    if -MARGIN <= p.t.low and p.t.high <= MARGIN:
        return "supported"
    return "not supported" if p.t.low > MARGIN or p.t.high < -MARGIN else "inconclusive"


def _better(p: Paired) -> str:
    """`p.name` better than `p.reference` (p = name − reference): interval below 0: supported;
    above 0, or within ±MARGIN: not supported; else inconclusive."""
    if p.t is None:
        return "inconclusive"
    if p.t.high < 0:
        return "supported"
    within = -MARGIN <= p.t.low and p.t.high <= MARGIN
    return "not supported" if p.t.low > 0 or within else "inconclusive"


def _not_worse(p: Paired) -> str:
    """`p.name` no worse than `p.reference`: interval above 0: not supported; below +MARGIN:
    supported; else inconclusive."""
    if p.t is None:
        return "inconclusive"
    if p.t.low > 0:
        return "not supported"
    return "supported" if p.t.high <= MARGIN else "inconclusive"


def _budgets(groups: Sequence[Group], method: str) -> list[float]:
    return sorted({g.budget for g in groups if g.method == method and g.budget is not None}, reverse=True)


def _pairs(groups: Sequence[Group], method: str, reference: str, budgets: Sequence[float]) -> list[Paired]:
    """`method` minus `reference` at each of `budgets` where both ran."""
    out = []
    for b in budgets:
        g, ref = find_group(groups, method, b), find_group(groups, reference, b)
        if g is not None and ref is not None:
            out.append(paired(g, ref))
    return out


def _marked(pairs: Sequence[Paired], rule: Callable[[Paired], str], missing: str) -> Mark:
    if not pairs:
        return "inconclusive", missing
    marks = [rule(p) for p in pairs]
    return _combine(marks), "; ".join(f"{describe(p)} → {m}" for p, m in zip(pairs, marks, strict=True))


def _stable(fp: Group, other: Group) -> tuple[bool | None, str]:
    """Whether FP is at least as stable as `other`: its sd over seeds and its mean sd of the last
    evaluations are no larger (each compared where both are known; None when neither is)."""
    checks = [(a, b, what) for a, b, what in ((fp.wer_sd(), other.wer_sd(), "sd over seeds"),
                                              (fp.eval_sd(), other.eval_sd(), "sd of the last evaluations"))
              if math.isfinite(a) and math.isfinite(b)]
    text = ", ".join(f"{what} {100 * a:.2f} vs {100 * b:.2f} pts" for a, b, what in checks) or "no sd to compare"
    return (all(a <= b for a, b, _ in checks) if checks else None), text


def finding_a(groups: Sequence[Group]) -> Mark:
    """Weight score ≈ gradient scores, and more stable (budget 0.5).

    For each pair of `SCORE_PAIRS` that ran (a gradient-score variant and its weight-score reference:
    FP, or FP with SGD clients for the SGD variant): "≈" is supported when the t-interval of
    (variant − reference) lies within ±2 WER points, not supported when it lies entirely outside,
    else inconclusive; "more stable" holds when the reference's sd of WER over seeds and its mean sd
    of the last k evaluations are each no larger than the variant's. A variant supports the finding
    when both hold, contradicts it when "≈" is not supported or the reference is less stable while
    "≈" holds, else is inconclusive. Any contradiction: not supported; all support: supported.
    """
    marks, evidence = [], []
    for method, reference in SCORE_PAIRS:
        other, ref = find_group(groups, method, 0.5), find_group(groups, reference, 0.5)
        if ref is None or other is None:
            continue
        p = paired(other, ref)
        close, (stable, sds) = _equivalent(p), _stable(ref, other)
        mark = "not supported" if close == "not supported" or (close == "supported" and stable is False) else (
            "supported" if close == "supported" and stable else "inconclusive")
        marks.append(mark)
        evidence.append(f"{describe(p)} (≈: {close}); {reference} vs {method}: {sds} → {mark}")
    if not marks:
        return "inconclusive", "no fp and gradient-score runs at budget 0.5"
    return _combine(marks), "; ".join(evidence)


def finding_b(groups: Sequence[Group]) -> Mark:
    """Column ≥ row: at each budget where both ran, the t-interval of (fp − fp-row) entirely above 0
    (column worse): not supported; its upper end at most +2 WER points (column no worse than row
    beyond the margin): supported; else inconclusive. Combined over budgets: any not supported wins,
    all supported gives supported."""
    return _marked(_pairs(groups, FP, "fp-row", _budgets(groups, "fp-row")), _not_worse, "no fp and fp-row runs at a "
                   "common budget")


def finding_c(groups: Sequence[Group]) -> Mark:
    """Adaptive > uniform at 50%: the t-interval of (fp − fp-uniform) at budget 0.5 entirely below 0:
    supported; entirely above 0, or within ±2 WER points: not supported; else inconclusive."""
    return _marked(_pairs(groups, FP, "fp-uniform", [0.5]), _better, "no fp and fp-uniform runs at budget 0.5")


def finding_d(groups: Sequence[Group]) -> Mark:
    """Refinement helps: at each budget where both ran, the rule of (c) on (fp − fp-norefine);
    combined over budgets as in (b)."""
    return _marked(_pairs(groups, FP, "fp-norefine", _budgets(groups, "fp-norefine")), _better,
                   "no fp and fp-norefine runs at a common budget")


def _degrades(p: Paired) -> str:
    """Below budget 0.7: interval above 0: supported; below 0 or within ±MARGIN: not supported."""
    if p.t is None:
        return "inconclusive"
    if p.t.low > 0:
        return "supported"
    return "not supported" if p.t.high < 0 or (-MARGIN <= p.t.low and p.t.high <= MARGIN) else "inconclusive"


def _holds_up(p: Paired) -> str:
    """At budget 0.7 or more: interval above 0: not supported; else supported."""
    if p.t is None:
        return "inconclusive"
    return "not supported" if p.t.low > 0 else "supported"


def finding_e(groups: Sequence[Group]) -> Mark:
    """Degradation above ~30% sparsity: FP at each budget against dense. At a budget below 0.7 the
    t-interval of (fp − dense) entirely above 0 supports the finding, entirely below 0 or within ±2
    WER points contradicts it; at a budget of 0.7 or more an interval entirely above 0 contradicts it
    (degradation already there), any other supports it. Combined as in (b); inconclusive without an
    fp run below budget 0.7 paired with dense."""
    dense = find_group(groups, DENSE)
    pairs = [(b, paired(g, dense)) for b in _budgets(groups, FP) if dense and (g := find_group(groups, FP, b))]
    if not any(b < DEGRADATION_BUDGET for b, _ in pairs):
        return "inconclusive", "no fp run below budget 0.7 with a dense run to pair"
    marks = [(_degrades if b < DEGRADATION_BUDGET else _holds_up)(p) for b, p in pairs]
    return _combine(marks), "; ".join(f"{describe(p)} → {m}" for (_, p), m in zip(pairs, marks, strict=True))


FINDINGS: dict[str, tuple[str, Callable[[Sequence[Group]], Mark]]] = {
    "a": ("weight score ≈ gradient scores and more stable (budget 0.5)", finding_a),
    "b": ("column ≥ row", finding_b),
    "c": ("adaptive > uniform sparsity at 50%", finding_c),
    "d": ("refinement helps", finding_d),
    "e": ("FP degrades against dense above ~30% sparsity (budgets < 0.7), not below", finding_e),
}
"""The paper's findings: name -> (claim, the function that marks it; its docstring is the rule)."""


def findings(groups: Sequence[Group]) -> list[Finding]:
    """Each finding of `FINDINGS`, marked from the paired t-intervals, with its evidence."""
    return [Finding(name, claim, *rule(groups)) for name, (claim, rule) in FINDINGS.items()]


# ----------------------------------------------------------------------------- tables


def _ratio(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def _diff_cell(p: Paired | None) -> str:
    if p is None:
        return "—"
    if not p.diffs:
        return "no common seed"
    return f"{_pts(p.mean)} {_interval(p.t)}" if p.t is not None else f"{_pts(p.mean)} (n=1, no interval)"


def _wer_cell(g: Group) -> str:
    wers = list(g.wers().values())
    if not wers:
        return "n/a"
    sd = f" ± {100 * g.wer_sd():.2f}" if len(wers) > 1 else ""
    return f"{100 * statistics.fmean(wers):.2f}{sd}"


def _table(rows: Sequence[Group], pairs: Sequence[Paired], with_fp: bool) -> list[str]:
    head = ["method", "seeds", "WER % (mean ± sd)", "Δ WER vs dense, pts [t-95%]",
            *(["Δ WER vs FP, pts [t-95%]"] if with_fp else []), *(f"{c} / dense" for c in COSTS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in rows:
        vs = {p.reference: p for p in pairs if p.name == g.name}
        fp = find_group(rows, FP, g.budget) if g.budget is not None else None
        cells = [g.name, str(len(g.rows)), _wer_cell(g), _diff_cell(vs.get(DENSE)),
                 *([_diff_cell(vs.get(fp.name) if fp else None)] if with_fp else []),
                 *(_ratio(g.cost(c)) for c in COSTS)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _grid_order(groups: Sequence[Group], budget: float) -> list[Group]:
    at = [g for g in groups if g.method != DENSE and g.budget is not None and math.isclose(g.budget, budget)]
    return sorted(at, key=lambda g: g.method != FP)  # FP first, then as seen


def render_markdown(groups: Sequence[Group], pairs: Sequence[Paired], marked: Sequence[Finding], k: int) -> str:
    """The report: a table per budget, one for the runs outside the grid, every paired difference
    with both intervals, and the findings."""
    dense = [g for g in groups if g.method == DENSE]
    out = [f"WER: mean of the last {k} evaluations of a run; Δ WER: the method's WER minus the reference's, "
           "seed by seed over the seeds both ran (above 0: worse), in WER points, with the 95% Student-t "
           "interval of its mean (n/a below two pairs). Costs: mean over rounds, relative to the dense run of "
           "the same seed, then averaged over seeds; bytes per client; n/a: not logged.", ""]
    budgets = sorted({g.budget for g in groups if g.method != DENSE and g.budget is not None}, reverse=True)
    for b in budgets:
        out += [f"## Budget {b:g} of the dense download", "", *_table(dense + _grid_order(groups, b), pairs, True), ""]
    off = [g for g in groups if g.method != DENSE and g.budget is None]
    if off:
        out += ["## Outside the budget grid", "", *_table(dense + off, pairs, False), ""]
    out += ["## Paired differences", "", "| comparison | seeds | per-seed Δ WER, pts | mean, pts | t-95% | "
            "bootstrap-95% |", "|---|---|---|---|---|---|"]
    for p in pairs:
        diffs = ", ".join(_pts(d) for d in p.diffs) or "none"
        mean = _pts(p.mean) if p.diffs else "n/a"
        out.append(f"| {p.name} − {p.reference} | {', '.join(map(str, p.seeds)) or 'none'} | {diffs} | {mean} "
                   f"| {_interval(p.t)} | {_interval(p.bootstrap)} |")
    out += ["", f"## Findings (rules: `infra.comparison.finding_*`; equivalence margin ±{100 * MARGIN:g} WER points)",
            "", "| finding | claim | mark | evidence (t-95% intervals decide) |", "|---|---|---|---|"]
    out += [f"| {f.name} | {f.claim} | **{f.mark}** | {f.evidence} |" for f in marked]
    return "\n".join(out) + "\n"


def reached(result: RunResult, target: float = TARGET_WER) -> tuple[int, float, float, float] | None:
    """The first evaluated round whose WER is at most `target`, and up to it: client bytes (down + up,
    all clients), client time (each round's slowest client, summed) and PruneFL's modelled round time
    (summed; NaN when not logged), as `fedprune_core.budget.reached` reads a run's history. None: never reached."""
    rounds: dict[int, dict[str, float]] = {}
    empty = {"bytes_down": 0.0, "bytes_up": 0.0, "client_time_s_max": math.nan}
    for key in ("bytes_down", "bytes_up", "client_time_s_max", MODELLED, "eval_wer"):
        for r, value in result.history.get(key) or []:
            rounds.setdefault(r, {"round": r, **empty})[key] = value
    hit = budget.reached([rounds[r] for r in sorted(rounds)], "eval_wer", target)
    if hit is None:
        return None
    modelled = math.nan if hit.modelled_time_s is None else hit.modelled_time_s
    return hit.round_num, hit.client_bytes, hit.client_time_s, modelled


def render_time_to_accuracy(groups: Sequence[Group], found: dict[str, RunResult], target: float = TARGET_WER) -> str:
    """A table: per configuration, how many seeds reached `target` WER, and the mean over those of the
    round, the client traffic, the client time and the modelled time at which they did."""
    lines = [f"## Time to {100 * target:g}% WER", "",
             "Mean over the seeds that reached it; client time: each round's slowest client, summed; modelled "
             "time: PruneFL's round-time model, summed.", "",
             "| configuration | seeds reached | round | client traffic, MiB | client time, s | modelled time, s |",
             "|---|---|---|---|---|---|"]
    for g in groups:
        hits = [h for r in g.rows if (h := reached(found[r.run.run_id], target)) is not None]
        if not hits:
            lines.append(f"| {g.name} | 0/{len(g.rows)} | - | - | - | - |")
            continue
        modelled = _mean([h[3] for h in hits if not math.isnan(h[3])])
        lines.append(f"| {g.name} | {len(hits)}/{len(g.rows)} | {_mean([h[0] for h in hits]):.1f} "
                     f"| {_mean([h[1] for h in hits]) / 2**20:.1f} | {_mean([h[2] for h in hits]):.1f} "
                     f"| {'-' if math.isnan(modelled) else f'{modelled:.1f}'} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


def _mean_curve(results_: Sequence[RunResult], x_of: Callable[[RunResult], dict[int, float]]) -> tuple[
        list[float], list[float]]:
    """Mean over runs of (x, WER %) at the evaluation rounds every run has."""
    curves = [(x_of(r), dict(r.history.get("eval_wer") or [])) for r in results_]
    common = sorted(set.intersection(*(set(w) & set(x) for x, w in curves))) if curves else []
    xs = [statistics.fmean(x[r] for x, _ in curves) for r in common]
    return xs, [100 * statistics.fmean(w[r] for _, w in curves) for r in common]


def _cumulative_bytes(result: RunResult) -> dict[int, float]:
    """Round -> bytes down and up over all clients, summed over the rounds up to it."""
    up = dict(result.history.get("bytes_up") or [])
    total, out = 0.0, {}
    for r, down in result.history.get("bytes_down") or []:
        total += down + up.get(r, 0.0)
        out[r] = total
    return out


def _at_budget(groups: Sequence[Group], budget: float) -> list[Group]:
    return [g for g in groups if g.method == DENSE] + _grid_order(groups, budget)


def palette() -> list[tuple[float, float, float]]:
    """20 colors, ten dark then ten light (matplotlib's tab20): one per line, where the default ten repeat."""
    tab20 = list(plt.get_cmap("tab20").colors)  # type: ignore[attr-defined]
    return tab20[0::2] + tab20[1::2]


def plot_wer_vs_budget(groups: Sequence[Group]) -> bytes:
    """WER (mean over seeds) against the download budget, one line per method, t-95% error bars
    (none below two seeds); dense at budget 1; each configuration outside the grid a lone marker at
    the download it measured."""
    fig, ax = plt.subplots(figsize=(11, 5))
    colors = palette()  # methods first, lone markers from the end
    ran = [g for g in groups if g.wers()]
    grid = [g for g in ran if g.budget is not None or g.method == DENSE]
    for i, method in enumerate(dict.fromkeys(g.method for g in grid)):
        points = sorted((1.0 if g.method == DENSE or g.budget is None else g.budget, list(g.wers().values()))
                        for g in grid if g.method == method)
        means = [100 * statistics.fmean(w) for _, w in points]
        ax.errorbar([b for b, _ in points], means, yerr=[_half_width(w) for _, w in points], marker="o", capsize=3,
                    label=method, color=colors[i % len(colors)])
    for i, g in enumerate(g for g in ran if g not in grid):
        w = list(g.wers().values())
        ax.errorbar([g.cost("bytes_down")], [100 * statistics.fmean(w)], yerr=[_half_width(w)], marker="s",
                    capsize=3, linestyle="none", label=f"{g.name} (measured download)",
                    color=colors[-1 - i % len(colors)])
    ax.set_xlabel("client download budget (share of the dense model)")
    ax.set_ylabel("WER % (mean of the last evaluations, mean over seeds)")
    ax.set_title("WER against the download budget; bars: t-95% interval over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure_png(fig)


def _half_width(wers: list[float]) -> float:
    """Half the t-95% interval of the mean of `wers`, in WER points (0 below two values)."""
    return 100 * (i.high - i.low) / 2 if (i := t_interval(wers)) else 0.0


def _curves(groups: Sequence[Group], found: dict[str, RunResult], budget: float,
            x_of: Callable[[RunResult], dict[int, float]], xlabel: str,
            title: str) -> bytes:
    """WER (mean over seeds) against `x_of`'s x per evaluation, one line per method at `budget` and dense."""
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = palette()
    for i, g in enumerate(_at_budget(groups, budget)):
        xs, ys = _mean_curve([found[r.run.run_id] for r in g.rows], x_of)
        ax.plot(xs, ys, marker=".", label=g.name, color=colors[i % len(colors)])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("WER % (mean over seeds)")
    ax.set_title(f"{title} at budget {budget:g}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure_png(fig)


def plot_wer_vs_bytes(groups: Sequence[Group], found: dict[str, RunResult], budget: float = 0.5) -> bytes:
    """WER against cumulative client traffic (down + up over all clients, summed over rounds, in MiB),
    mean over seeds, for each method at `budget` and dense."""
    def mib(r: RunResult) -> dict[int, float]:
        return {step: x / 2**20 for step, x in _cumulative_bytes(r).items()}

    return _curves(groups, found, budget, mib, "cumulative client traffic, down + up (MiB, all clients)",
                   "WER against traffic")


def plot_wer_over_rounds(groups: Sequence[Group], found: dict[str, RunResult], budget: float = 0.5) -> bytes:
    """WER over rounds, mean over seeds, for each method at `budget` and dense."""
    return _curves(groups, found, budget, lambda r: {s: float(s) for s, _ in r.history.get("eval_wer") or []},
                   "round", "WER over rounds")


def render_pilots(pilots: Sequence[tuple[str, float, bool]], k: int = MIN_EVALS) -> str:
    """A table of the pilot runs that chose a setting ((label, WER, chosen)), or "" without any."""
    if not pilots:
        return ""
    lines = ["## Pilots", "", f"Seed 0; WER the mean of the last {k} evaluations; the chosen setting is used by "
             "every run of the comparison.", "", "| pilot | WER % | chosen |", "|---|---|---|"]
    lines += [f"| {label} | {_percent(wer)} | {'yes' if chosen else ''} |" for label, wer, chosen in pilots]
    return "\n".join(lines) + "\n"


def _percent(wer: float) -> str:
    return "diverged (NaN)" if math.isnan(wer) else f"{100 * wer:.1f}"


def report_files(runs: Sequence[ComparedRun], found: Sequence[RunResult], k: int = MIN_EVALS,
                 pilots: Sequence[tuple[str, float, bool]] = ()) -> dict[str, bytes]:
    """{file name: bytes} of the report of `runs` (their histories `found`, in the same order), with
    the table of the `pilots` (`render_pilots`) at the end of comparison.md."""
    rows = measure_all(runs, found, k)
    groups = groups_of(rows)
    pairs = comparisons(groups)
    by_id = {run.run_id: result for run, result in zip(runs, found, strict=True)}
    return {
        "comparison.csv": render_csv(rows).encode(),
        "comparison.md": (render_markdown(groups, pairs, findings(groups), k) + "\n"
                          + render_time_to_accuracy(groups, by_id)
                          + ("\n" + render_pilots(pilots, k) if pilots else "")).encode(),
        "comparison_wer_vs_budget.png": plot_wer_vs_budget(groups),
        "comparison_wer_vs_bytes.png": plot_wer_vs_bytes(groups, by_id),
        "comparison_wer_over_rounds.png": plot_wer_over_rounds(groups, by_id),
    }
