"""PruneFL (Jiang, Wang, Valls, Ko, Lee, Leung, Tassiulas; IEEE TNNLS 2022, arXiv 1909.12326).

Two stages. Initial pruning: before federated training, the server trains the full model on a
small sample of one selected client's data and reconfigures the mask after every chunk of SGD
steps, until the density settles. Adaptive pruning: during federated training the clients
accumulate squared gradients, and every ΔR rounds the server reconfigures the (unstructured)
mask to maximise

    retained importance / modelled round time
    = (Σ_kept g² + importance of the parameters never pruned) / (T0 + Σ_layers kept_l · c_l),

with c_l = compute_l + comm_l seconds per kept weight of layer l. With `time_model: measured` (the
paper's) T0 and the c_l come from a training step timed on the client's workload before initial
pruning (`fedprune_core.step_profile`); they are stored in the server state's `extra` (`TIME_COST`,
`TIME_CONSTANT`), so every later round, and a resumed run, uses the same numbers. A reconfiguration
(`reconfigure`) keeps the active weights except the lowest-|w| `removal_fraction` of each layer
(the removal candidates, a fraction that halves every `removal_halflife` rounds), then adds
candidates (removal candidates and every pruned weight) in decreasing g²/c order while adding
one raises the objective; so a pruned weight can regrow.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from fedprune_core.config import ExperimentConfig, PruneFLConfig
from fedprune_core.engine import ServerState, Workload
from fedprune_core.prunable import PrunableSpec, find_prunable
from fedprune_core.rng import derive_seed, generator_for
from fedprune_core.step_profile import StepProfile, profile_step
from fedprune_core.strategies.base import BaseStrategy
from fedprune_core.submodel import build_client_model, client_update, expand, extract
from fedprune_core.training import LocalTrainingConfig
from fedprune_core.types import MaskDict, StateDict

PATTERN = "unstructured"
GSQ = "gsq/"
"""Prefix of the `extra` tensors holding each prunable parameter's accumulated squared gradients."""
GSQ_FIXED = "gsq_fixed"
"""`extra` key of the accumulated squared gradients of the parameters never pruned, summed, shape (1,)."""
TIME_COST = "time_cost/"
"""Prefix of the `extra` tensors holding each prunable parameter's measured seconds per kept weight, float64 (1,)."""
TIME_CONSTANT = "time_constant"
"""`extra` key of the measured fixed part T0 of the round time, seconds, float64 (1,)."""


def removal_fraction_at(round_num: int, removal_fraction: float, halflife: float) -> float:
    """Share of each layer's active weights that are removal candidates in `round_num`.

    `removal_fraction · 0.5 ** (round_num / halflife)`: the set of candidates shrinks over time.
    """
    return removal_fraction * 0.5 ** (round_num / halflife)


