"""Federated Pruning (Lin et al., Interspeech 2022, arXiv 2209.06359).

The server scores every prunable entry, allocates per-layer sparsity (uniform or adaptive) at the
schedule's current target, and builds masks of the configured pattern: nested while
sparsifying, re-ranked over all coordinates while refining, frozen while fine-tuning. All
sampled clients train the same pruned model. With a squared-gradient score source
(`fedprune_core.scores.GRAD_SQ_SOURCES`) the clients also accumulate and upload their squared
gradients of the entries they held.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from fedprune_core import allocation
from fedprune_core.config import ExperimentConfig, PruningConfig
from fedprune_core.engine import ServerState
from fedprune_core.masks import make_mask
from fedprune_core.prunable import PrunableSpec, find_prunable, from_matrices, matrices
from fedprune_core.schedule import ScheduleConfig, masks_change_at, phase_at, sparsity_at
from fedprune_core.scores import GRAD_SQ_SOURCES, update_scores
from fedprune_core.strategies.base import BaseStrategy
from fedprune_core.types import MaskDict, StateDict

SCORE_MOMENTUM = 0.9
"""β of the momentum of pseudo-gradients kept for the `momentum` score source."""
GRAD_SQ = "grad_sq/"
"""Prefix of the `extra` tensors holding last round's squared gradients, averaged over the clients."""


@dataclass(frozen=True)
class FedPrune(BaseStrategy):
    """The Federated Pruning strategy.

    Attributes:
        specs: the prunable parameters.
        pruning, schedule: the configuration.
        track_grad_sq: clients accumulate squared gradients: the score source reads them (derived).
    """

    config_keys: ClassVar[tuple[str, ...]] = ("pruning", "schedule")
    specs: dict[str, PrunableSpec]
    pruning: PruningConfig
    schedule: ScheduleConfig
    track_grad_sq: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "track_grad_sq", self.pruning.score_source in GRAD_SQ_SOURCES)

    @classmethod
    def build(cls, config: ExperimentConfig, model: nn.Module) -> FedPrune:
        p = config.pruning
        return cls(find_prunable(model, p.prunable, p.pattern, p.include_1d), p, config.schedule)

    @property
    def _needs_gradient(self) -> bool:
        return self.pruning.score_source != "weight"

    def _warmup_done(self, round_num: int) -> bool:
        # Gradient-based scores have no evidence before the first aggregation: round 1 trains dense
        # and round 2 makes the first masks, whatever its phase.
        return self._needs_gradient and round_num == 2

    def _frozen(self, round_num: int) -> bool:
        return phase_at(round_num, self.schedule) == "finetune" and not self._warmup_done(round_num)

    def keeps_masks(self, round_num: int) -> bool:
        """Fine-tune rounds: scores and masks frozen (round 1, a sparsify round, made the first ones)."""
        return round_num > 1 and self._frozen(round_num)

    def score(self, state: ServerState, round_num: int) -> StateDict:
        """Scores of all prunable entries; unchanged once masks are frozen."""
        if self._frozen(round_num) and state.scores:
            return state.scores
        p, scores = self.pruning, {}
        for name in self.specs:
            w = state.weights[name]
            # broadcast views stand in for missing tensors: no full-size allocation
            zero = w.new_zeros(()).expand(w.shape)
            grad, momentum = state.extra.get(f"grad/{name}", zero), state.extra.get(f"momentum/{name}", zero)
            trained = state.masks.get(name)
            scores[name] = update_scores(
                state.scores.get(name), p.score_source, p.score_norm, w, grad, momentum,
                torch.ones((), dtype=torch.bool).expand(w.shape) if trained is None else trained,
                state.extra.get(GRAD_SQ + name, zero),
            )
        return scores

    def _target(self, round_num: int) -> float:
        if self._needs_gradient and round_num == 1:
            return 0.0
        return sparsity_at(round_num, self.schedule, self.pruning.sparsity)

    def mask(self, state: ServerState, scores: StateDict, round_num: int) -> MaskDict:
        """Masks for `round_num`: recomputed when the schedule says so, else the ones in force."""
        scheduled = masks_change_at(round_num, self.schedule, self.pruning.sparsity)
        if state.masks and not (scheduled or self._warmup_done(round_num)):
            return state.masks
        target = self._target(round_num)
        layer = self._allocate(scores, target)
        nested = phase_at(round_num, self.schedule) == "sparsify"
        return {n: self._layer_mask(scores[n], state.masks.get(n), layer[n], n, nested) for n in self.specs}

    def _allocate(self, scores: StateDict, target: float) -> dict[str, float]:
        p = self.pruning
        if p.allocation == "uniform" or target == 0.0:
            return allocation.uniform(self.specs, target)
        lo, hi = min(p.min_layer_sparsity, target), max(p.max_layer_sparsity, target)
        return allocation.adaptive(scores, self.specs, target, lo, hi)

    def _layer_mask(
        self, scores: torch.Tensor, current: torch.Tensor | None, sparsity: float, name: str, nested: bool
    ) -> torch.Tensor:
        spec = self.specs[name]
        cur = [None] * spec.splits if current is None else matrices(current, spec)
        parts = [
            make_mask(s, sparsity, spec.pattern, favored=c, allowed=c if nested else None, taps=spec.taps)
            for s, c in zip(matrices(scores, spec), cur, strict=True)
        ]
        return parts[0].reshape(spec.shape) if spec.splits == 1 else from_matrices(parts, spec)

    def observe(
        self, state: ServerState, masks: MaskDict, grads: StateDict, trained: MaskDict, grad_sq: StateDict | None
    ) -> StateDict:
        """Keep what the score source reads: the clients' squared gradients, or the pseudo-gradient
        and its momentum."""
        if not self._needs_gradient:
            return {}
        if self.track_grad_sq:
            assert grad_sq is not None, "clients of a squared-gradient score source upload grad_sq"
            return {GRAD_SQ + name: grad_sq[name] for name in self.specs}
        extra: StateDict = {}
        for name in self.specs:
            extra[f"grad/{name}"] = grads[name]
            prev = state.extra.get(f"momentum/{name}", torch.zeros_like(grads[name]))
            extra[f"momentum/{name}"] = SCORE_MOMENTUM * prev + grads[name]
        return extra
