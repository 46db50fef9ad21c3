"""A run's plots, drawn from what it logged, during the run (at checkpoints) and at its end.

`log_plots` stores, as artifacts of the run's MLflow run:

- ``plots/metrics.png``: the evaluation metrics (WER, CER, ...), the training loss and the
  sparsity over rounds, the phases marked;
- ``plots/layer_sparsity.png``: each prunable parameter's sparsity over rounds (a heatmap);
- ``plots/mask_changes.png`` and ``.csv``: the weights pruned and regrown at each mask change;
- ``plots/bytes.png``: the bytes the clients moved down and up, cumulated, against a dense model's.

The metrics come from MLflow; the mask changes from the run's storage, where each checkpoint
records the changes of the rounds it covers (`save_mask_changes`, before their masks are dropped).
Every curve is thinned to at most `MAX_POINTS` points and the heatmap to `MAX_COLUMNS` columns, so
a 30,000-round run draws in about the time of a short one; `Throttle` keeps refreshes during a
run rare (`PLOT_EVERY_S`) and their time a small share of the run's (`PLOT_TIME_SHARE`).
"""

from __future__ import annotations

import csv
import io
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fedprune_core.engine import ServerState  # noqa: E402
from fedprune_core.mask_history import MaskChange  # noqa: E402
from fedprune_core.submodel import payload_nbytes  # noqa: E402
from infra.runs import Run  # noqa: E402
from infra.storage import Storage, get_json, put_json  # noqa: E402
from infra.tracking import Tracker, strategy_phases  # noqa: E402

MAX_POINTS = 2000
"""Points per curve at most (evenly spaced rounds, the last always among them)."""
MAX_COLUMNS = 400
"""Columns of the heatmap and bars of the mask-change plot at most."""
PLOT_EVERY_S = 300.0
"""During a run, the plots are drawn again at a checkpoint at most this often..."""
PLOT_TIME_SHARE = 0.02
"""...and drawing them takes at most this share of the run's time (after a refresh that took t
seconds, the next waits at least t / PLOT_TIME_SHARE)."""
EVAL_KEYS = ("eval_wer", "eval_cer", "eval_accuracy", "eval_loss")
TRAINING_KEYS = ("train_loss", "sparsity")
BYTES_KEYS = ("bytes_down", "bytes_up", "clients_done")
MASK_CHANGES_DIR = "mask_changes"

Series = list[tuple[int, float]]
"""A metric's history: (round, value), ascending rounds, one value a round."""
Span = tuple[str, int, int]
"""A phase: (name, first round, last round)."""


# ----------------------------------------------------------------------------- mask-change records


def save_mask_changes(storage: Storage, base: str, last_round: int, changes: Sequence[MaskChange]) -> None:
    """Record the mask changes of the rounds a checkpoint of `last_round` covers, under ``<base>/mask_changes/``.

    A round is computed the same way however often it is run (a resumed run repeats the rounds
    after its last checkpoint), so a record written again holds the same changes.
    """
    key = f"{base}/{MASK_CHANGES_DIR}/{last_round:06d}.json"
    put_json(storage, key, {"changes": [c.to_json() for c in changes]})


def load_mask_changes(storage: Storage, base: str, up_to: int) -> list[MaskChange]:
    """Every recorded mask change of rounds up to `up_to`, in round order (one per round)."""
    keys = [k for k in storage.list_keys(f"{base}/{MASK_CHANGES_DIR}/") if k.endswith(".json")]
    changes = {}
    for key in keys:
        for item in get_json(storage, key)["changes"]:
            change = MaskChange.from_json(item)
            if change.round_num <= up_to:
                changes[change.round_num] = change
    return [changes[r] for r in sorted(changes)]


# ----------------------------------------------------------------------------- drawing (data -> PNG)


def thin(points: Sequence[tuple[int, float]], limit: int = MAX_POINTS) -> list[tuple[int, float]]:
    """At most `limit` of `points`, evenly spaced, the first and the last kept."""
    if len(points) <= limit:
        return list(points)
    picked = np.unique(np.linspace(0, len(points) - 1, limit).round().astype(int))
    return [points[i] for i in picked]


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _mark_phases(ax: plt.Axes, phases: Sequence[Span], label: bool) -> None:
    """Dashed lines between the phases, their names above the axes; the x axis spans them all."""
    if phases:
        ax.set_xlim(phases[0][1] - 0.5, phases[-1][2] + 0.5)
    for i, (name, first, last) in enumerate(phases):
        if i:
            ax.axvline(first - 0.5, color="grey", linestyle="--", linewidth=0.8)
        if label:
            ax.text((first + last) / 2, 1.02, name, transform=ax.get_xaxis_transform(), ha="center", fontsize=8,
                    color="dimgrey")