def removal_candidates(weights: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """The `int(fraction · active)` active entries of smallest |w|.

    `int` rounds down, so a layer with active weights keeps at least one. Ties of |w|: the
    higher index becomes a candidate first (the lower index is kept, as in `masks.rank_groups`).

    Args:
        weights: any shape.
        mask: bool, same shape, True = active.
        fraction: in [0, 1).

    Returns:
        bool, same shape, True = removal candidate.
    """
    active = mask.flatten().nonzero().flatten()
    k = int(fraction * active.numel())
    order = torch.sort(weights.flatten().abs()[active], descending=True, stable=True).indices
    out = torch.zeros(mask.numel(), dtype=torch.bool)
    out[active[order[active.numel() - k :]]] = True
    return out.reshape(mask.shape)


def modelled_round_time(masks: MaskDict, coeffs: dict[str, float], time_constant: float) -> float:
    """T0 + Σ_layers (#kept weights of the layer) · (seconds per kept weight of the layer)."""
    return time_constant + sum(coeffs[n] * int(m.sum()) for n, m in masks.items())


def greedy_additions(gains: torch.Tensor, costs: torch.Tensor, importance: float, time: float) -> int:
    """How many candidates, taken in the given order, each raise importance / time when added.

    Adding candidate i raises the ratio iff gain_i / cost_i > importance / time so far; the
    candidates come sorted by gain / cost, so the first one that does not raise it ends the search.
    With time 0 so far, any positive gain raises it.

    Args:
        gains: (N,) float64 importance of each candidate (g²), sorted by gain / cost, descending.
        costs: (N,) float64 modelled seconds of each candidate (> 0).
        importance, time: the objective's numerator and denominator before any addition.

    Returns:
        the number of leading candidates to add.
    """
    zero = torch.zeros(1, dtype=torch.float64)
    num = importance + torch.cat([zero, gains.cumsum(0)[:-1]])
    den = time + torch.cat([zero, costs.cumsum(0)[:-1]])
    raises = torch.where(den > 0, gains * den > num * costs, gains > 0)
    stops = (~raises).nonzero()
    return int(stops[0]) if stops.numel() else gains.numel()


def _check_reconfigure(
    masks: MaskDict, coeffs: dict[str, float], removal_fraction: float, time_constant: float
) -> None:
    if not 0.0 <= removal_fraction < 1.0:
        raise ValueError(f"removal_fraction={removal_fraction} must be in [0, 1): pass e.g. 0.3")
    if time_constant < 0:
        raise ValueError(f"time_constant={time_constant} must be >= 0 seconds: pass e.g. 1.0")
    for name in masks:
        if not coeffs.get(name, 0.0) > 0:
            raise ValueError(
                f"coeffs[{name!r}]={coeffs.get(name)} must be > 0 seconds per kept weight: give every "
                "masked parameter a positive compute + communication cost"
            )


def reconfigure(
    weights: StateDict,
    masks: MaskDict,
    grad_sq: StateDict,
    coeffs: dict[str, float],
    removal_fraction: float,
    time_constant: float,
    fixed_importance: float = 0.0,
    max_kept: int | None = None,
) -> MaskDict:
    """PruneFL's mask reconfiguration: maximise retained importance per modelled round time.

    Args:
        weights: full-shape weights of the masked parameters (other names are ignored).
        masks: current bool masks, True = active; their names are the parameters reconfigured.
        grad_sq: accumulated squared gradients, same shapes as `masks` (the importance of a weight).
        coeffs: seconds per kept weight (compute + communication) of each masked parameter (> 0).
        removal_fraction: share of each layer's active weights that may be removed, in [0, 1).
        time_constant: the fixed part T0 of the modelled round time (>= 0).
        fixed_importance: importance of the parameters never pruned (their summed g²).
        max_kept: at most this many weights kept in all (None: no limit); above it, the kept
            weights with the lowest g² / cost are left out (after the removal step).

    Returns:
        new masks, same names and shapes. Ties of g²/cost are added in parameter order, then
        lower index first.

    Raises:
        ValueError: `removal_fraction`, `time_constant` or a coefficient is out of range.
    """
    _check_reconfigure(masks, coeffs, removal_fraction, time_constant)
    if not masks:
        return {}
    names = list(masks)
    sizes = [masks[n].numel() for n in names]
    kept = {n: masks[n] & ~removal_candidates(weights[n], masks[n], removal_fraction) for n in names}
    flat = torch.cat([kept[n].flatten() for n in names])
    all_gains = torch.cat([grad_sq[n].flatten().double() for n in names])
    all_costs = torch.cat([torch.full((masks[n].numel(),), coeffs[n], dtype=torch.float64) for n in names])
    if max_kept is not None and int(flat.sum()) > max_kept:  # over the budget: keep the best per cost
        held = flat.nonzero().flatten()
        best = torch.sort(all_gains[held] / all_costs[held], descending=True, stable=True).indices
        flat[held[best[max_kept:]]] = False
        kept = {n: part.reshape(masks[n].shape) for n, part in zip(names, flat.split(sizes), strict=True)}
    importance = fixed_importance + sum(float(grad_sq[n][kept[n]].double().sum()) for n in names)
    time = modelled_round_time(kept, coeffs, time_constant)
    candidates = (~flat).nonzero().flatten()
    gains, costs = all_gains[candidates], all_costs[candidates]
    order = torch.sort(gains / costs, descending=True, stable=True).indices
    additions = greedy_additions(gains[order], costs[order], importance, time)
    if max_kept is not None:
        additions = min(additions, max_kept - int(flat.sum()))
    flat[candidates[order[:additions]]] = True
    return {n: p.reshape(masks[n].shape).clone() for n, p in zip(names, flat.split(sizes), strict=True)}


def layer_costs(specs: dict[str, PrunableSpec], config: PruneFLConfig) -> dict[str, float]:
    """Seconds per kept weight of each prunable parameter: compute + comm, first matching glob wins.

    Raises:
        ValueError: a `layer_coeffs` glob matches no prunable parameter, or a layer's cost is 0.
    """
    for glob, _, _ in config.layer_coeffs:
        if not any(fnmatch.fnmatchcase(n, glob) for n in specs):
            raise ValueError(
                f"prunefl.layer_coeffs glob {glob!r} matches no prunable parameter: use globs over "
                f"the parameters selected by pruning.prunable, such as {', '.join(list(specs)[:5])}"
            )
    costs = {}
    for name in specs:
        match = [(a, b) for g, a, b in config.layer_coeffs if fnmatch.fnmatchcase(name, g)]
        compute, comm = match[0] if match else (config.compute_coeff, config.comm_coeff)
        if not compute + comm > 0:
            raise ValueError(
                f"prunefl.layer_coeffs gives {name} compute + comm = {compute + comm}: it must be > 0 "
                "seconds per kept weight; pass e.g. (glob, 1e-6, 1e-6)"
            )
        costs[name] = compute + comm
    return costs


def measured_time_model(
    profile: StepProfile, specs: dict[str, PrunableSpec], weights: StateDict, steps: int, bandwidth: float
) -> tuple[dict[str, float], float]:
    """The round-time model from a measured step: (seconds per kept weight of each layer, T0).

    A round is `steps` local steps and one download plus one upload over a link of `bandwidth`
    bytes per second. A kept weight of layer l costs steps · (its measured step seconds) plus
    2 · (its bytes) / bandwidth; T0 is steps · (the step's seconds outside the prunable layers) plus
    the transfer of every parameter and statistic that is never pruned.

    Args:
        profile: the measured step (`fedprune_core.step_profile.profile_step`).
        specs: the prunable parameters.
        weights: the model's state (its dtypes give the bytes per weight).
        steps: local steps per round (K).
        bandwidth: bytes per second, each way.
    """
    costs = {n: steps * profile.layer_s[n] + 2 * weights[n].element_size() / bandwidth for n in specs}
    fixed_bytes = sum(w.numel() * w.element_size() for n, w in weights.items() if n not in specs)
    return costs, steps * profile.fixed_s(specs) + 2 * fixed_bytes / bandwidth


def time_model_tensors(costs: dict[str, float], time_constant: float) -> StateDict:
    """A round-time model as `extra` tensors (`TIME_COST`, `TIME_CONSTANT`), float64, exact on reload."""
    out = {TIME_COST + n: torch.tensor([c], dtype=torch.float64) for n, c in costs.items()}
    return {**out, TIME_CONSTANT: torch.tensor([time_constant], dtype=torch.float64)}


def density(masks: MaskDict) -> float:
    """Fraction of masked entries kept (1 without masked entries)."""
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else 1.0


def is_stable(densities: list[float], changes: int, tolerance: float) -> bool:
    """Whether the last `changes` successive density ratios each moved by at most `tolerance`."""
    moves = [abs(b / a - 1.0) <= tolerance for a, b in itertools.pairwise(densities)]
    return len(moves) >= changes and all(moves[-changes:])


def fixed_importance(grad_sq: StateDict, specs: dict[str, PrunableSpec]) -> float:
    """Summed squared gradients of the parameters that are never pruned."""
    return sum(float(g.double().sum()) for n, g in grad_sq.items() if n not in specs)


def _full_masks(specs: dict[str, PrunableSpec]) -> MaskDict:
    return {n: torch.ones(s.shape, dtype=torch.bool) for n, s in specs.items()}


@dataclass(frozen=True)
class PruneFL(BaseStrategy):
    """The PruneFL strategy.

    Attributes:
        specs: the prunable parameters (unstructured masks).
        config: PruneFL's parameters.
        costs: seconds per kept weight of each prunable parameter (compute + communication), as
            configured; with `time_model: measured` the state's measured ones are used instead.
        local: clients' local training, the base of the initial-pruning training.
        seed: the experiment seed.
        reconfig_every: ΔR of this run (`PruneFLConfig.interval`).
        track_grad_sq: clients accumulate squared gradients, the importance of each weight.
    """

    config_keys: ClassVar[tuple[str, ...]] = ("pruning.prunable", "prunefl")
    specs: dict[str, PrunableSpec]
    config: PruneFLConfig
    costs: dict[str, float]
    local: LocalTrainingConfig
    seed: int
    reconfig_every: int = 50
    track_grad_sq: bool = True
    dense_grad_sq: ClassVar[bool] = True

    @property
    def max_kept(self) -> int | None:
        """The weights `config.max_density` allows in all (None: no limit)."""
        if self.config.max_density >= 1.0:
            return None
        return int(self.config.max_density * sum(s.numel for s in self.specs.values()))

    @classmethod
    def build(cls, config: ExperimentConfig, model: nn.Module) -> PruneFL:
        """Prune `config.pruning.prunable` parameters of `model`, entry by entry."""
        specs = find_prunable(model, config.pruning.prunable, PATTERN)
        costs = layer_costs(specs, config.prunefl)
        interval = config.prunefl.interval(config.schedule.num_rounds)
        return cls(specs, config.prunefl, costs, config.federated.local, config.seed, interval)

    def reconfigures_at(self, round_num: int) -> bool:
        """Masks change at the start of rounds ΔR + 1, 2ΔR + 1, ...: after every ΔR rounds of training."""
        return round_num > 1 and (round_num - 1) % self.reconfig_every == 0

    def time_model(self, extra: StateDict) -> tuple[dict[str, float], float]:
        """(seconds per kept weight of each prunable parameter, T0) in force.

        The measured model stored in `extra` when there is one; else (`time_model: constant`, or a
        run begun before the measured model existed) the configured `costs` and `time_constant`.
        """
        if TIME_CONSTANT not in extra:
            return self.costs, self.config.time_constant
        return {n: float(extra[TIME_COST + n]) for n in self.specs}, float(extra[TIME_CONSTANT])

    def measure_time_model(self, workload: Workload, examples: Sequence[Any], weights: StateDict) -> StateDict:
        """Time a training step of the dense model on `examples` and return the round-time model as `extra`."""
        cfg = self.config
        local = dataclasses.replace(self.local, track_grad_sq=False)
        batches = generator_for(self.seed, 0, cfg.initial_client, "prunefl-profile:batches")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, 0, cfg.initial_client, "prunefl-profile"))
            model = workload.build_model()

            def run_steps(k: int) -> float:
                return workload.train_client(model, examples, dataclasses.replace(local, steps=k), batches).wall_time_s

            profile = profile_step(model, self.specs, run_steps, cfg.profile_repeats)
        costs, constant = measured_time_model(profile, self.specs, weights, self.local.steps, cfg.bandwidth_bytes_per_s)
        return time_model_tensors(costs, constant)

    # --- initial pruning -------------------------------------------------------------------------

    def initialize(
        self, state: ServerState, workload: Workload, client_data: Sequence[Sequence[Any]]
    ) -> ServerState:
        """Initial pruning on the first `initial_samples` examples of `initial_client`.

        Train the masked full model in chunks of `initial_reconfig_every` SGD steps, reconfiguring
        after each chunk (removal fraction not decayed), until `initial_max_steps` steps or until
        the density has moved by at most `initial_tolerance` `initial_stable_changes` times in a row.

        Raises:
            ValueError: `initial_client` is not a client id.
        """
        cfg = self.config
        if not cfg.initial_client < len(client_data):
            raise ValueError(
                f"prunefl.initial_client={cfg.initial_client} is not one of the {len(client_data)} clients: "
                f"pass an id in [0, {len(client_data) - 1}]"
            )
        examples = client_data[cfg.initial_client][: cfg.initial_samples]
        timing = self.measure_time_model(workload, examples, state.weights) if cfg.time_model == "measured" else {}
        costs, time_constant = self.time_model(timing)
        batches = generator_for(self.seed, 0, cfg.initial_client, "prunefl-init:batches")
        weights, masks, done = state.weights, _full_masks(self.specs), 0
        densities: list[float] = []
        while done < cfg.initial_max_steps and not self._settled(densities):
            steps = min(cfg.initial_reconfig_every, cfg.initial_max_steps - done)
            weights, grad_sq = self._train_masked(workload, weights, masks, examples, steps, batches, done)
            masks = reconfigure(
                weights, masks, {n: grad_sq[n] for n in self.specs}, costs, cfg.removal_fraction,
                time_constant, fixed_importance(grad_sq, self.specs), self.max_kept,
            )
            densities.append(density(masks))
            done += steps
        pruned = {n: w * masks[n] if n in masks else w for n, w in weights.items()}
        return ServerState(state.round_num, pruned, masks, state.scores, state.momentum, timing)

    def _settled(self, densities: list[float]) -> bool:
        return is_stable(densities, self.config.initial_stable_changes, self.config.initial_tolerance)

    def _train_masked(
        self,
        workload: Workload,
        weights: StateDict,
        masks: MaskDict,
        examples: Sequence[Any],
        steps: int,
        batches: torch.Generator,
        step_offset: int,
    ) -> tuple[StateDict, StateDict]:
        """`steps` SGD steps of the masked full model; returns (weights, squared gradients), full shape.

        The squared gradients cover pruned entries too (the masked model is a dense tensor).
        """
        local = dataclasses.replace(self.local, steps=steps, track_grad_sq=True)
        client = self.config.initial_client
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, 0, client, f"prunefl-init:{step_offset}"))
            payload = extract(weights, masks, self.specs)
            model = build_client_model(workload.build_model(), payload, self.specs)
            result = workload.train_client(model.module, examples, local, batches, model.project)
        assert result.grad_sq is not None
        shapes = {n: w.shape for n, w in weights.items()}
        compact = [n for n, s in shapes.items() if n in result.state and result.state[n].shape != s]
        if not compact:
            return result.state, result.grad_sq
        # Units no kept weight reads (a convolution channel whose filter is pruned whole) were left out
        # of the client's layers: those layers go back to full shape as the server reads a client's
        # upload (`engine.aggregate`), their squared gradients over their held entries only.
        trained, _ = expand(client_update(model, self.specs), masks, self.specs, shapes)
        squares, _ = expand(client_update(model, self.specs, result.grad_sq), masks, self.specs,
                            {n: s for n, s in shapes.items() if n in result.grad_sq})
        state = {**result.state, **{n: trained[n] for n in compact}}
        return state, {**result.grad_sq, **{n: squares[n] for n in compact if n in squares}}

    # --- federated rounds ------------------------------------------------------------------------

    def keeps_masks(self, round_num: int) -> bool:
        """Between reconfigurations (round 1 sets the masks in force, full ones if none)."""
        return round_num > 1 and not self.reconfigures_at(round_num)

    def mask(self, state: ServerState, scores: StateDict, round_num: int) -> MaskDict:
        """The masks in force, reconfigured from the accumulated squared gradients when due."""
        current = state.masks or _full_masks(self.specs)
        if not self.reconfigures_at(round_num):
            return current
        cfg = self.config
        grad_sq = {n: state.extra.get(GSQ + n, torch.zeros(s.shape)) for n, s in self.specs.items()}
        fixed = float(state.extra[GSQ_FIXED].sum()) if GSQ_FIXED in state.extra else 0.0
        fraction = removal_fraction_at(round_num, cfg.removal_fraction, cfg.removal_halflife)
        costs, time_constant = self.time_model(state.extra)
        return reconfigure(state.weights, current, grad_sq, costs, fraction, time_constant, fixed, self.max_kept)

    def metrics(self, state: ServerState) -> dict[str, float]:
        """`modelled_round_time_s`: the round's time under the time model in force, T0 + Σ kept_l · c_l."""
        costs, time_constant = self.time_model(state.extra)
        masks = state.masks or _full_masks(self.specs)
        return {"modelled_round_time_s": modelled_round_time(masks, costs, time_constant)}

    def observe(
        self,
        state: ServerState,
        masks: MaskDict,
        grads: StateDict,
        trained: MaskDict,
        grad_sq: StateDict | None,
    ) -> StateDict:
        """Add the round's squared gradients to the accumulators, reset by a reconfiguration; the
        measured time model travels on unchanged."""
        reset = self.reconfigures_at(state.round_num + 1)
        extra: StateDict = {k: t for k, t in state.extra.items() if k == TIME_CONSTANT or k.startswith(TIME_COST)}
        for name, spec in self.specs.items():
            zero = torch.zeros(spec.shape)
            previous = zero if reset else state.extra.get(GSQ + name, zero)
            extra[GSQ + name] = previous + (grad_sq[name] if grad_sq is not None else 0.0)
        fixed = 0.0 if reset or GSQ_FIXED not in state.extra else float(state.extra[GSQ_FIXED].sum())
        now = fixed_importance(grad_sq, self.specs) if grad_sq is not None else 0.0
        extra[GSQ_FIXED] = torch.tensor([fixed + now], dtype=torch.float64)
        return extra
