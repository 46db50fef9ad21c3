"""Mask changes by hand: what a change pruned and regrew, per layer kept entries, and no change at all."""

from __future__ import annotations

import torch

from fedprune_core.mask_history import MaskChange, mask_change, mask_changes
from fedprune_core.prunable import PrunableSpec

SPECS = {"a": PrunableSpec("a", (2, 3), 1, True, "column"), "b": PrunableSpec("b", (4,), 1, False, "unstructured")}


def masks(a: list[list[int]], b: list[int] | None = None) -> dict[str, torch.Tensor]:
    out = {"a": torch.tensor(a, dtype=torch.bool)}
    if b is not None:
        out["b"] = torch.tensor(b, dtype=torch.bool)
    return out


def test_a_change_counts_pruned_and_regrown_entries_and_the_kept_ones_per_layer() -> None:
    before = masks([[1, 1, 0], [1, 1, 0]], [1, 0, 1, 1])
    after = masks([[1, 0, 1], [1, 0, 1]], [0, 0, 1, 1])
    # a: column 1 pruned (2 entries), column 2 regrown (2); b: entry 0 pruned
    assert mask_change(5, before, after, SPECS) == MaskChange(5, {"a": 4, "b": 2}, pruned=3, regrown=2)


def test_a_parameter_without_a_mask_keeps_every_entry() -> None:
    change = mask_change(1, {}, masks([[1, 1, 0], [1, 1, 0]]), SPECS)
    assert change == MaskChange(1, {"a": 4, "b": 4}, pruned=2, regrown=0)
    assert mask_change(1, masks([[1, 1, 0], [1, 1, 0]]), {}, SPECS) == MaskChange(1, {"a": 6, "b": 4}, 0, 2)


def test_masks_that_keep_the_same_entries_are_no_change() -> None:
    same = masks([[1, 0, 1], [1, 0, 1]], [1, 1, 1, 1])
    assert mask_change(3, same, masks([[1, 0, 1], [1, 0, 1]]), SPECS) is None  # b: all kept either way
    assert mask_change(3, {}, {}, SPECS) is None


def test_a_sequence_of_rounds_records_only_the_rounds_that_changed() -> None:
    first, second = masks([[1, 1, 0], [1, 1, 0]]), masks([[0, 1, 1], [0, 1, 1]])
    changes = mask_changes({}, [(1, first), (2, first), (3, second)], SPECS)
    assert [(c.round_num, c.pruned, c.regrown) for c in changes] == [(1, 2, 0), (3, 2, 2)]
    assert MaskChange.from_json(changes[1].to_json()) == changes[1]