def metrics_png(history: dict[str, Series], phases: Sequence[Span]) -> bytes | None:
    """The evaluation metrics, training loss and sparsity over rounds, one panel each, phases marked."""
    shown = [k for k in (*EVAL_KEYS, *TRAINING_KEYS) if history.get(k)]
    if not shown:
        return None
    fig, axes = plt.subplots(len(shown), 1, figsize=(7, 1.9 * len(shown) + 0.4), sharex=True, squeeze=False)
    for i, (ax, key) in enumerate(zip(axes[:, 0], shown, strict=True)):
        points = thin(history[key])
        ax.plot([r for r, _ in points], [v for _, v in points], marker="." if len(points) < 50 else None)
        ax.set_ylabel(key, fontsize=9)
        ax.grid(alpha=0.3)
        _mark_phases(ax, phases, label=i == 0)
    axes[-1, 0].set_xlabel("round")
    return _png(fig)


def _columns(changes: Sequence[MaskChange], last_round: int) -> list[tuple[int, int, dict[str, int] | None]]:
    """Heatmap columns (first round, end round, kept entries; None: dense), at most `MAX_COLUMNS`."""
    starts: list[tuple[int, dict[str, int] | None]] = [(c.round_num, c.kept) for c in changes]
    if starts[0][0] > 0:
        starts.insert(0, (0, None))
    if len(starts) > MAX_COLUMNS:
        picked = np.unique(np.linspace(0, len(starts) - 1, MAX_COLUMNS).round().astype(int))
        starts = [starts[i] for i in picked]
    ends = [r for r, _ in starts[1:]] + [max(last_round, starts[-1][0]) + 1]
    return [(r, end, kept) for (r, kept), end in zip(starts, ends, strict=True)]


