"""Workload and data for an experiment configuration, loaded once per process.

`config.model == "toy"` is the synthetic MLP workload (data generated from the seed), "noop" the
same with clients that train nothing (orchestration benchmarks); any other model is the speech
workload, its clients read from the corpus cache (generated on first use).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from fedprune_core.config import ExperimentConfig
from fedprune_core.engine import Workload
from fedprune_core.speech.corpus import CORPUS_PRESETS, CorpusConfig
from fedprune_core.speech.workload import SpeechWorkload
from fedprune_core.toy import NoopWorkload, ToyWorkload
from infra.cluster import ALL, format_clients, parse_clients
from infra.errors import ClientDataError
from infra.speech_data import MANIFEST, generate_corpus, load_split, read_index, read_manifest

SYNTHETIC: dict[str, type[ToyWorkload]] = {"toy": ToyWorkload, "noop": NoopWorkload}
TOY_CLIENTS = 8
TOY_EXAMPLES_PER_CLIENT = 40


class LazyClients(Sequence[Sequence[Any]]):
    """Client datasets loaded when a client is first used, then kept.

    A client whose data cannot be read fails with `ClientDataError` naming it, when it is used:
    one client's bad file fails that client (left out of its round), not the run.

    Args:
        names: one name per client (e.g. its speaker id), client ids are the indices.
        load: reads one client's examples from its name.
        held: the clients whose data this process holds (None: all); using another fails with
            `ClientDataError` saying so (a cluster worker holds only its own clients).
    """

    def __init__(
        self, names: Sequence[str], load: Callable[[str], Sequence[Any]], held: Sequence[int] | None = None
    ) -> None:
        self._names = list(names)
        self._load = load
        self._held = None if held is None else frozenset(held)
        self._loaded: dict[int, Sequence[Any]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._names)

    @overload
    def __getitem__(self, index: int) -> Sequence[Any]: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Sequence[Any]]: ...

    def __getitem__(self, index: int | slice) -> Sequence[Any] | Sequence[Sequence[Any]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        client = range(len(self._names))[index]  # IndexError for ids out of range
        with self._lock:
            if client in self._loaded:
                return self._loaded[client]
        if self._held is not None and client not in self._held:
            raise ClientDataError(
                f"client {client} ({self._names[client]}): this process holds no data of it (it holds clients "
                f"{format_clients(sorted(self._held))}): its task must run on a worker that serves it "
                "(`fedprune worker --clients`)"
            )
        try:
            examples = self._load(self._names[client])
        except (OSError, ValueError) as error:
            raise ClientDataError(
                f"client {client} ({self._names[client]}): its data cannot be read ({error}): the client is "
                "left out of its rounds; repair or regenerate its files"
            ) from error
        with self._lock:
            return self._loaded.setdefault(client, examples)


class LazyExamples(Sequence[Any]):
    """Examples read by `load` when first used, then kept (the held-out set: only the process that
    evaluates reads, or on a cluster generates, it)."""

    def __init__(self, load: Callable[[], Sequence[Any]]) -> None:
        self._load = load
        self._examples: Sequence[Any] | None = None
        self._lock = threading.Lock()

    def _get(self) -> Sequence[Any]:
        with self._lock:
            if self._examples is None:
                self._examples = self._load()
            return self._examples

    def __len__(self) -> int:
        return len(self._get())

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        return self._get()[index]


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
    return corpus_config(config.corpus).num_clients


@functools.lru_cache(maxsize=4)
def load(model: str, corpus: str, seed: int, data_dir: str, clients: str = ALL) -> WorkloadData:
    """The workload and data for (model, corpus); cached for the life of the process.

    `clients` ("all", a list such as "0-3,7", or "none"): the training clients whose data this
    process holds (`infra.runs.RunRef.clients`); the synthetic workloads make theirs from the seed.
    """
    if model in SYNTHETIC:
        toy = SYNTHETIC[model]()
        made = toy.make_clients(TOY_CLIENTS, TOY_EXAMPLES_PER_CLIENT, seed)
        held_out = toy.make_clients(2, 50, seed + 1)
        return WorkloadData(toy, made, [e for c in held_out for e in c])
    return load_speech(model, corpus, Path(data_dir), clients)


def corpus_config(name: str) -> CorpusConfig:
    """The speech corpus preset `name` ("test" or "bench")."""
    if name not in CORPUS_PRESETS:
        raise ValueError(f"corpus={name!r} is not a corpus preset: use one of {', '.join(CORPUS_PRESETS)}")
    return CORPUS_PRESETS[name]


def load_speech(model: str, corpus: str, data_dir: Path, clients: str = ALL) -> WorkloadData:
    """The speech workload: one client per synthetic training speaker, evaluated on held-out speakers.

    The corpus (of its training clients, those this process holds: `clients`) is synthesized into
    `data_dir` on first use (with a progress bar) and reused after. A training client's audio is read
    when the client is first sampled (`LazyClients`), the held-out speakers' when first evaluated.
    """
    config = corpus_config(corpus)
    held = None if clients == ALL else parse_clients(clients, config.num_clients)
    root = generate_corpus(config, data_dir, progress=True, clients=held, held_out=held is None)
    speakers = list(read_index(root)["splits"]["train"])
    training = LazyClients(speakers, lambda speaker: read_manifest(root / "train" / speaker / MANIFEST), held)

    def held_out() -> list[Any]:
        by_speaker = load_split(generate_corpus(config, data_dir, progress=True, clients=()), "test_speakers")
        return [u for utterances in by_speaker.values() for u in utterances]

    return WorkloadData(SpeechWorkload(model=model), training, LazyExamples(held_out))


def load_for(config: ExperimentConfig, data_dir: Path, clients: str = ALL) -> WorkloadData:
    """`load` for a configuration."""
    return load(config.model, config.corpus, config.seed, str(data_dir), clients)
