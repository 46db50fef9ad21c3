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

A variant's `groups` say which comparisons of the report it belongs to. Run ids are
`<sweep name>-<variant name>`, so running the sweep again finds, skips or resumes each run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

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

FD_HIDDEN_RATE = 0.78
"""Federated Dropout of hidden units at FP@0.5's client size: on `small` a client downloads 0.505 of
dense (FP@0.5 column, adaptive: 0.507); feed-forward, convolution and joint units are 64% of it."""

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
        fp("fd-hidden-r50", "Federated Dropout (hidden units, rate 0.5, inverted-dropout scaling; 0.68 of dense)",
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
