"""What each change of the global masks did: entries kept per layer, pruned and regrown in all.

While sparsifying, Federated Pruning (Lin et al., Interspeech 2022, Sec. 2.1) only prunes; while
refining it re-ranks the masks over all coordinates, so an entry pruned earlier can be kept again
(regrown); PruneFL's reconfigurations (Jiang et al. 2022) both remove and add weights. A
`MaskChange` records one round whose masks keep other entries than the masks before it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fedprune_core.engine import layer_sparsity
from fedprune_core.prunable import PrunableSpec
from fedprune_core.types import MaskDict


@dataclass(frozen=True)
class MaskChange:
    """One round's change of the global masks.

    Attributes:
        round_num: the round whose masks changed (0: the masks the run starts with, e.g. after
            PruneFL's initial pruning).
        kept: per prunable parameter, the entries kept after the change.
        pruned: entries kept before the change and pruned by it, over all parameters.
        regrown: entries pruned before the change and kept after it, over all parameters.
    """

    round_num: int
    kept: dict[str, int]
    pruned: int
    regrown: int

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round_num, "kept": self.kept, "pruned": self.pruned, "regrown": self.regrown}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MaskChange:
        return cls(int(data["round"]), {k: int(v) for k, v in data["kept"].items()}, int(data["pruned"]),
                   int(data["regrown"]))


def _kept_entries(masks: MaskDict, name: str, spec: PrunableSpec) -> torch.Tensor:
    """The bool mask of `name`; every entry kept when it has none."""
    mask = masks.get(name)
    return torch.ones(spec.shape, dtype=torch.bool) if mask is None else mask.reshape(spec.shape)


def mask_change(round_num: int, before: MaskDict, after: MaskDict, specs: dict[str, PrunableSpec]) -> MaskChange | None:
    """The change from the masks `before` to the masks `after` (a parameter without a mask keeps
    every entry); None when both keep the same entries."""
    pruned = regrown = 0
    for name, spec in specs.items():
        if name not in before and name not in after:
            continue
        old, new = _kept_entries(before, name, spec), _kept_entries(after, name, spec)
        pruned += int((old & ~new).count_nonzero())
        regrown += int((~old & new).count_nonzero())
    if not pruned and not regrown:
        return None
    return MaskChange(round_num, {n: kept for n, _, _, kept in layer_sparsity(after, specs)}, pruned, regrown)


def mask_changes(
    before: MaskDict, rounds: Iterable[tuple[int, MaskDict]], specs: dict[str, PrunableSpec]
) -> list[MaskChange]:
    """The changes along rounds' masks (round order), starting from the masks `before`."""
    changes = []
    for round_num, masks in rounds:
        change = mask_change(round_num, before, masks, specs)
        if change is not None:
            changes.append(change)
        before = masks
    return changes
