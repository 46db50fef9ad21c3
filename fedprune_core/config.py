"""Experiment configuration: frozen dataclasses validated on construction.

`ExperimentConfig.from_dict` is strict: an unknown key is an error naming the key and the known
ones, so a typo never silently falls back to a default. The flow's parameters and
`prefect.yaml` mirror these fields one to one.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

from fedprune_core.allocation import ALLOCATIONS
from fedprune_core.masks import validate_pattern, validate_sparsity
from fedprune_core.schedule import ScheduleConfig
from fedprune_core.scores import validate_score
from fedprune_core.strategies import STRATEGIES
from fedprune_core.training import LocalTrainingConfig

DROPOUT_UNITS: tuple[str, ...] = ("rows", "hidden")
"""`fed_dropout.units`: what Federated Dropout drops (see `FedDropoutConfig`)."""
TIME_MODELS: tuple[str, ...] = ("measured", "constant")
"""`prunefl.time_model`: where PruneFL's per-weight round-time coefficients come from (see `PruneFLConfig`)."""

DROPOUT_BATCH_NORM: tuple[str, ...] = ("batch", "running")
"""`fed_dropout.batch_norm`: what a Federated Dropout model's batch norms normalize by at evaluation."""

# Upper bounds of every integer in a configuration. Each integer reaches databases with 64-bit
# (or narrower) integer columns: flow-run parameters in Prefect, params in MLflow, round numbers
# in checkpoint names. Beyond 64 bits Prefect's server stores the parameters and then fails to
# list any flow run (HTTP 500, "Integer exceeds 64-bit range") for every user of that server.
MAX_ROUNDS = 1_000_000
"""Rounds of a run, and every count of rounds (phase lengths, intervals), at most: 33x the longest runs (30,000)."""
MAX_SEED = 2**31 - 1
"""Seeds lie in [0, MAX_SEED]: a signed 32-bit integer, which every store and RNG API takes as is."""
MAX_COUNT = 1_000_000
"""Every other integer (steps, batch sizes, samples, clients) at most."""
ROUND_FIELDS: frozenset[str] = frozenset(
    {"num_rounds", "sparsify_rounds", "refine_rounds", "refine_every", "eval_every", "reconfig_every"}
)
"""Integer fields that count rounds (bounded by `MAX_ROUNDS`)."""


@dataclass(frozen=True)
class PruningConfig:
    """What the server prunes and how (Lin et al. 2022).

    Attributes:
        sparsity: target fraction S of pruned entries in [0, 1).
        pattern: one of `fedprune_core.masks.PATTERNS`.
        score_source, score_norm: see `fedprune_core.scores`.
        allocation: "uniform" or "adaptive" per-layer sparsity.
        prunable: globs over parameter names selecting the prunable parameters.
        include_1d: also prune 1-D parameters (biases, norms) matched by `prunable`.
        min_layer_sparsity, max_layer_sparsity: bounds of adaptive per-layer sparsity.
    """

    sparsity: float = 0.5
    pattern: str = "column"
    score_source: str = "weight"
    score_norm: str = "l2"
    allocation: str = "adaptive"
    prunable: tuple[str, ...] = ("*weight",)
    include_1d: bool = False
    min_layer_sparsity: float = 0.0
    max_layer_sparsity: float = 0.9

    def __post_init__(self) -> None:
        validate_sparsity(self.sparsity)
        validate_pattern(self.pattern)
        validate_score(self.score_source, self.score_norm)
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation={self.allocation!r} is not known: use one of {', '.join(ALLOCATIONS)}")
        if not self.prunable:
            raise ValueError("prunable=() selects nothing: pass globs such as ('*weight',)")
        if not 0.0 <= self.min_layer_sparsity <= self.sparsity <= self.max_layer_sparsity < 1.0:
            raise ValueError(
                f"min_layer_sparsity={self.min_layer_sparsity} <= sparsity={self.sparsity} <= "
                f"max_layer_sparsity={self.max_layer_sparsity} < 1 must hold: widen the bounds"
            )


