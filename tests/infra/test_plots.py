"""The run's plots: thinning, the heatmap's columns, the mask-change records and table, the throttle."""

from __future__ import annotations

import pytest

from fedprune_core.mask_history import MaskChange
from infra.plots import (
    MAX_COLUMNS,
    Throttle,
    _binned,
    _columns,
    bytes_png,
    layer_sparsity_png,
    load_mask_changes,
    mask_changes_csv,
    mask_changes_png,
    metrics_png,
    save_mask_changes,
    thin,
)
from infra.storage import Storage

PNG = b"\x89PNG\r\n\x1a\n"


def change(round_num: int, a: int, b: int, pruned: int = 1, regrown: int = 0) -> MaskChange:
    return MaskChange(round_num, {"a": a, "b": b}, pruned, regrown)


def test_thin_keeps_short_series_and_spreads_long_ones_keeping_both_ends() -> None:
    short = [(r, float(r)) for r in range(1, 11)]
    assert thin(short, 10) == short
    long = [(r, float(r)) for r in range(1, 30_001)]
    thinned = thin(long, 2000)
    assert len(thinned) == 2000 and thinned[0] == (1, 1.0) and thinned[-1] == (30_000, 30_000.0)
    assert [r for r, _ in thinned] == sorted({r for r, _ in thinned})


def test_heatmap_columns_start_dense_and_span_each_change_to_the_next() -> None:
    changes = [change(2, 6, 4), change(5, 3, 4)]
    assert _columns(changes, last_round=8) == [(0, 2, None), (2, 5, {"a": 6, "b": 4}), (5, 9, {"a": 3, "b": 4})]
    assert _columns([change(0, 1, 1)], last_round=0) == [(0, 1, {"a": 1, "b": 1})]  # PruneFL's initial masks


def test_heatmap_columns_of_a_long_run_are_bounded_and_still_tile_the_rounds() -> None:
    changes = [change(r, r % 7, 4) for r in range(50, 30_001, 50)]  # PruneFL: one change every 50 rounds
    columns = _columns(changes, last_round=30_000)
    assert len(columns) <= MAX_COLUMNS
    assert columns[0][0] == 0 and columns[-1][1] == 30_001
    assert all(end == start for (_, end, _), (start, _, _) in zip(columns, columns[1:], strict=False))


def test_many_mask_changes_are_summed_into_bounded_bars() -> None:
    changes = [change(r, 1, 1, pruned=2, regrown=1) for r in range(1, 3001)]
    rounds, pruned, regrown = _binned(changes)
    assert len(rounds) <= MAX_COLUMNS and sum(pruned) == 6000 and sum(regrown) == 3000
    few = [change(3, 1, 1, 5, 0), change(9, 1, 1, 2, 2)]
    assert _binned(few) == ([3, 9], [5, 2], [0, 2])


def test_mask_change_table_by_hand() -> None:
    changes = [change(1, 6, 4, pruned=6, regrown=0), change(3, 4, 4, pruned=3, regrown=1)]
    assert mask_changes_csv(changes, {"a": 12, "b": 4}) == (
        "round,pruned,regrown,kept,sparsity\n1,6,0,10,0.3750\n3,3,1,8,0.5000\n")


def test_records_written_again_after_a_resume_hold_each_round_once(storage: Storage) -> None:
    save_mask_changes(storage, "exp/run", 4, [change(1, 6, 4), change(3, 5, 4)])
    save_mask_changes(storage, "exp/run", 8, [change(6, 4, 4)])  # a crashed try, not committed
    save_mask_changes(storage, "exp/run", 6, [change(6, 4, 4)])  # the resumed run's checkpoint
    assert [c.round_num for c in load_mask_changes(storage, "exp/run", up_to=8)] == [1, 3, 6]
    assert [c.round_num for c in load_mask_changes(storage, "exp/run", up_to=5)] == [1, 3]
    assert load_mask_changes(storage, "exp/other", up_to=8) == []


def test_each_plot_draws_a_png_and_none_without_data() -> None:
    history = {"eval_wer": [(4, 0.9), (8, 0.6)], "train_loss": [(r, 5.0 - r / 4) for r in range(1, 9)],
               "bytes_down": [(r, 100.0) for r in range(1, 9)], "bytes_up": [(r, 90.0) for r in range(1, 9)],
               "clients_done": [(r, 2.0) for r in range(1, 9)]}
    phases = [("sparsify", 1, 3), ("refine", 4, 6), ("finetune", 7, 8)]
    changes = [change(1, 6, 4), change(4, 5, 4, 2, 1)]
    for drawn in (metrics_png(history, phases), layer_sparsity_png(changes, {"a": 12, "b": 4}, 8),
                  mask_changes_png(changes, phases), bytes_png(history, dense_client_bytes=120)):
        assert drawn is not None and drawn.startswith(PNG)
    assert metrics_png({}, phases) is None
    assert layer_sparsity_png([], {"a": 12}, 8) is None and layer_sparsity_png(changes, {}, 8) is None
    assert mask_changes_png([], phases) is None
    assert bytes_png({"bytes_down": history["bytes_down"]}, 120) is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_waits_the_interval_or_longer_after_a_slow_refresh() -> None:
    clock = Clock()
    throttle = Throttle(every_s=300, share=0.02, clock=clock)
    assert throttle.due("run")  # the first checkpoint of a process draws
    clock.now += 1.0
    throttle.drawn("run", started=clock.now - 1.0)  # took 1 s: next in max(300, 1 / 0.02 = 50) s
    clock.now += 299
    assert not throttle.due("run") and throttle.due("other-run")
    clock.now += 1
    assert throttle.due("run")
    throttle.drawn("run", started=clock.now - 10.0)  # took 10 s: next in 10 / 0.02 = 500 s
    clock.now += 499
    assert not throttle.due("run")
    clock.now += 1
    assert throttle.due("run")


def test_throttle_names_bad_settings() -> None:
    with pytest.raises(ValueError, match=r"share=0 in \(0, 1\]"):
        Throttle(share=0)
