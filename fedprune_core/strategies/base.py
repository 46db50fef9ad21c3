"""The shared defaults of every strategy: dense FedAvg's behaviour (McMahan et al., AISTATS 2017).

A strategy is a frozen dataclass that subclasses `BaseStrategy`, declares its own fields (at least
`specs`, the parameters it prunes or slices) and overrides only the members of
`fedprune_core.engine.Strategy` it changes, as Flower's `FedMedian(FedAvg)` overrides one method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from fedprune_core.engine import ServerState, Workload
from fedprune_core.prunable import PrunableSpec
from fedprune_core.types import MaskDict, StateDict
from fedprune_core.units import UnitGroup


class BaseStrategy:
    """Dense FedAvg: no setup, no scores, no masks, every client trains the global model whole.

    Attributes:
        config_keys: the strategy's own configuration: the sections (``"pruning"``) or keys
            (``"pruning.prunable"``) of `fedprune_core.config.ExperimentConfig` it reads besides
            the ones every strategy reads (`fedprune_core.strategies.applicable_config`). None here.
        specs: the parameters the strategy prunes or slices (each strategy's own dataclass field).
        groups: the unit groups whose units a client may not hold (none: what a client trains, it
            holds whole or by its masks).
        track_grad_sq: whether clients accumulate and upload squared gradients (no).
        dense_grad_sq: whether those squared gradients cover pruned entries too and the server sums
            them over clients (PruneFL); else they cover the entries a client held and the server
            averages them like the weights (`fedprune_core.engine.aggregate`).
        rescale_kept: whether clients train their sub-model as inverted dropout (no).
    """

    config_keys: ClassVar[tuple[str, ...]] = ()
    specs: dict[str, PrunableSpec]
    groups: tuple[UnitGroup, ...] = ()
    track_grad_sq: bool = False
    dense_grad_sq: ClassVar[bool] = False
    rescale_kept: bool = False

    def initialize(self, state: ServerState, workload: Workload, client_data: Sequence[Sequence[Any]]) -> ServerState:
        """Nothing to do before round 1."""
        return state

    def keeps_masks(self, round_num: int) -> bool:
        """Never scores or masks: the flow skips those steps."""
        return True

    def score(self, state: ServerState, round_num: int) -> StateDict:
        """No scores."""
        return {}

    def mask(self, state: ServerState, scores: StateDict, round_num: int) -> MaskDict:
        """No global masks: the server keeps and evaluates the full model."""
        return {}

    def client_masks(self, state: ServerState, masks: MaskDict, round_num: int, client_id: int) -> MaskDict:
        """Every client trains the global masks (none: the whole model)."""
        return masks

    def observe(
        self, state: ServerState, masks: MaskDict, grads: StateDict, trained: MaskDict, grad_sq: StateDict | None
    ) -> StateDict:
        """No strategy state carried between rounds."""
        return {}

    def metrics(self, state: ServerState) -> dict[str, float]:
        """No metrics of the strategy's own."""
        return {}