@dataclass(frozen=True)
class FederatedConfig:
    """The federated round.

    Attributes:
        clients_per_round: clients sampled each round (<= the number of clients).
        local: each client's local training.
        server_lr, server_momentum: FedOpt server step (1.0 and 0.0: plain FedAvg).
        eval_every: evaluate every this many rounds (and at the last round).
        min_clients: a round aggregates the sampled clients that finished if at least this many did
            (`fedprune_core.participation`); None: half the sampled clients, rounded up.
        client_timeout_s: a client-train task not finished this many seconds after it was sent is left
            out of its round (a straggler); None: no deadline.
        round_tries: how many times a round whose finished clients are fewer than `min_clients` is
            tried (its failed clients sent again) before the run stops, naming them.
    """

    clients_per_round: int = 4
    local: LocalTrainingConfig = field(default_factory=lambda: LocalTrainingConfig(steps=5, batch_size=8, lr=0.05))
    server_lr: float = 1.0
    server_momentum: float = 0.0
    eval_every: int = 10
    min_clients: int | None = None
    client_timeout_s: float | None = None
    round_tries: int = 3

    def __post_init__(self) -> None:
        from fedprune_core.aggregate import validate_server_optimizer

        if self.clients_per_round < 1:
            raise ValueError(f"clients_per_round={self.clients_per_round} must be >= 1: pass e.g. 4")
        if self.eval_every < 1:
            raise ValueError(f"eval_every={self.eval_every} must be >= 1: pass e.g. 10")
        if self.min_clients is not None and (
            not isinstance(self.min_clients, int) or isinstance(self.min_clients, bool)
            or not 1 <= self.min_clients <= self.clients_per_round
        ):
            raise ValueError(
                f"min_clients={self.min_clients} must be in [1, clients_per_round={self.clients_per_round}]: "
                "pass e.g. 1 (any finished client makes a round) or null (half the sampled clients)"
            )
        if self.client_timeout_s is not None and (
            not isinstance(self.client_timeout_s, int | float) or isinstance(self.client_timeout_s, bool)
            or not 0 < self.client_timeout_s < float("inf")
        ):
            raise ValueError(
                f"client_timeout_s={self.client_timeout_s} must be a positive number of seconds: pass e.g. "
                "600, or null for no deadline"
            )
        if self.round_tries < 1:
            raise ValueError(f"round_tries={self.round_tries} must be >= 1: pass e.g. 3")
        validate_server_optimizer(self.server_lr, self.server_momentum)


@dataclass(frozen=True)
class FedDropoutConfig:
    """Federated Dropout (Caldas et al. 2018).

    Attributes:
        rate: fraction of units dropped in each layer, per client and round, in [0, 1).
        layer_rates: (glob, rate) pairs overriding `rate` for matching parameters (Guliani et al. 2022).
        rescale: clients train their sub-model as inverted dropout: a kept unit's output is scaled by
            units / kept units of its layer, so activations keep the full model's expected size (the
            server evaluates the full model unscaled). False: no scaling; at rate 0.5 on every layer
            of the speech model the sub-models then start at a loss of ~9.5 and do not learn.
        units: what a dropped unit is. "rows": an output row of every prunable weight, each weight
            drawn alone (the next layer keeps its input column). "hidden": a hidden unit of the
            model's unit groups (`fedprune_core.units`: feed-forward hidden units, convolution
            channels, joint dimensions): its producer rows and its reader's input column go together,
            as Caldas et al. drop a neuron; layers outside the groups stay dense, and `layer_rates`
            globs match a group's reader.
        batch_norm: what batch norms normalize by. "batch": the statistics of the batch, in training
            and at evaluation; the server holds no running statistics (a sub-model's batch-norm
            inputs differ in scale from the full model's, so statistics the clients gathered do not
            fit the model the server evaluates, and the server has no data of its own to gather them
            from). "running": running statistics, gathered by the clients and averaged over those
            that held each channel, as other strategies do.
    """

    rate: float = 0.5
    layer_rates: tuple[tuple[str, float], ...] = ()
    rescale: bool = True
    units: str = "rows"
    batch_norm: str = "batch"

    def __post_init__(self) -> None:
        validate_sparsity(self.rate, "fed_dropout.rate")
        if self.units not in DROPOUT_UNITS:
            raise ValueError(
                f"fed_dropout.units={self.units!r} is not a kind of unit: use one of {', '.join(DROPOUT_UNITS)} "
                "(rows: every weight's output rows; hidden: the model's hidden units, producer rows with reader "
                "columns)"
            )
        if self.batch_norm not in DROPOUT_BATCH_NORM:
            raise ValueError(
                f"fed_dropout.batch_norm={self.batch_norm!r} is not a kind of statistics: use one of "
                f"{', '.join(DROPOUT_BATCH_NORM)} (batch: each batch's own, also at evaluation; running: averaged "
                "running statistics)"
            )
        for glob, rate in self.layer_rates:
            validate_sparsity(rate, f"fed_dropout.layer_rates[{glob!r}]")

    def rate_for(self, name: str) -> float:
        """The dropout rate of parameter `name` (first matching glob wins)."""
        return next((r for g, r in self.layer_rates if fnmatch.fnmatchcase(name, g)), self.rate)


