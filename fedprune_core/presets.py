"""Named experiment configurations: the embedded defaults of the CLI, the flow and prefect.yaml.

- `toy`: the synthetic MLP workload; seconds. For engine and orchestration tests.
- `tiny`: the speech workload's `tiny` Conformer-Transducer on the `test` corpus; a minute or two.
- `small`: the `small` model on the `bench` corpus; the CPU benchmark configuration.
- `demo`: what `make run` shows: the `demo` Conformer-Transducer learns the spoken `digits` from
  scratch while the server prunes it (sparsity 0.5, column pattern), so that a client holds 47% of
  the dense parameters; WER falls from 100% to 12-17% in 24 rounds (seeds 0-2), a few minutes on
  2 CPU cores.
- `demo-dense`: the same rounds as dense FedAvg, the figure to compare `demo` with.
"""

from __future__ import annotations

from typing import Any

from fedprune_core.config import ExperimentConfig

PRESETS: dict[str, dict[str, Any]] = {
    "toy": {
        "name": "toy", "model": "toy", "corpus": "toy",
        "schedule": {"num_rounds": 12, "sparsify_rounds": 4, "ramp": "cubic", "refine_rounds": 4, "refine_every": 2},
        "federated": {"clients_per_round": 3, "eval_every": 4,
                      "local": {"steps": 5, "batch_size": 8, "lr": 0.1}},
    },
    "tiny": {
        "name": "tiny", "model": "tiny", "corpus": "test",
        "schedule": {"num_rounds": 8, "sparsify_rounds": 3, "ramp": "linear", "refine_rounds": 3, "refine_every": 1},
        "federated": {"clients_per_round": 2, "eval_every": 4,
                      "local": {"steps": 2, "batch_size": 4, "lr": 0.001, "optimizer": "adam"}},
    },
    "small": {
        "name": "small", "model": "small", "corpus": "bench",
        "schedule": {"num_rounds": 300, "sparsify_rounds": 100, "ramp": "cubic", "refine_rounds": 100,
                     "refine_every": 10},
        "federated": {"clients_per_round": 8, "eval_every": 25,
                      "local": {"steps": 10, "batch_size": 16, "lr": 0.001, "optimizer": "adam"}},
    },
    "demo": {
        "name": "demo", "model": "demo", "corpus": "digits",
        "pruning": {"sparsity": 0.5, "pattern": "column", "allocation": "adaptive"},
        "schedule": {"num_rounds": 24, "sparsify_rounds": 8, "ramp": "cubic", "refine_rounds": 8, "refine_every": 2},
        "federated": {"clients_per_round": 4, "eval_every": 4,
                      "local": {"steps": 10, "batch_size": 8, "lr": 0.003, "optimizer": "adam"}},
    },
}  # fmt: skip
PRESETS["demo-dense"] = {**PRESETS["demo"], "name": "demo-dense", "strategy": "fedavg"}


def preset(name: str, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """The preset `name` with nested `overrides` applied (unknown keys are errors)."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not known: use one of {', '.join(PRESETS)}")
    return ExperimentConfig.from_dict(PRESETS[name]).replace(overrides or {})
