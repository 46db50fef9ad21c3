"""Dense FedAvg (McMahan et al., AISTATS 2017): no masks; the reference for every other method."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fedprune_core.config import ExperimentConfig
from fedprune_core.engine import ServerState, Workload
from fedprune_core.prunable import PrunableSpec
from fedprune_core.types import MaskDict, StateDict


@dataclass(frozen=True)
class FedAvg:
    """Every client trains the whole model; the server averages weighted by example counts."""

    specs: dict[str, PrunableSpec] = field(default_factory=dict)
    track_grad_sq: bool = False
    rescale_kept: bool = False

    @classmethod
    def build(cls, config: ExperimentConfig, model: nn.Module) -> FedAvg:
        return cls()

    def initialize(self, state: ServerState, workload: Workload, client_data: Sequence[Sequence[Any]]) -> ServerState:
        return state

    def keeps_masks(self, round_num: int) -> bool:
        return True

    def score(self, state: ServerState, round_num: int) -> StateDict:
        return {}

    def mask(self, state: ServerState, scores: StateDict, round_num: int) -> MaskDict:
        return {}

    def client_masks(self, state: ServerState, masks: MaskDict, round_num: int, client_id: int) -> MaskDict:
        return {}

    def observe(
        self, state: ServerState, masks: MaskDict, grads: StateDict, trained: MaskDict, grad_sq: StateDict | None
    ) -> StateDict:
        return {}