@dataclass(frozen=True)
class PruneFLConfig:
    """PruneFL (Jiang et al., IEEE TNNLS 2022); defaults from the published configuration.

    Attributes:
        reconfig_every: ΔR, rounds between mask reconfigurations (>= 1); None: derived from the run
            length, `reconfig_fraction` · `schedule.num_rounds` rounded (at least 1).
        reconfig_fraction: ΔR as a share of the run, in (0, 1], used when `reconfig_every` is None.
            The reference implementation (jiangyuang/PruneFL, configs/*.py) reconfigures every
            ADJ_INTERVAL = 50 rounds of MAX_ROUND = 10001: 0.005.
        initial_client: the client whose data drives initial pruning.
        initial_samples: examples of that client used for initial pruning.
        initial_max_steps: SGD steps of initial pruning at most.
        initial_reconfig_every: steps between reconfigurations during initial pruning.
        initial_stable_changes: stop once the density changed by <= `initial_tolerance` this many times in a row.
        initial_tolerance: relative density change counted as stable.
        removal_fraction: removal candidates = this fraction of active weights (lowest |w|) ...
        removal_halflife: ... times 0.5 ** (round / removal_halflife).
        time_model: where the round-time model comes from. "measured" (the paper): before initial
            pruning the server times a training step of the model on `initial_client`'s data, per
            prunable layer (`fedprune_core.step_profile`), and derives T0 and each layer's compute
            seconds per kept weight from it, and communication seconds per weight from
            `bandwidth_bytes_per_s`; the result is stored in the run's state and reused on resume.
            "constant": `time_constant`, `compute_coeff`, `comm_coeff` and `layer_coeffs` as given.
        bandwidth_bytes_per_s: the client's link, both ways ("measured"): a kept weight costs
            2 · bytes per weight / bandwidth seconds (down and up). Default 1e6: the reference
            implementation's 1 MB/s.
        profile_repeats: timed repetitions of each measurement ("measured"); the median is kept.
        time_constant: fixed part of the modelled round time (seconds; "constant").
        compute_coeff, comm_coeff: modelled seconds per kept weight for computation and communication
            ("constant").
        layer_coeffs: (glob, compute, comm) overrides per parameter ("constant").
        max_density: at most this share of the prunable weights kept (1.0: PruneFL as published,
            its density found by the objective alone). A FedPrune extension, so that PruneFL can be
            compared with other methods at one client model size: when the objective would keep
            more, the weights with the lowest importance per cost are left out.
    """

    reconfig_every: int | None = None
    reconfig_fraction: float = 0.005
    initial_client: int = 0
    initial_samples: int = 200
    initial_max_steps: int = 1000
    initial_reconfig_every: int = 50
    initial_stable_changes: int = 5
    initial_tolerance: float = 0.1
    removal_fraction: float = 0.3
    removal_halflife: float = 10000.0
    time_model: str = "measured"
    bandwidth_bytes_per_s: float = 1e6
    profile_repeats: int = 5
    time_constant: float = 1.0
    compute_coeff: float = 1e-6
    comm_coeff: float = 1e-6
    layer_coeffs: tuple[tuple[str, float, float], ...] = ()
    max_density: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.max_density <= 1.0:
            raise ValueError(f"prunefl.max_density={self.max_density} must be in (0, 1]: pass e.g. 0.5, or 1.0")
        for name in ("reconfig_every", "initial_samples", "initial_max_steps", "initial_reconfig_every",
                     "initial_stable_changes", "profile_repeats"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"prunefl.{name}={getattr(self, name)} must be >= 1: pass e.g. 50")
        if not 0.0 < self.reconfig_fraction <= 1.0:
            raise ValueError(
                f"prunefl.reconfig_fraction={self.reconfig_fraction} must be in (0, 1]: pass e.g. 0.005 (the paper's "
                "50 of 10,000 rounds), or set prunefl.reconfig_every"
            )
        self._check_time_model()
        if self.initial_client < 0:
            raise ValueError(f"prunefl.initial_client={self.initial_client} must be >= 0: pass 0")
        if not 0.0 <= self.removal_fraction < 1.0:
            raise ValueError(f"prunefl.removal_fraction={self.removal_fraction} must be in [0, 1): pass 0.3")
        if not 0.0 < self.initial_tolerance < 1.0:
            raise ValueError(f"prunefl.initial_tolerance={self.initial_tolerance} must be in (0, 1): pass 0.1")
        if self.removal_halflife <= 0:
            raise ValueError(f"prunefl.removal_halflife={self.removal_halflife} must be > 0: pass 10000")
        coeffs = [("time_constant", self.time_constant), ("compute_coeff", self.compute_coeff),
                  ("comm_coeff", self.comm_coeff)]
        coeffs += [(f"layer_coeffs[{g!r}]", min(a, b)) for g, a, b in self.layer_coeffs]
        for name, value in coeffs:
            if value < 0:
                raise ValueError(f"prunefl.{name}={value} must be >= 0 seconds: pass e.g. 1e-6")
        if self.compute_coeff + self.comm_coeff <= 0:
            raise ValueError("prunefl.compute_coeff + comm_coeff must be > 0: the time model needs a per-weight cost")

    def _check_time_model(self) -> None:
        if self.time_model not in TIME_MODELS:
            raise ValueError(
                f"prunefl.time_model={self.time_model!r} is not known: use one of {', '.join(TIME_MODELS)} "
                "(measured: timed on the client's workload; constant: the configured coefficients)"
            )
        if self.time_model == "measured" and self.layer_coeffs:
            raise ValueError(
                f"prunefl.layer_coeffs={list(self.layer_coeffs)!r} are given but prunefl.time_model='measured' "
                "measures them: set prunefl.time_model='constant' to use the given coefficients"
            )
        if not 0 < self.bandwidth_bytes_per_s:
            raise ValueError(
                f"prunefl.bandwidth_bytes_per_s={self.bandwidth_bytes_per_s} must be > 0: pass e.g. 1e6 (1 MB/s)"
            )

    def interval(self, num_rounds: int) -> int:
        """ΔR of a run of `num_rounds` rounds: `reconfig_every`, else `reconfig_fraction` of the run (>= 1)."""
        if self.reconfig_every is not None:
            return self.reconfig_every
        return max(1, round(self.reconfig_fraction * num_rounds))


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment run.

    Attributes:
        name: a label (the preset's name by default).
        seed: the experiment seed every random choice derives from.
        strategy: one of `STRATEGIES`.
        model: the workload's model preset ("tiny", "small", "paper").
        corpus: the workload's corpus preset ("test", "bench").
        init_from: warm start: "RUN_ID" (same experiment) or "EXPERIMENT/RUN_ID" of a run in the same
            storage whose last committed weights become this run's round-0 weights (masks, scores and
            optimizer state start fresh). Empty: the model's seeded initialization.
        target: a value of the workload's headline metric (WER as a fraction for speech, accuracy for
            the toy workload; `fedprune_core.budget.TARGET_METRICS`) whose first reaching the run's
            summary reports, with the clients' time and bytes up to it (PruneFL's time to accuracy).
            To compare methods, pass every run the same value, e.g. the dense run's final WER.
            None: not reported. Training does not read it.
    """

    name: str = "tiny"
    seed: int = 0
    strategy: str = "fedprune"
    model: str = "tiny"
    corpus: str = "test"
    pruning: PruningConfig = field(default_factory=PruningConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    fed_dropout: FedDropoutConfig = field(default_factory=FedDropoutConfig)
    prunefl: PruneFLConfig = field(default_factory=PruneFLConfig)
    init_from: str = ""
    target: float | None = None

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is not known: use one of {', '.join(STRATEGIES)}")
        if self.target is not None and self.target < 0:
            raise ValueError(
                f"target={self.target} must be >= 0 (a WER fraction or an accuracy): pass e.g. 0.3, or null for none"
            )
        if self.init_from and (self.init_from.count("/") > 1 or "" in self.init_from.split("/")):
            raise ValueError(
                f"init_from={self.init_from!r} must be 'RUN_ID' or 'EXPERIMENT/RUN_ID' (names checked as storage "
                "names): name a run listed by `fedprune runs list`, or leave it empty"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        """Build from a (possibly partial) nested dict; unknown keys are errors."""
        return _build(cls(), data, "")

    def replace(self, overrides: dict[str, Any]) -> ExperimentConfig:
        """A copy with nested overrides applied, e.g. {"pruning": {"sparsity": 0.3}}."""
        return ExperimentConfig.from_dict(_merge(self.to_dict(), overrides))


def check_numbers(config: Any, prefix: str = "") -> None:
    """Every float of a (nested) configuration is finite and every integer within its bound.

    Raises:
        ValueError: naming the key, its value, the bound (`MAX_ROUNDS`, `MAX_SEED`, `MAX_COUNT`) and a fix.
    """
    for f in dataclasses.fields(config):
        key, value = f"{prefix}{f.name}", getattr(config, f.name)
        example = "" if f.default is dataclasses.MISSING else f", e.g. {f.default!r}"
        if dataclasses.is_dataclass(value):
            check_numbers(value, f"{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"config key {key!r}={value!r} must be a finite number: pass a finite one{example}")
        elif isinstance(value, int) and not isinstance(value, bool):
            _check_int(key, f.name, value, example)


def _check_int(key: str, name: str, value: int, example: str) -> None:
    if name == "seed":
        limit, limit_name = MAX_SEED, "MAX_SEED"
    else:
        limit, limit_name = (MAX_ROUNDS, "MAX_ROUNDS") if name in ROUND_FIELDS else (MAX_COUNT, "MAX_COUNT")
    if not 0 <= value <= limit:
        raise ValueError(f"config key {key!r}={value} must be in [0, {limit}] ({limit_name}): pass one{example}")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(defaults: Any, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        section = prefix.rstrip(".") or "<root>"
        raise ValueError(
            f"config section {section!r}={data!r} must be a mapping of keys to values: pass {{}} for defaults"
        )
    fields = {f.name: f for f in dataclasses.fields(defaults)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key '{prefix}{unknown[0]}': known keys here are {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        current = getattr(defaults, key)
        if dataclasses.is_dataclass(current):
            kwargs[key] = _build(current, value, f"{prefix}{key}.")
            continue
        _check_type(f"{prefix}{key}", current, value, str(fields[key].type))
        if isinstance(current, tuple) and isinstance(value, list):
            kwargs[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            kwargs[key] = value
    return dataclasses.replace(defaults, **kwargs)


_OPTIONAL_TYPES: dict[str, tuple[type, ...]] = {"float | None": (int, float), "int | None": (int,)}
"""What an optional field (default None) takes besides None, by its annotation."""


def _check_type(key: str, default: Any, value: Any, declared: str = "") -> None:
    """A value has its default's type (an int may stand for a float; a list for a tuple)."""
    if default is None:  # optional fields: None or their annotation's type; their own validation decides
        allowed_optional = _OPTIONAL_TYPES.get(declared)
        if value is None or allowed_optional is None:
            return
        if not isinstance(value, allowed_optional) or isinstance(value, bool):
            raise ValueError(f"config key {key!r}={value!r} must be {declared}: pass a number, or null for none")
        return
    kind = type(default)
    allowed: tuple[type, ...] = {float: (int, float), tuple: (list, tuple)}.get(kind, (kind,))
    if not isinstance(value, allowed) or (isinstance(value, bool) and kind is not bool):
        example = list(default) if isinstance(default, tuple) else default
        raise ValueError(
            f"config key {key!r}={value!r} must be of type {kind.__name__}: pass e.g. {example!r}"
        )
