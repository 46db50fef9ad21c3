"""Workload and data for an experiment configuration, loaded once per process.

`config.model == "toy"` is the synthetic MLP workload (data generated from the seed), "noop" the
same with clients that train nothing (orchestration benchmarks); any other model is the speech
workload, its clients read from the corpus cache (generated on first use).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedprune_core.config import ExperimentConfig
from fedprune_core.engine import Workload
from fedprune_core.toy import NoopWorkload, ToyWorkload

SYNTHETIC: dict[str, type[ToyWorkload]] = {"toy": ToyWorkload, "noop": NoopWorkload}
TOY_CLIENTS = 8
TOY_EXAMPLES_PER_CLIENT = 40


@dataclass(frozen=True)
class WorkloadData:
    """A workload with its client datasets and evaluation set."""

    workload: Workload
    clients: Sequence[Sequence[Any]]
    eval_examples: Sequence[Any]


def num_clients(config: ExperimentConfig) -> int:
    """Number of training clients the configuration's data has, without loading any audio."""
    if config.model in SYNTHETIC:
        return TOY_CLIENTS
    from infra.speech_data import corpus_config

    return corpus_config(config.corpus).num_clients


@functools.lru_cache(maxsize=4)
def load(model: str, corpus: str, seed: int, data_dir: str) -> WorkloadData:
    """The workload and data for (model, corpus); cached for the life of the process."""
    if model in SYNTHETIC:
        toy = SYNTHETIC[model]()
        clients = toy.make_clients(TOY_CLIENTS, TOY_EXAMPLES_PER_CLIENT, seed)
        held_out = toy.make_clients(2, 50, seed + 1)
        return WorkloadData(toy, clients, [e for c in held_out for e in c])
    from infra.speech_data import load_federated_speech

    return load_federated_speech(model, corpus, Path(data_dir))


def load_for(config: ExperimentConfig, data_dir: Path) -> WorkloadData:
    """`load` for a configuration."""
    return load(config.model, config.corpus, config.seed, str(data_dir))