def layer_sparsity_png(changes: Sequence[MaskChange], entries: dict[str, int], last_round: int) -> bytes | None:
    """Each prunable parameter's sparsity (rows) over rounds (columns span a mask change to the next)."""
    if not changes or not entries:
        return None
    columns = _columns(changes, last_round)
    names = list(entries)
    sparsity = np.array([[0.0 if kept is None else 1.0 - kept.get(n, entries[n]) / entries[n] for _, _, kept in columns]
                         for n in names])
    edges = [first for first, _, _ in columns] + [columns[-1][1]]
    fig, ax = plt.subplots(figsize=(8, min(1.5 + 0.22 * len(names), 16)))
    mesh = ax.pcolormesh(edges, np.arange(len(names) + 1), sparsity, cmap="viridis", vmin=0.0, vmax=1.0)
    step = max(1, len(names) // 60)
    ax.set_yticks(np.arange(0, len(names), step) + 0.5, names[::step], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("round")
    ax.set_title("sparsity per prunable parameter (share of its entries pruned)", fontsize=9)
    fig.colorbar(mesh, ax=ax, label="sparsity")
    return _png(fig)


def _binned(changes: Sequence[MaskChange]) -> tuple[list[int], list[int], list[int]]:
    """Rounds, pruned and regrown per bar: one bar a change, or summed over `MAX_COLUMNS` round bins."""
    rounds = [c.round_num for c in changes]
    if len(changes) <= MAX_COLUMNS:
        return rounds, [c.pruned for c in changes], [c.regrown for c in changes]
    bins = np.linspace(rounds[0], rounds[-1] + 1, MAX_COLUMNS + 1)
    index = np.searchsorted(bins, rounds, side="right") - 1
    pruned, regrown = np.zeros(MAX_COLUMNS, dtype=np.int64), np.zeros(MAX_COLUMNS, dtype=np.int64)
    np.add.at(pruned, index, [c.pruned for c in changes])
    np.add.at(regrown, index, [c.regrown for c in changes])
    held = np.flatnonzero(pruned + regrown)
    return [int(bins[i]) for i in held], pruned[held].tolist(), regrown[held].tolist()


def mask_changes_png(changes: Sequence[MaskChange], phases: Sequence[Span]) -> bytes | None:
    """Weights pruned (down) and regrown (up) at each mask change."""
    if not changes:
        return None
    rounds, pruned, regrown = _binned(changes)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.vlines(rounds, 0, regrown, color="tab:green", linewidth=2, label=f"regrown ({sum(regrown):,} in all)")
    ax.vlines(rounds, 0, [-p for p in pruned], color="tab:red", linewidth=2, label=f"pruned ({sum(pruned):,} in all)")
    if len(rounds) <= 50:
        ax.plot(rounds, regrown, "g.", rounds, [-p for p in pruned], "r.")
    ax.axhline(0, color="black", linewidth=0.6)
    _mark_phases(ax, phases, label=True)
    ax.set_xlabel("round")
    ax.set_ylabel("weights")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _png(fig)


def mask_changes_csv(changes: Sequence[MaskChange], entries: dict[str, int]) -> str:
    """One line per mask change: round, pruned, regrown, kept and sparsity over all prunable entries."""
    total = sum(entries.values())
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["round", "pruned", "regrown", "kept", "sparsity"])
    for c in changes:
        kept = sum(c.kept.values())
        writer.writerow([c.round_num, c.pruned, c.regrown, kept, f"{1 - kept / total:.4f}" if total else "0.0000"])
    return out.getvalue()


def _cumulative(history: dict[str, Series], key: str) -> np.ndarray:
    return np.cumsum([v for _, v in history[key]])


def bytes_png(history: dict[str, Series], dense_client_bytes: int) -> bytes | None:
    """Cumulative bytes down and up against the same clients moving the dense model both ways."""
    if not all(history.get(k) for k in BYTES_KEYS):
        return None
    rounds = [r for r, _ in history["bytes_down"]]
    down, up = _cumulative(history, "bytes_down"), _cumulative(history, "bytes_up")
    dense = _cumulative(history, "clients_done") * dense_client_bytes
    fig, ax = plt.subplots(figsize=(7, 3.4))
    picked = [i for i, _ in thin(list(enumerate(rounds)))]
    for values, label, style in ((down, "down (this run)", "-"), (up, "up (this run)", "-"),
                                 (dense, "down or up, dense model", "--")):
        ax.plot([rounds[i] for i in picked], values[picked] / 2**20, style, label=label)
    share = (down[-1] + up[-1]) / (2 * dense[-1]) if dense[-1] else float("nan")
    ax.set_title(f"after round {rounds[-1]}: {(down[-1] + up[-1]) / 2**20:,.1f} MiB moved, {100 * share:.1f}% "
                 f"of dense ({2 * dense[-1] / 2**20:,.1f} MiB)", fontsize=9)
    ax.set_xlabel("round")
    ax.set_ylabel("MiB, cumulative")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


# ----------------------------------------------------------------------------- a run's plots in MLflow


def _history(tracker: Tracker, key: str, up_to: int) -> Series:
    by_round = {m.step: m.value for m in tracker.metric_history(key) if m.step <= up_to}
    return sorted(by_round.items())


def draw_plots(tracker: Tracker, run: Run, state: ServerState) -> dict[str, bytes]:
    """The run's plots (artifact path -> content) from what it logged up to `state.round_num`."""
    up_to = state.round_num
    history = {k: _history(tracker, k, up_to) for k in (*EVAL_KEYS, *TRAINING_KEYS, *BYTES_KEYS)}
    phases = [(name, first, min(last, up_to)) for name, first, last in strategy_phases(run.config) if first <= up_to]
    changes = load_mask_changes(run.storage, run.checkpoints.base, up_to)
    entries = {n: s.numel for n, s in run.strategy.specs.items()}
    # A dense client's payload is the weights themselves (`extract` without masks), down and up.
    drawn = {
        "plots/metrics.png": metrics_png(history, phases),
        "plots/layer_sparsity.png": layer_sparsity_png(changes, entries, up_to),
        "plots/mask_changes.png": mask_changes_png(changes, phases),
        "plots/mask_changes.csv": mask_changes_csv(changes, entries).encode() if changes else None,
        "plots/bytes.png": bytes_png(history, payload_nbytes(state.weights)),
    }
    return {path: content for path, content in drawn.items() if content is not None}


def log_plots(tracker: Tracker, run: Run, state: ServerState) -> None:
    """Draw the run's plots and store them as artifacts of `tracker`'s run (replacing older ones)."""
    for path, content in draw_plots(tracker, run, state).items():
        tracker.log_artifact_bytes(path, content)


@dataclass
class _Due:
    next_at: float = float("-inf")


class Throttle:
    """When a run's plots are due again during the run: at most every `every_s` seconds, and
    after a refresh that took t seconds not before t / `share` seconds (the first is due at once).

    Args:
        every_s: the shortest time between two refreshes of one run.
        share: the largest share of the run's time its refreshes take.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, every_s: float = PLOT_EVERY_S, share: float = PLOT_TIME_SHARE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if every_s < 0 or not 0 < share <= 1:
            raise ValueError(f"every_s={every_s} must be >= 0 and share={share} in (0, 1]: pass e.g. 300 and 0.02")
        self.every_s, self.share, self.clock = every_s, share, clock
        self._runs: dict[str, _Due] = {}
        self._lock = threading.Lock()

    def due(self, key: str) -> bool:
        """Whether run `key`'s plots are due now."""
        with self._lock:
            return self.clock() >= self._runs.setdefault(key, _Due()).next_at

    def drawn(self, key: str, started: float) -> None:
        """Run `key`'s plots were drawn from `started` (a `clock` time) until now."""
        now = self.clock()
        with self._lock:
            self._runs.setdefault(key, _Due()).next_at = now + max(self.every_s, (now - started) / self.share)
