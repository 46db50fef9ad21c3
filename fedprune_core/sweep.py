"""The paper's experiments as data: a warm-up run and the variants that branch from it.

`paper_sweep(...)` lists the runs of `flows/sweep.py` on the `small` preset (the speech benchmark):

- warm-up: dense FedAvg from the seeded initialization, in stages (each a run that continues the
  one before from its last weights: FedAvg with a plain averaging server carries no other state).
  Every variant starts from the last stage's weights (`init_from`), so each variant's budget goes
  to what differs between methods, not to learning the basics again; the sparsify phase still
  ramps 0 -> S inside each variant, as in the paper.
- dense FedAvg; Federated Pruning (column, adaptive, weight L2, refined) at S = 0.1, 0.3, 0.5, 0.7;
  at S = 0.5 each pattern, uniform allocation, no refinement, gradient and weight x gradient
  scores; Federated Dropout and PruneFL at FP@0.5's client size; seeds 1 and 2 of FP@0.5 and dense.
- Federated Dropout drops half the rows of every prunable weight (rate 0.5): FP@0.5's client size;
  a second run keeps the two vocabulary-sized layers whole (the joiner's output rows are the
  output symbols, the predictor's embedding rows the input symbols).
  PruneFL chooses its own density; its time model's constant T0 = 1000 s was calibrated on the
  warm-up's weights so its initial pruning lands near half (density 0.56 at T0 = 1000, against
  0.42 at 100 and 0.77 at 10,000).

`compare_sweep(...)` lists the runs of the comparison at matched client budgets (`flows/sweep.py`'s
`compare` flow): every method trained from scratch on the `demo` preset at the same client download
budgets, each over the same paired seeds.

A variant's `groups` say which comparisons of the report it belongs to. Run ids are
`<sweep name>-<variant name>`, so running the sweep again finds, skips or resumes each run.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedprune_core.budgets import Knobs
from fedprune_core.config import _merge
from fedprune_core.presets import PRESETS
from fedprune_core.prunable import every_pattern_weights
from fedprune_core.speech.model import build_model


@dataclass(frozen=True)
class Variant:
    """One run of a sweep.

    Attributes:
        name: short id, unique in the sweep (the run id's suffix).
        label: how tables and plots name it.
        groups: comparisons it takes part in ("sparsity", "pattern", "allocation", "refine", "score",
            "baseline", "seed").
        overrides: nested overrides of the `small` preset (see `ExperimentConfig`).
    """

    name: str
    label: str
    groups: tuple[str, ...]
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sweep:
    """Warm-up runs (each stage continuing the one before) and the variants that start from the last."""

    name: str
    preset: str
    warmups: tuple[Variant, ...]
    variants: tuple[Variant, ...]

    def run_id(self, variant: Variant) -> str:
        return f"{self.name}-{variant.name}"


VOCAB_KEPT = [["joiner.linear.weight", 0.0], ["predictor.embedding.weight", 0.0]]
"""Federated Dropout layer rates that keep the vocabulary-sized layers whole (no symbol dropped)."""

FD_HIDDEN_RATE = 0.63
"""Federated Dropout of hidden units at FP@0.5's client size: on `small` a client downloads 0.501 of
dense (FP@0.5 column, adaptive: 0.507); feed-forward, convolution, joint and attention-head units are
77% of it (3 of 4 heads dropped from rate 0.625 on)."""

PRUNEFL: dict[str, Any] = {"reconfig_every": 4, "time_constant": 1000.0, "initial_samples": 64,
                           "initial_max_steps": 40, "initial_reconfig_every": 10, "initial_stable_changes": 2}
"""PruneFL's settings in the sweep: T0 = 1000 s calibrated on the warm-up weights (initial density 0.56)."""

FP_05: dict[str, Any] = {"sparsity": 0.5, "pattern": "column", "allocation": "adaptive", "score_source": "weight",
                         "score_norm": "l2"}


def paper_sweep(
    name: str = "paper",
    warmup_rounds: tuple[int, ...] = (80, 60),
    rounds: int = 24,
    clients_per_round: int = 4,
    local_steps: int = 5,
    seeds: tuple[int, ...] = (0, 1, 2),
    preset: str = "small",
    only: tuple[str, ...] = (),
    warmup_from: str = "",
) -> Sweep:
    """The runs of the paper's comparisons, sized by rounds (defaults: about 2.5-3 hours on 2 CPU cores).

    A variant's `rounds` split as: sparsify rounds // 3 (cubic ramp), refine rounds // 3 (re-rank
    every 2 rounds), fine-tune the rest; 4 evaluations on held-out speakers. `only`: keep just the
    variants of these names (the warm-up always runs). `warmup_from`: start every variant from this
    finished run ("EXPERIMENT/RUN_ID", e.g. an earlier sweep's last warm-up stage) instead of
    running the warm-up.

    Raises:
        ValueError: sizes too small, or a name in `only` that is not a variant.
    """
    if not warmup_rounds or min(warmup_rounds) < 1 or rounds < 6:
        raise ValueError(
            f"warmup_rounds={warmup_rounds}, rounds={rounds}: need one or more warm-up stages of >= 1 round "
            "(e.g. (80, 60)) and rounds >= 6"
        )
    sparsify = rounds // 3
    federated: dict[str, Any] = {"clients_per_round": clients_per_round, "eval_every": max(1, rounds // 4),
                 "local": {"steps": local_steps, "batch_size": 16, "lr": 0.002, "optimizer": "adam"}}
    schedule = {"num_rounds": rounds, "sparsify_rounds": sparsify, "ramp": "cubic", "refine_rounds": sparsify,
                "refine_every": 2}
    warmups = [] if warmup_from else _warmup_stages(name, warmup_rounds, federated, local_steps)
    base = {"name": name, "init_from": warmup_from or f"{name}-{warmups[-1].name}", "schedule": schedule,
            "federated": federated, "pruning": FP_05}
    # The half patterns need an even number of rows and columns: they prune the weights that allow it
    # (98.4% of the small model's weight bytes; not the embedding, joint output, depthwise and first convs).
    halvable = every_pattern_weights(build_model(PRESETS[preset]["model"]))
    variants = _variants(base, halvable, seeds)
    names = [v.name for v in variants]
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise ValueError(f"only={unknown[0]!r} is not a variant of the sweep: use some of {', '.join(names)}")
    return Sweep(name, preset, tuple(warmups), tuple(v for v in variants if not only or v.name in only))


def _warmup_stages(
    name: str, warmup_rounds: tuple[int, ...], federated: dict[str, Any], local_steps: int
) -> list[Variant]:
    """Dense FedAvg stages, each continuing the one before, with twice the variants' local steps."""
    stages: list[Variant] = []
    for i, stage_rounds in enumerate(warmup_rounds):
        stage = "warmup" if i == 0 else f"warmup{i + 1}"
        stages.append(Variant(stage, f"dense FedAvg warm-up, stage {i + 1}", (), {
            "name": f"{name}-{stage}", "strategy": "fedavg", "seed": 0,
            "init_from": f"{name}-{stages[-1].name}" if stages else "",
            "schedule": {"num_rounds": stage_rounds, "sparsify_rounds": 1, "refine_rounds": 0},
            "federated": {**federated, "eval_every": max(1, stage_rounds // 4),
                          "local": {**federated["local"], "steps": 2 * local_steps}},
        }))
    return stages


def _variants(base: dict[str, Any], halvable: tuple[str, ...], seeds: tuple[int, ...]) -> list[Variant]:
    """Every comparison, as overrides of FP@0.5 (`base`); the extra seeds of dense and FP@0.5 last."""

    def fp(vname: str, label: str, groups: tuple[str, ...], **over: Any) -> Variant:
        return Variant(vname, label, groups, _merge(copy.deepcopy(base), over))

    variants = [
        fp("dense", "dense FedAvg", ("sparsity", "baseline", "seed"), strategy="fedavg", pruning={"sparsity": 0.0}),
        *(fp(f"fp-s{int(s * 100):02d}", f"FP S={s}", ("sparsity",), pruning={"sparsity": s})
          for s in (0.1, 0.3)),
        fp("fp-s50", "FP S=0.5 (column, adaptive, weight L2, refined)",
           ("sparsity", "pattern", "allocation", "refine", "score", "baseline", "seed")),
        fp("fp-s70", "FP S=0.7", ("sparsity",), pruning={"sparsity": 0.7}),
        *(fp(f"fp-{p.replace('_', '')}", f"FP S=0.5 {p}", ("pattern",), pruning={"pattern": p})
          for p in ("row", "unstructured")),
        *(fp(f"fp-{p.replace('_', '')}", f"FP S=0.5 {p}", ("pattern",),
             pruning={"pattern": p, "prunable": list(halvable)})
          for p in ("half_column", "half_row")),
        fp("fp-uniform", "FP S=0.5 uniform", ("allocation",), pruning={"allocation": "uniform"}),
        fp("fp-norefine", "FP S=0.5 no refinement", ("refine",),
           schedule={"refine_rounds": 0}),
        *(fp(f"fp-{s.replace('_', '')}", f"FP S=0.5 {s} score", ("score",), pruning={"score_source": s})
          for s in ("gradient", "weight_x_gradient")),
        fp("fd", "Federated Dropout (rate 0.5, unscaled)", ("baseline",), strategy="fed_dropout",
           fed_dropout={"rate": 0.5, "rescale": False}),
        fp("fd-vocab", "Federated Dropout (rate 0.5, unscaled, vocabulary layers kept)", ("baseline",),
           strategy="fed_dropout", fed_dropout={"rate": 0.5, "rescale": False, "layer_rates": VOCAB_KEPT}),
        fp("fd-rescaled", "Federated Dropout (rate 0.5, inverted-dropout scaling)", ("baseline",),
           strategy="fed_dropout", fed_dropout={"rate": 0.5, "rescale": True}),
        fp("fd-rescaled-vocab", "Federated Dropout (rate 0.5, inverted-dropout scaling, vocabulary layers kept)",
           ("baseline",), strategy="fed_dropout",
           fed_dropout={"rate": 0.5, "rescale": True, "layer_rates": VOCAB_KEPT}),
        fp("fd-hidden", f"Federated Dropout (hidden units, rate {FD_HIDDEN_RATE}, inverted-dropout scaling)",
           ("baseline",), strategy="fed_dropout", fed_dropout={"units": "hidden", "rate": FD_HIDDEN_RATE}),
        fp("fd-hidden-unscaled", f"Federated Dropout (hidden units, rate {FD_HIDDEN_RATE}, unscaled)", ("baseline",),
           strategy="fed_dropout", fed_dropout={"units": "hidden", "rate": FD_HIDDEN_RATE, "rescale": False}),
        fp("fd-hidden-r50", "Federated Dropout (hidden units, rate 0.5, inverted-dropout scaling; 0.62 of dense)",
           ("baseline",), strategy="fed_dropout", fed_dropout={"units": "hidden", "rate": 0.5}),
        fp("prunefl", "PruneFL", ("baseline",), strategy="prunefl", prunefl=PRUNEFL),
        fp("prunefl-d50", "PruneFL (density at most 0.5)", ("baseline",), strategy="prunefl",
           prunefl={**PRUNEFL, "max_density": 0.5}),
    ]
    for seed in seeds[1:]:
        variants += [fp(f"dense-seed{seed}", "dense FedAvg", ("seed",), strategy="fedavg",
                        pruning={"sparsity": 0.0}, seed=seed),
                     fp(f"fp-s50-seed{seed}", "FP S=0.5 (column, adaptive, weight L2, refined)", ("seed",),
                        seed=seed)]
    return variants


# --- the comparison at matched client budgets (issue: fair, powered comparisons) -------------------

COMPARE_BUDGETS: tuple[float, ...] = (0.75, 0.5, 0.35)
"""Client download budgets, shares of the dense model's parameters (`fedprune_core.budgets`)."""

COMPARE_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
"""Paired seeds: a seed fixes the initialization and every round's client sample, whatever the method."""

FD_KEEPS: tuple[float, ...] = (0.9, 0.75)
"""Federated Dropout's own regime: the kept shares of hidden units Caldas et al. report."""

FD_SERVER_LRS: tuple[float, ...] = (0.5, 1.0, 2.0)
"""The server learning rates Federated Dropout is tried with (seed 0, middle budget) before the comparison."""

SGD_LRS: tuple[float, ...] = (0.05, 0.2, 0.5, 1.0, 2.0)
"""The client learning rates SGD clients are tried with (seed 0, FP at the middle budget) before the
comparison: the preset's Adam rate (0.003) means nothing to SGD."""

SGD_CLIENTS: dict[str, Any] = {"optimizer": "sgd", "max_grad_norm": 1.0}
"""SGD clients (plain SGD, no momentum; each round's K steps start afresh, as Adam's do), their
gradient norm clipped at 1: without it the transducer's loss turned to NaN within 10 rounds at lr 0.2."""


@dataclass(frozen=True)
class Arm:
    """Where a comparison run stands: its method, its budget (None: outside the budget grid), its seed."""

    method: str
    budget: float | None
    seed: int


def compare_base(rounds: int) -> dict[str, Any]:
    """Overrides of the `demo` preset every comparison run shares: `rounds` rounds from scratch, a third
    ramping sparsity (cubic), a third re-ranking masks every 2 rounds, the rest fine-tuning; an
    evaluation every 4 rounds (the score is the mean of the last ones, `infra.comparison`)."""
    third = rounds // 3
    return {"schedule": {"num_rounds": rounds, "sparsify_rounds": third, "ramp": "cubic", "refine_rounds": third,
                         "refine_every": 2},
            "federated": {"eval_every": 4},
            "pruning": {"sparsity": 0.5, "pattern": "column", "allocation": "adaptive", "score_source": "weight",
                        "score_norm": "l2"}}


def fd_lr_pilot(name: str, rounds: int, fd_rate: float) -> list[Variant]:
    """Federated Dropout (rows at the middle budget's rate) at each of `FD_SERVER_LRS`, seed 0: the
    comparison's Federated Dropout runs use the best of them (`flows.sweep.best_lr`)."""
    base = compare_base(rounds)
    return [Variant(f"pilot-fd-lr{round(100 * lr):03d}", f"Federated Dropout rows, server lr {lr:g}", ("pilot",),
                    _merge(copy.deepcopy(base), {"strategy": "fed_dropout", "seed": 0,
                                                 "federated": {"server_lr": lr},
                                                 "fed_dropout": {"units": "rows", "rate": fd_rate}}))
            for lr in FD_SERVER_LRS]


def sgd_lr_pilot(name: str, rounds: int, fp_sparsity: float) -> list[Variant]:
    """Federated Pruning at the middle budget's sparsity with SGD clients at each of `SGD_LRS`, seed 0:
    the comparison's SGD runs use the best of them (`flows.sweep.best_lr`)."""
    base = compare_base(rounds)
    return [Variant(f"pilot-sgd-lr{round(100 * lr):03d}", f"FP S={fp_sparsity}, SGD clients, lr {lr:g}", ("pilot",),
                    _merge(copy.deepcopy(base), {"seed": 0, "pruning": {"sparsity": fp_sparsity},
                                                 "federated": {"local": {**SGD_CLIENTS, "lr": lr}}}))
            for lr in SGD_LRS]


def compare_sweep(
    name: str = "compare",
    rounds: int = 32,
    seeds: tuple[int, ...] = COMPARE_SEEDS,
    knobs: Sequence[Knobs] = (),
    fd_server_lr: float = 1.0,
    sgd_lr: float = 0.05,
) -> tuple[Sweep, dict[str, Arm]]:
    """Every method at each budget of `knobs` (`fedprune_core.budgets.knobs_for`), each over `seeds`.

    Per seed:
    - dense FedAvg (budget 1.0);
    - at each budget: Federated Pruning (column, adaptive, weight L2, refined) at the sparsity that
      meets it, PruneFL with that `max_density`, Federated Dropout of rows and of hidden units
      (feed-forward units, convolution channels, joint dimensions, attention heads) at the rates
      that meet it (on `demo` hidden units reach 0.75 of dense but not 0.5: the prediction network
      stays whole);
    - at the middle budget, the paper's other choices against that FP run: row pattern, uniform
      allocation, no refinement, the pseudo-gradient, the clients' true squared gradients (`grad_sq`)
      and weight x squared gradient as scores; and weight against `grad_sq` with SGD clients (lr `sgd_lr`,
      chosen by `sgd_lr_pilot`; it names the runs, so runs at another lr are others);
    - outside the grid: Federated Dropout of hidden units at Caldas et al.'s keeps `FD_KEEPS`, and
      PruneFL as published (no density cap: its objective chooses the client size).
    Federated Dropout runs use `fd_server_lr` (chosen by `fd_lr_pilot`).

    Returns:
        The sweep, and each run id's `Arm`.

    Raises:
        ValueError: rounds below 12, no seed, or no budget.
    """
    if rounds < 12 or not seeds or not knobs:
        raise ValueError(f"rounds={rounds}, seeds={seeds}, {len(knobs)} budgets: need rounds >= 12 (e.g. 32), "
                         "one seed or more and one budget or more")
    base = compare_base(rounds)
    middle = knobs[len(knobs) // 2]
    variants: list[Variant] = []
    arms: dict[str, Arm] = {}

    def add(vname: str, label: str, method: str, budget: float | None, seed: int, **over: Any) -> None:
        v = Variant(f"{vname}-s{seed}", label, ("compare",), _merge(copy.deepcopy(base), {**over, "seed": seed}))
        variants.append(v)
        arms[f"{name}-{v.name}"] = Arm(method, budget, seed)

    fd = {"strategy": "fed_dropout", "federated": {"server_lr": fd_server_lr}}
    for seed in seeds:
        add("dense", "dense FedAvg", "dense", 1.0, seed, strategy="fedavg", pruning={"sparsity": 0.0})
        for k in knobs:
            b = f"b{round(100 * k.share):02d}"
            if k.fp_sparsity is not None:
                add(f"fp-{b}", f"FP S={k.fp_sparsity}", "fp", k.share, seed, pruning={"sparsity": k.fp_sparsity})
            if k.prunefl_density is not None:
                add(f"prunefl-{b}", f"PruneFL max density {k.prunefl_density}", "prunefl", k.share, seed,
                    strategy="prunefl", prunefl={"max_density": k.prunefl_density})
            if k.fd_rate is not None:
                add(f"fd-{b}", f"Federated Dropout rows, rate {k.fd_rate}", "fd-rows", k.share, seed,
                    **_merge(copy.deepcopy(fd), {"fed_dropout": {"units": "rows", "rate": k.fd_rate}}))
            if k.fd_hidden_rate is not None:
                add(f"fdh-{b}", f"Federated Dropout hidden units, rate {k.fd_hidden_rate}", "fd-hidden", k.share,
                    seed, **_merge(copy.deepcopy(fd), {"fed_dropout": {"units": "hidden", "rate": k.fd_hidden_rate}}))
        s = middle.fp_sparsity
        if s is not None:
            mid = middle.share
            at = {"sparsity": s}
            add("fp-row", f"FP S={s} row", "fp-row", mid, seed, pruning={**at, "pattern": "row"})
            add("fp-uniform", f"FP S={s} uniform", "fp-uniform", mid, seed, pruning={**at, "allocation": "uniform"})
            add("fp-norefine", f"FP S={s} no refinement", "fp-norefine", mid, seed,
                pruning=at, schedule={"refine_rounds": 0})
            for score in ("gradient", "grad_sq", "weight_x_grad_sq"):
                add(f"fp-{score.replace('_', '')}", f"FP S={s} {score} score", f"fp-{score}", mid, seed,
                    pruning={**at, "score_source": score})
            sgd, lr = {"local": {**SGD_CLIENTS, "lr": sgd_lr}}, f"lr{round(100 * sgd_lr):03d}"
            add(f"fp-sgd-{lr}", f"FP S={s}, SGD clients", "fp-sgd", mid, seed, pruning=at, federated=sgd)
            add(f"fp-sgd-{lr}-gradsq", f"FP S={s} grad_sq score, SGD clients", "fp-sgd-grad_sq", mid, seed,
                pruning={**at, "score_source": "grad_sq"}, federated=sgd)
        for keep in FD_KEEPS:
            rate = round(1 - keep, 4)
            add(f"fdh-k{round(100 * keep)}", f"Federated Dropout hidden units, keep {keep}", "fd-hidden", None,
                seed, **_merge(copy.deepcopy(fd), {"fed_dropout": {"units": "hidden", "rate": rate}}))
        add("prunefl-published", "PruneFL as published (no density cap)", "prunefl-published", None, seed,
            strategy="prunefl")
    return Sweep(name, "demo", (), tuple(variants)), arms
