"""Dense FedAvg (McMahan et al., AISTATS 2017): no masks; the reference for every other method."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from fedprune_core.config import ExperimentConfig
from fedprune_core.prunable import PrunableSpec
from fedprune_core.strategies.base import BaseStrategy


@dataclass(frozen=True)
class FedAvg(BaseStrategy):
    """Every client trains the whole model; the server averages weighted by example counts."""

    specs: dict[str, PrunableSpec] = field(default_factory=dict)

    @classmethod
    def build(cls, config: ExperimentConfig, model: nn.Module) -> FedAvg:
        """Nothing to set up: no parameter is pruned."""
        return cls()
