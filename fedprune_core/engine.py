"""One federated round as five pure steps: score, mask, dispatch, client-train, aggregate.

`fedprune_core.simulate` chains them in one process; the Prefect flow runs each as a task.
Both call these same functions, so the flow can be checked against the reference loop.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from fedprune_core.aggregate import ClientContribution, masked_fedavg, server_step
from fedprune_core.budget import step_flops
from fedprune_core.config import ExperimentConfig
from fedprune_core.prunable import PrunableSpec, is_sliced
from fedprune_core.rng import derive_seed, generator_for
from fedprune_core.submodel import (
    SEP,
    build_client_model,
    client_update,
    expand,
    extract,
    float_entries,
    payload_nbytes,
)
from fedprune_core.training import ClientResult, LocalTrainingConfig, is_running_stat, model_state
from fedprune_core.types import MaskDict, Payload, StateDict
from fedprune_core.units import UnitGroup, held_entries

_GLOBAL_RNG_LOCK = threading.Lock()
"""Serializes the code that touches torch's global RNG (model construction, dropout, SpecAugment).

Each client's training is seeded from (seed, round, client) inside `torch.random.fork_rng`;
the lock keeps thread-concurrent clients from interleaving on that one global generator.
"""


class Workload(Protocol):
    """A model family plus its data handling (e.g. `fedprune_core.speech.workload.SpeechWorkload`)."""

    def build_model(self) -> nn.Module: ...

    def train_client(
        self,
        model: nn.Module,
        examples: Sequence[Any],
        config: LocalTrainingConfig,
        generator: torch.Generator,
        after_step: Callable[[], None] | None = None,
    ) -> ClientResult: ...

    def evaluate(self, model: nn.Module, examples: Sequence[Any]) -> dict[str, float]: ...


@dataclass(frozen=True)
class ServerState:
    """Everything the server carries from one round to the next.

    Attributes:
        round_num: the last completed round (0: initial model).
        weights: full model weights, and the batch norms' running statistics (`model_state`).
        masks: the global masks in force (empty for strategies without masks).
        scores: per-entry importance scores of the prunable parameters.
        momentum: server optimizer momentum (empty for plain FedAvg).
        extra: strategy-specific tensors (pseudo-gradients, accumulators).
    """

    round_num: int
    weights: StateDict
    masks: MaskDict = field(default_factory=dict)
    scores: StateDict = field(default_factory=dict)
    momentum: StateDict = field(default_factory=dict)
    extra: StateDict = field(default_factory=dict)

    def groups(self) -> dict[str, StateDict]:
        """Named tensor groups, as stored in a checkpoint."""
        return {"weights": self.weights, "masks": self.masks, "scores": self.scores,
                "momentum": self.momentum, "extra": self.extra}

    @classmethod
    def from_groups(cls, round_num: int, groups: dict[str, StateDict]) -> ServerState:
        """Inverse of `groups`."""
        names = ("weights", "masks", "scores", "momentum", "extra")
        return cls(round_num, **{k: dict(groups.get(k, {})) for k in names})

    def flat(self) -> StateDict:
        """One flat tensor dict, "<group>/<name>" -> tensor (one storage object)."""
        return {f"{g}/{n}": t for g, ts in self.groups().items() for n, t in ts.items()}

    @classmethod
    def from_flat(cls, round_num: int, flat: StateDict) -> ServerState:
        """Inverse of `flat`."""
        groups: dict[str, StateDict] = {}
        for key, t in flat.items():
            group, _, name = key.partition("/")
            groups.setdefault(group, {})[name] = t
        return cls.from_groups(round_num, groups)


@dataclass(frozen=True)
class ClientOutcome:
    """What one client returned, plus what its round cost.

    Attributes:
        client_id: the client.
        update: the uploaded payload (trained values, see `fedprune_core.submodel`).
        num_examples, mean_loss, wall_time_s, peak_memory_bytes: from local training.
        bytes_down, bytes_up: exact payload sizes; `bytes_up` is everything the client sends:
            `update` plus `grad_sq`.
        params_down: float entries of the downloaded payload (`fedprune_core.submodel.float_entries`):
            the parameters the client holds, indices left out.
        grad_sq: accumulated squared gradients, encoded like `update` (dense for masked parameters
            when the strategy's `dense_grad_sq`), when the strategy tracks them.
        flops, dense_flops: FLOPs of one training step of the client's sub-model and of the dense
            model on the same batch (`client_step_flops`), in the rounds that evaluate; else 0.
    """

    client_id: int
    update: Payload
    num_examples: int
    mean_loss: float
    wall_time_s: float
    peak_memory_bytes: int
    bytes_down: int
    bytes_up: int
    params_down: int
    grad_sq: Payload | None = None
    flops: int = 0
    dense_flops: int = 0

    @property
    def stats(self) -> ClientStats:
        """The loggable numbers of this outcome."""
        return ClientStats(self.client_id, self.num_examples, self.mean_loss, self.wall_time_s,
                           self.peak_memory_bytes, self.bytes_down, self.bytes_up, self.params_down, self.flops,
                           self.dense_flops)


@dataclass(frozen=True)
class ClientStats:
    """The small, loggable part of a client's outcome."""

    client_id: int
    num_examples: int
    mean_loss: float
    wall_time_s: float
    peak_memory_bytes: int
    bytes_down: int
    bytes_up: int
    params_down: int
    flops: int = 0
    dense_flops: int = 0


class Strategy(Protocol):
    """A federated method: how the server scores, masks, dispatches and learns from a round.

    `fedprune_core.strategies.base.BaseStrategy` gives every member dense FedAvg's behaviour;
    strategies override what they change.
    """

    @property
    def specs(self) -> dict[str, PrunableSpec]:
        """The parameters this strategy prunes or slices."""
        ...

    @property
    def groups(self) -> tuple[UnitGroup, ...]:
        """The unit groups whose units a client may not hold (Federated Dropout of hidden units):
        their `UnitGroup.entries` are averaged over the clients that held each unit."""
        ...

    @property
    def track_grad_sq(self) -> bool:
        """Whether clients must accumulate squared gradients."""
        ...

    @property
    def dense_grad_sq(self) -> bool:
        """Whether clients upload the squared gradients of pruned entries too and the server sums
        them over clients (PruneFL); else those of held entries, averaged like the weights."""
        ...

    @property
    def rescale_kept(self) -> bool:
        """Whether clients train their sub-model as inverted dropout (`build_client_model`)."""
        ...

    def initialize(self, state: ServerState, workload: Workload, client_data: Sequence[Sequence[Any]]) -> ServerState:
        """Before round 1 (PruneFL's initial pruning); most strategies return `state`."""
        ...

    def keeps_masks(self, round_num: int) -> bool:
        """Whether `round_num` scores and masks nothing: `score` and `mask` would return the scores
        and masks of the state after round_num - 1, so the flow skips their tasks."""
        ...

    def score(self, state: ServerState, round_num: int) -> StateDict:
        """Importance scores for `round_num` from the state after round_num - 1."""
        ...

    def mask(self, state: ServerState, scores: StateDict, round_num: int) -> MaskDict:
        """Global masks in force during `round_num`."""
        ...

    def client_masks(self, state: ServerState, masks: MaskDict, round_num: int, client_id: int) -> MaskDict:
        """Masks of the submodel `client_id` trains in `round_num` (derived, never stored)."""
        ...

    def observe(
        self, state: ServerState, masks: MaskDict, grads: StateDict, trained: MaskDict, grad_sq: StateDict | None
    ) -> StateDict:
        """The strategy's `extra` tensors after a round's aggregation."""
        ...

    def metrics(self, state: ServerState) -> dict[str, float]:
        """The strategy's own metrics of the round that made `state` (PruneFL's modelled round time)."""
        ...


def init_state(workload: Workload, seed: int) -> ServerState:
    """Round-0 state: the workload's model initialized from the experiment seed."""
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(derive_seed(seed, 0, -1, "init"))
        model = workload.build_model()
    return ServerState(0, model_state(model))


def should_evaluate(round_num: int, config: ExperimentConfig) -> bool:
    """Evaluate (and count a client step's FLOPs) every `eval_every` rounds and at the last round."""
    return round_num % config.federated.eval_every == 0 or round_num == config.schedule.num_rounds


def round_masks(strategy: Strategy, state: ServerState, round_num: int) -> tuple[StateDict, MaskDict]:
    """The scores and global masks in force during `round_num`."""
    if strategy.keeps_masks(round_num):
        return state.scores, state.masks
    scores = strategy.score(state, round_num)
    return scores, strategy.mask(state, scores, round_num)


def dispatch(strategy: Strategy, state: ServerState, masks: MaskDict, round_num: int, client_id: int) -> Payload:
    """The payload `client_id` downloads in `round_num`."""
    return extract(state.weights, strategy.client_masks(state, masks, round_num, client_id), strategy.specs)


def train_client(
    workload: Workload,
    config: ExperimentConfig,
    strategy: Strategy,
    payload: Payload,
    examples: Sequence[Any],
    round_num: int,
    client_id: int,
) -> ClientOutcome:
    """Build the client's submodel from its payload, train it locally and encode the upload."""
    seed = config.seed
    local = config.federated.local
    if strategy.track_grad_sq and not local.track_grad_sq:
        local = dataclasses.replace(local, track_grad_sq=True)
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        # the CPU generator only (torch.manual_seed also queues CUDA seeding with a stack trace: ~ms)
        torch.default_generator.manual_seed(derive_seed(seed, round_num, client_id, "train"))
        client = build_client_model(workload.build_model(), payload, strategy.specs, strategy.rescale_kept)
        result = workload.train_client(
            client.module, examples, local, generator_for(seed, round_num, client_id, "batches"), client.project
        )
    update = client_update(client, strategy.specs)
    grad_sq = None
    if strategy.track_grad_sq and result.grad_sq is not None:
        # With `dense_grad_sq`, squared gradients of masked (not sliced) parameters travel dense:
        # pruned entries have gradients too, and PruneFL needs them to let pruned weights regrow.
        # A layer the client built without its unread inputs (`fedprune_core.units`) has no dense
        # squares to send: it sends those of its held entries, encoded like its update.
        compact = {n: m for n, m in client.masks.items()
                   if n in result.grad_sq and tuple(result.grad_sq[n].shape) != tuple(strategy.specs[n].shape)}
        encoder = dataclasses.replace(client, masks=compact) if strategy.dense_grad_sq else client
        grad_sq = client_update(encoder, strategy.specs, result.grad_sq)
    bytes_up = payload_nbytes(update) + (0 if grad_sq is None else payload_nbytes(grad_sq))
    flops, dense_flops = (0, 0)
    if should_evaluate(round_num, config):  # two more steps: counted in the rounds that evaluate
        flops, dense_flops = client_step_flops(workload, config, strategy, payload, examples, round_num, client_id)
    return ClientOutcome(
        client_id, update, result.num_examples, result.mean_loss, result.wall_time_s,
        result.peak_memory_bytes, payload_nbytes(payload), bytes_up, float_entries(payload), grad_sq, flops,
        dense_flops,
    )


def client_step_flops(
    workload: Workload,
    config: ExperimentConfig,
    strategy: Strategy,
    payload: Payload,
    examples: Sequence[Any],
    round_num: int,
    client_id: int,
) -> tuple[int, int]:
    """FLOPs of one local step of the client's sub-model and of the dense model, on the same batch.

    Each runs on a model of its own, built as the client builds it, with batches drawn from
    (seed, round, client, "flops"), so the client's training is untouched and both count the same
    examples (`fedprune_core.budget.step_flops`).
    """
    one = dataclasses.replace(config.federated.local, steps=1, track_grad_sq=False)

    def count(sub_model: bool) -> int:
        with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed(config.seed, round_num, client_id, "flops"))
            model = workload.build_model()
            client = build_client_model(model, payload, strategy.specs, strategy.rescale_kept) if sub_model else None
            module, project = (client.module, client.project) if client is not None else (model, None)
            batches = generator_for(config.seed, round_num, client_id, "flops:batches")
            return step_flops(lambda: workload.train_client(module, examples, one, batches, project))

    return count(True), count(False)


