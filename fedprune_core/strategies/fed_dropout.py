"""Federated Dropout (Caldas, Konečný, McMahan, Talwalkar; arXiv 1812.07210).

Every round, every sampled client trains its own random structured sub-model: in each prunable
layer a fixed fraction of units is dropped, drawn per (experiment seed, round, client, layer).
The server maps the updates back into the full model, and each coordinate is averaged over the
clients that held it (`fedprune_core.aggregate.masked_fedavg`). Per-layer rates follow Guliani
et al. (ICASSP 2022, arXiv 2110.03634), who tune them per layer for speech models.

What a unit is (`fed_dropout.units`):

- "rows": an output row of every prunable weight, each weight drawn alone. For an `nn.Linear`
  weight of shape (out, in), dropping unit j removes row j, so the client trains a physically
  smaller (out - k, in) block (`SlicedLinear`); for a convolution of shape (out, in, kh, kw) it
  removes filter j (trained as a masked dense tensor). Biases and other 1-D parameters stay dense,
  and the next layer keeps its input column j.
- "hidden": a hidden unit of the model's unit groups (`fedprune_core.units`: a feed-forward
  module's hidden units, a convolution module's channels, the joint network's dimensions, an
  attention's heads), as Caldas et al. drop a neuron: its producer rows and its reader's input
  column go together, and the client trains the narrower module (the per-unit depthwise
  convolution and batch norm on the kept channels, the attention on the kept heads). A head is
  head_dim units dropped together: its q, k and v rows and the out projection's columns. The
  unit's other entries (biases, per-unit layers, `UnitGroup.entries`) are averaged over the
  clients that held the unit, as its weights are. The residual stream and every layer outside a
  group stay dense.

Batch norms (`fed_dropout.batch_norm`): by default they normalize by each batch's statistics,
in training and at evaluation, and the server holds no running statistics (`initialize` drops
them, and `fedprune_core.engine.evaluate` then normalizes by the batch): a sub-model's batch-norm
inputs differ in scale from the full model's, so statistics gathered by clients do not fit the
model the server evaluates, and the server holds no data to gather its own.

See docs/baselines.md for how each differs from the paper. The global model has no masks.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from fedprune_core.config import ExperimentConfig
from fedprune_core.engine import ServerState, Workload
from fedprune_core.masks import expand_groups, num_pruned
from fedprune_core.prunable import PrunableSpec, find_prunable, from_matrices
from fedprune_core.rng import generator_for
from fedprune_core.strategies.base import BaseStrategy
from fedprune_core.submodel import extract, float_entries
from fedprune_core.training import is_running_stat
from fedprune_core.types import MaskDict
from fedprune_core.units import UnitGroup, find_head_groups, find_unit_groups

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


def drop_units(group: UnitGroup, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Bool keep-vector over a group's `width` units with `num_pruned(width // span, rate)` spans
    (attention heads; single units where span is 1) dropped whole.

    Returns:
        (width,) bool, True = kept.
    """
    return drop_rows(group.width // group.span, rate, generator).repeat_interleave(group.span)


def unit_masks(group: UnitGroup, specs: dict[str, PrunableSpec], keep: torch.Tensor) -> MaskDict:
    """Full-shape masks of a unit group with the units `keep` marks: the reader's input columns and
    each producer's output rows (row r is unit r % width, across stacked q/k/v matrices too)."""
    reader = specs[group.reader]
    masks = {group.reader: from_matrices([expand_groups(keep, "column", reader.matrix_shape)], reader)}
    for name in group.producers:
        spec = specs[name]
        kept_rows = keep.repeat(spec.shape[0] // group.width)
        masks[name] = expand_groups(kept_rows, PATTERN, (spec.shape[0], spec.matrix_shape[1])).reshape(spec.shape)
    return masks


def _check_layer_rates(config: ExperimentConfig, names: Sequence[str], what: str) -> None:
    for glob, _ in config.fed_dropout.layer_rates:
        if not any(fnmatch.fnmatchcase(name, glob) for name in names):
            raise ValueError(
                f"fed_dropout.layer_rates glob {glob!r} matches no {what}: use globs over them, such as "
                f"{', '.join(list(names)[:5])}"
            )


@dataclass(frozen=True)
class FedDropout(BaseStrategy):
    """The Federated Dropout strategy: no scores and no global masks, ever (the server keeps and
    evaluates the full model); each client's sub-model is drawn in `client_masks`.

    Attributes:
        specs: the parameters whose units are dropped (those with a rate > 0): pattern "row"; with
            hidden units, a group's reader has pattern "column" and its producers feed it.
        rates: the dropout rate of each parameter in `specs` (hidden units: of each group's reader).
        seed: the experiment seed the per-client draws derive from.
        rescale_kept: clients train as inverted dropout (kept units' outputs scaled by units / kept
            units, `fed_dropout.rescale`).
        groups: with hidden units (`fed_dropout.units`), the unit groups whose units are dropped.
        batch_statistics: batch norms normalize by each batch's statistics, also at evaluation; the
            server holds no running statistics (`fed_dropout.batch_norm` "batch").
    """

    config_keys: ClassVar[tuple[str, ...]] = ("pruning.prunable", "fed_dropout")
    specs: dict[str, PrunableSpec]
    rates: dict[str, float]
    seed: int
    rescale_kept: bool = True
    groups: tuple[UnitGroup, ...] = ()
    batch_statistics: bool = True

    @classmethod
    def build(cls, config: ExperimentConfig, model: nn.Module) -> FedDropout:
        """Select `config.pruning.prunable` parameters of `model`; a layer with rate 0 stays dense.

        Raises:
            ValueError: a `fed_dropout.layer_rates` glob matches no prunable parameter (hidden
                units: no group's reader), or hidden units and no unit group among them.
        """
        found = find_prunable(model, config.pruning.prunable, PATTERN)
        rate_for, rescale = config.fed_dropout.rate_for, config.fed_dropout.rescale
        batch = config.fed_dropout.batch_norm == "batch"
        if config.fed_dropout.units == "rows":
            _check_layer_rates(config, list(found), "prunable parameter (pruning.prunable)")
            rates = {n: rate_for(n) for n in found}
            specs = {n: s for n, s in found.items() if rates[n] > 0}
            return cls(specs, {n: rates[n] for n in specs}, config.seed, rescale, batch_statistics=batch)
        every = find_unit_groups(model, found) + find_head_groups(model, found)
        if not every:
            raise ValueError(
                "fed_dropout.units='hidden' found no unit group (feed-forward hidden units, convolution "
                "channels, joint dimensions, attention heads) among the parameters of pruning.prunable: select "
                "their Linear, pointwise convolution and attention projection weights (e.g. '*weight'), or use "
                "fed_dropout.units='rows'"
            )
        _check_layer_rates(config, [g.reader for g in every], "unit group's reader (fed_dropout.units='hidden')")
        groups = tuple(g for g in every if rate_for(g.reader) > 0)
        specs = {}
        for g in groups:
            specs[g.reader] = replace(found[g.reader], pattern="column")
            specs.update({n: replace(found[n], feeds=g.reader) for n in g.producers})
        return cls(specs, {g.reader: rate_for(g.reader) for g in groups}, config.seed, rescale, groups, batch)

    def initialize(self, state: ServerState, workload: Workload, client_data: Sequence[Sequence[Any]]) -> ServerState:
        """With batch statistics, the state without running statistics: clients are sent none and
        upload none, and the server's model normalizes by the batch (`fedprune_core.engine.evaluate`)."""
        if not self.batch_statistics:
            return state
        return replace(state, weights={n: w for n, w in state.weights.items() if not is_running_stat(n)})

    def client_masks(self, state: ServerState, masks: MaskDict, round_num: int, client_id: int) -> MaskDict:
        """The random sub-model of `client_id` in `round_num`.

        Each layer (hidden units: each group) draws from its own generator seeded from (seed, round,
        client, layer name), so a draw does not depend on which others are dropped or in which order.
        """
        if self.groups:
            drawn: MaskDict = {}
            for g in self.groups:
                generator = generator_for(self.seed, round_num, client_id, f"fed_dropout:{g.reader}")
                drawn.update(unit_masks(g, self.specs, drop_units(g, self.rates[g.reader], generator)))
            return drawn
        return {
            name: dropout_mask(spec, self.rates[name], generator_for(self.seed, round_num, client_id,
                                                                     f"fed_dropout:{name}"))
            for name, spec in self.specs.items()
        }


def client_share(config: ExperimentConfig, model: nn.Module, rate: float) -> float:
    """The share of the dense model's parameters a Federated Dropout client downloads at `rate`.

    Float entries of a client's payload over the dense payload's, parameters only (running
    statistics left out of both). `rate` replaces `fed_dropout.rate`; `layer_rates`, `units` and
    `pruning.prunable` are `config`'s. The share is that of every client in every round: each layer
    (hidden units: each group) drops exactly `num_pruned(units, rate)` units.

    Args:
        config: the experiment (strategy settings from `fed_dropout` and `pruning.prunable`).
        model: the model, e.g. the workload's `build_model()`; its values do not matter.
        rate: the dropout rate, in [0, 1).
    """
    fed_dropout = dataclasses.replace(config.fed_dropout, rate=rate)
    strategy = FedDropout.build(dataclasses.replace(config, fed_dropout=fed_dropout), model)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    masks = strategy.client_masks(ServerState(0, weights), {}, 1, 0)
    return float_entries(extract(weights, masks, strategy.specs)) / float_entries(extract(weights, {}, {}))


def rate_for_share(config: ExperimentConfig, model: nn.Module, share: float, steps: int = 16) -> float:
    """The smallest rate (to 2**-steps) at which a client downloads at most `share` of the dense
    parameters (`client_share`), e.g. to meet a download budget.

    Raises:
        ValueError: no rate below 1 gets there (with hidden units, layers outside the unit groups
            stay whole), naming the smallest share there is.
    """
    lo, hi = 0.0, 1.0 - 2.0**-steps
    least = client_share(config, model, hi)
    if least > share:
        raise ValueError(
            f"share={share} is below what a fed_dropout client with units={config.fed_dropout.units!r} can download "
            f"({least:.4f} of dense at rate {hi}): raise the share, or drop more layers (pruning.prunable, "
            "units='rows')"
        )
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if client_share(config, model, mid) > share else (lo, mid)
    return hi
