"""Federated Dropout (Caldas, Konečný, McMahan, Talwalkar; arXiv 1812.07210).

Every round, every sampled client trains its own random structured sub-model: in each prunable
layer a fixed fraction of units is dropped, drawn per (experiment seed, round, client, layer).
The server maps the updates back into the full model, and each coordinate is averaged over the
clients that held it (`fedprune_core.aggregate.masked_fedavg`). Per-layer rates follow Guliani
et al. (ICASSP 2022, arXiv 2110.03634), who tune them per layer for speech models.

A unit is an output row of a weight: for an `nn.Linear` weight of shape (out, in), dropping unit
j removes row j, so the client trains a physically smaller (out - k, in) block (`SlicedLinear`);
for a convolution of shape (out, in, kh, kw) it removes filter j (trained as a masked dense
tensor). Biases and other 1-D parameters stay dense, and the next layer keeps its input column
j: see docs/baselines.md for how this differs from the paper. The global model has no masks.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedprune_core.config import ExperimentConfig
from fedprune_core.engine import ServerState, Workload
from fedprune_core.masks import expand_groups, num_pruned
from fedprune_core.prunable import PrunableSpec, find_prunable, from_matrices
from fedprune_core.rng import generator_for
from fedprune_core.types import MaskDict, StateDict

PATTERN = "row"
"""Units are output rows (the Linear's neurons, a convolution's filters)."""


def drop_rows(rows: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Bool keep-vector over `rows` units with exactly `num_pruned(rows, rate)` of them dropped.

    Args:
        rows: number of units.
        rate: fraction of units to drop, in [0, 1).
        generator: the only source of randomness.

    Returns:
        (rows,) bool, True = kept.
    """
    keep = torch.ones(rows, dtype=torch.bool)
    keep[torch.randperm(rows, generator=generator)[: num_pruned(rows, rate)]] = False
    return keep


def dropout_mask(spec: PrunableSpec, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Full-shape mask of one parameter with `rate` of the rows of each stacked matrix dropped.

    Args:
        spec: the parameter; a fused q/k/v projection drops rows of each of its 3 matrices.
        rate: fraction of rows dropped, in [0, 1).
        generator: the only source of randomness.

    Returns:
        bool tensor of `spec.shape`, True = kept.
    """
    rows, cols = spec.matrix_shape
    parts = [expand_groups(drop_rows(rows, rate, generator), PATTERN, (rows, cols))
             for _ in range(spec.splits)]
    return from_matrices(parts, spec)


def _check_layer_rates(config: ExperimentConfig, specs: dict[str, PrunableSpec]) -> None:
    for glob, _ in config.fed_dropout.layer_rates:
        if not any(fnmatch.fnmatchcase(name, glob) for name in specs):
            raise ValueError(
                f"fed_dropout.layer_rates glob {glob!r} matches no prunable parameter: use globs over "
                f"the parameters selected by pruning.prunable, such as {', '.join(list(specs)[:5])}"
            )


@dataclass(frozen=True)
class FedDropout:
    """The Federated Dropout strategy.

    Attributes:
        specs: the parameters whose units are dropped (those with a rate > 0), pattern "row".
        rates: the dropout rate of each parameter in `specs`.
        seed: the experiment seed the per-client draws derive from.
        rescale_kept: clients train as inverted dropout (kept units' outputs scaled by rows / kept
            rows, `fed_dropout.rescale`).
    """

    specs: dict[str, PrunableSpec]
    rates: dict[str, float]
    seed: int
    rescale_kept: bool = True
    track_grad_sq: bool = False

    @classmethod
    def build(cls, config: ExperimentConfig, model: nn.Module) -> FedDropout:
        """Select `config.pruning.prunable` parameters of `model`; a layer with rate 0 stays dense.

        Raises:
            ValueError: a `fed_dropout.layer_rates` glob matches no prunable parameter.
        """
        found = find_prunable(model, config.pruning.prunable, PATTERN)
        _check_layer_rates(config, found)
        rates = {n: config.fed_dropout.rate_for(n) for n in found}
        specs = {n: s for n, s in found.items() if rates[n] > 0}
        return cls(specs, {n: rates[n] for n in specs}, config.seed, config.fed_dropout.rescale)

    def initialize(
        self, state: ServerState, workload: Workload, client_data: Sequence[Sequence[Any]]
    ) -> ServerState:
        return state

    def keeps_masks(self, round_num: int) -> bool:
        """No scores, no global masks, ever (each client's sub-model is drawn in `client_masks`)."""
        return True

    def score(self, state: ServerState, round_num: int) -> StateDict:
        return {}

    def mask(self, state: ServerState, scores: StateDict, round_num: int) -> MaskDict:
        """No global masks: the server keeps and evaluates the full model."""
        return {}

    def client_masks(self, state: ServerState, masks: MaskDict, round_num: int, client_id: int) -> MaskDict:
        """The random sub-model of `client_id` in `round_num`.

        Each layer draws from its own generator seeded from (seed, round, client, layer name), so
        a layer's draw does not depend on which other layers are dropped or in which order.
        """
        return {
            name: dropout_mask(spec, self.rates[name], generator_for(self.seed, round_num, client_id,
                                                                     f"fed_dropout:{name}"))
            for name, spec in self.specs.items()
        }

    def observe(
        self,
        state: ServerState,
        masks: MaskDict,
        grads: StateDict,
        trained: MaskDict,
        grad_sq: StateDict | None,
    ) -> StateDict:
        return {}