def aggregate(
    strategy: Strategy,
    config: ExperimentConfig,
    state: ServerState,
    scores: StateDict,
    masks: MaskDict,
    outcomes: Sequence[ClientOutcome],
    round_num: int,
) -> ServerState:
    """Masked FedAvg of the clients' updates plus the server step: the state after `round_num`."""
    shapes = {n: w.shape for n, w in state.weights.items()}
    param_shapes = {n: s for n, s in shapes.items() if not is_running_stat(n)}  # what squared gradients cover
    contributions = []
    grad_sq_parts = []
    for o in sorted(outcomes, key=lambda o: o.client_id):
        cmasks = strategy.client_masks(state, masks, round_num, o.client_id)
        values, held = expand(o.update, cmasks, strategy.specs, shapes)
        for name, entries in held_entries(strategy.groups, cmasks, shapes).items():
            held[name] = held[name] & entries if name in held else entries
        contributions.append(ClientContribution(values, held, o.num_examples))
        if o.grad_sq is not None:
            dense = strategy.dense_grad_sq
            encoded = {n: m for n, m in cmasks.items()
                       if is_sliced(strategy.specs[n]) or not dense or f"{n}{SEP}v" in o.grad_sq}
            squares, held_squares = expand(o.grad_sq, encoded, strategy.specs, param_shapes)
            grad_sq_parts.append(ClientContribution(squares, held_squares, o.num_examples))
    average, trained = masked_fedavg(state.weights, contributions)
    fed = config.federated
    weights, momentum, grads = server_step(
        state.weights, average, trained, state.momentum, fed.server_lr, fed.server_momentum,
        averaged=shapes.keys() - param_shapes.keys(),
    )
    grad_sq = _aggregate_grad_sq(grad_sq_parts, param_shapes, strategy.dense_grad_sq) if grad_sq_parts else None
    extra = strategy.observe(state, masks, grads, trained, grad_sq)
    return ServerState(round_num, weights, masks, scores, momentum, extra)


def _aggregate_grad_sq(
    parts: Sequence[ClientContribution], shapes: dict[str, torch.Size], summed: bool
) -> StateDict:
    """The clients' squared gradients, full shape: summed over clients (PruneFL's dense ones), or
    averaged per entry over the clients that held it with their example counts (0 where none did)."""
    zeros = {n: torch.zeros_like(parts[0].values[n]) for n in shapes}
    if summed:
        return {n: sum((p.values[n] for p in parts), zero) for n, zero in zeros.items()}
    return masked_fedavg(zeros, list(parts))[0]


def masked_weights(state: ServerState) -> StateDict:
    """The weights a pruned model computes with: pruned entries set to zero."""
    return {n: w * state.masks[n] if n in state.masks else w for n, w in state.weights.items()}


def evaluate(workload: Workload, state: ServerState, examples: Sequence[Any]) -> dict[str, float]:
    """Evaluate the (masked) global model."""
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        model = workload.build_model()
    model.load_state_dict(masked_weights(state), strict=False)
    _batch_statistics_where_absent(model, state.weights)
    model.eval()
    with torch.no_grad():
        return workload.evaluate(model, examples)


def _batch_statistics_where_absent(model: nn.Module, weights: StateDict) -> None:
    """Batch norms whose running statistics `weights` does not hold (Federated Dropout's
    `batch_statistics`) normalize by each batch's statistics in eval mode too, as in training."""
    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and f"{prefix}running_mean" not in weights:
            m.track_running_stats = False
            m.running_mean = m.running_var = None  # eval mode then normalizes by the batch


def layer_sparsity(masks: MaskDict, specs: dict[str, PrunableSpec]) -> list[tuple[str, tuple[int, ...], int, int]]:
    """Per prunable parameter: (name, shape, entries, kept entries); unmasked ones are kept whole."""
    return [(n, s.shape, s.numel, int(masks[n].count_nonzero()) if n in masks else s.numel) for n, s in specs.items()]


def overall_sparsity(masks: MaskDict, specs: dict[str, PrunableSpec]) -> float:
    """Fraction of prunable entries pruned (0 without masks)."""
    total = sum(s.numel for s in specs.values())
    if not masks or not total:
        return 0.0
    return sum(int((~m).sum()) for m in masks.values()) / total
