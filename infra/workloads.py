"""Workloads, one registry entry each, and their data, loaded once per process.

A workload is a `fedprune_core.engine.Workload` (model, local training, evaluation) with its
data. Each is one `WorkloadSpec` in `WORKLOADS`: the models it serves (`config.model`), how many
training clients it has, how it loads the workload with its clients and evaluation set, the
corpus presets it reads and what a cluster worker prepares before it joins. Everything that
depends on the model (`num_clients`, `load`, `corpus_config`, `fedprune worker`) looks it up here.

| entry | models | data |
|---|---|---|
| toy | toy | a synthetic MLP task generated from the seed (`fedprune_core.toy`) |
| noop | noop | the same, with clients that train nothing (orchestration benchmarks) |
| speech | tiny, demo, small, paper | the speech corpus cache, generated on first use (`infra.speech_data`) |
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from fedprune_core.config import ExperimentConfig
from fedprune_core.engine import Workload
from fedprune_core.speech.corpus import CORPUS_PRESETS, CorpusConfig
from fedprune_core.speech.model import MODEL_PRESETS
from fedprune_core.speech.workload import SpeechWorkload
from fedprune_core.toy import NoopWorkload, ToyWorkload
from infra.cluster import ALL, format_clients, parse_clients
from infra.errors import ClientDataError
from infra.speech_data import MANIFEST, generate_corpus, load_split, read_index, read_manifest

TOY_CLIENTS = 8
TOY_EXAMPLES_PER_CLIENT = 40
MAX_TOY_CLIENTS = 10_000


def toy_clients(corpus: str) -> int:
    """The clients of a toy corpus: "toy" has `TOY_CLIENTS`, "toy-N" has N (e.g. "toy-128" for
    orchestration benchmarks); client c's data is the same whatever N is.

    Raises:
        ValueError: naming the corpus, the rule and the fix.
    """
    match = re.fullmatch(r"toy(?:-(\d+))?", corpus)
    count = (int(match.group(1)) if match.group(1) else TOY_CLIENTS) if match else 0
    if not 1 <= count <= MAX_TOY_CLIENTS:
        raise ValueError(
            f"corpus={corpus!r} is not a toy corpus: the toy workloads read corpus=toy ({TOY_CLIENTS} clients) or "
            f"toy-N for N clients, 1 <= N <= {MAX_TOY_CLIENTS} (e.g. --set corpus=toy-128)"
        )
    return count


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


Loader = Callable[[str, str, int, Path, tuple[int, ...] | None], WorkloadData]
"""(model, corpus, seed, data_dir, held) -> the workload with its data (`WorkloadSpec.load`)."""


@dataclass(frozen=True)
class WorkloadSpec:
    """One workload: the models it serves and where its data comes from.

    Attributes:
        name: the entry's key in `WORKLOADS`.
        models: the `config.model` values it serves (no two entries serve one model).
        num_clients: corpus name -> how many training clients the data has, found without loading any.
        load: (model, corpus, seed, data_dir, held) -> the workload, its clients (client ids are the
            indices) and its evaluation examples. `held`: the training clients whose data this process
            holds (None: all; a cluster worker holds only its own); using another must fail with
            `ClientDataError` (`LazyClients` does this). Data made from the seed may be made whole.
        corpora: the corpus presets it reads (`config.corpus`), by name (no two entries name one);
            empty when its data comes from the seed and `config.corpus` is not read.
        prepare: (corpus, data_dir, held) -> where the `held` clients' data now is: what `fedprune worker
            --corpus` makes before joining, so the first round does not wait. None: nothing to make.
    """

    name: str
    models: tuple[str, ...]
    num_clients: Callable[[str], int]
    load: Loader
    corpora: Mapping[str, CorpusConfig] = field(default_factory=dict)
    prepare: Callable[[str, Path, tuple[int, ...]], Path] | None = None


def load_synthetic(
    workload: type[ToyWorkload], model: str, corpus: str, seed: int, data_dir: Path, held: tuple[int, ...] | None
) -> WorkloadData:
    """A toy workload's data, made whole from the seed (so `held` and `data_dir` are not read)."""
    toy = workload()
    made = toy.make_clients(toy_clients(corpus), TOY_EXAMPLES_PER_CLIENT, seed)
    held_out = toy.make_clients(2, 50, seed + 1)
    return WorkloadData(toy, made, [e for c in held_out for e in c])


def load_speech(model: str, corpus: str, seed: int, data_dir: Path, held: tuple[int, ...] | None) -> WorkloadData:
    """The speech workload: one client per synthetic training speaker, evaluated on held-out speakers.

    The corpus (of its training clients, those this process holds: `held`) is synthesized into
    `data_dir` on first use (with a progress bar) and reused after; the corpus has its own seed. A
    training client's audio is read when the client is first sampled (`LazyClients`), the held-out
    speakers' when first evaluated.
    """
    config = corpus_config(corpus)
    root = generate_corpus(config, data_dir, progress=True, clients=held, held_out=held is None)
    speakers = list(read_index(root)["splits"]["train"])
    training = LazyClients(speakers, lambda speaker: read_manifest(root / "train" / speaker / MANIFEST), held)

    def held_out() -> list[Any]:
        by_speaker = load_split(generate_corpus(config, data_dir, progress=True, clients=()), "test_speakers")
        return [u for utterances in by_speaker.values() for u in utterances]

    return WorkloadData(SpeechWorkload(model=model), training, LazyExamples(held_out))


def _prepare_speech(corpus: str, data_dir: Path, held: tuple[int, ...]) -> Path:
    return generate_corpus(corpus_config(corpus), data_dir, clients=held, held_out=False)


WORKLOADS: dict[str, WorkloadSpec] = {
    spec.name: spec
    for spec in (
        WorkloadSpec("toy", ("toy",), toy_clients, functools.partial(load_synthetic, ToyWorkload)),
        WorkloadSpec("noop", ("noop",), toy_clients, functools.partial(load_synthetic, NoopWorkload)),
        WorkloadSpec("speech", tuple(MODEL_PRESETS), lambda corpus: corpus_config(corpus).num_clients, load_speech,
                     CORPUS_PRESETS, _prepare_speech),
    )
}
"""Every workload, by name; `models()`, `workload_spec` and everything above them read it."""


def models() -> tuple[str, ...]:
    """Every model a registered workload serves, in registry order."""
    return tuple(m for spec in WORKLOADS.values() for m in spec.models)


def workload_spec(model: str) -> WorkloadSpec:
    """The registered workload that serves `model`.

    Raises:
        ValueError: no entry serves `model`, naming those that are served.
    """
    for spec in WORKLOADS.values():
        if model in spec.models:
            return spec
    raise ValueError(
        f"model={model!r} is not served by a registered workload: use one of {', '.join(models())}, or add its "
        "workload to infra.workloads.WORKLOADS (docs/extending.md)"
    )


def corpus_config(name: str) -> CorpusConfig:
    """The corpus preset `name` of a registered workload (the speech workload's "test" or "bench")."""
    corpora = {n: c for spec in WORKLOADS.values() for n, c in spec.corpora.items()}
    if name not in corpora:
        raise ValueError(f"corpus={name!r} is not a corpus preset: use one of {', '.join(corpora)}")
    return corpora[name]


def num_clients(config: ExperimentConfig) -> int:
    """Number of training clients the configuration's data has, without loading any."""
    return workload_spec(config.model).num_clients(config.corpus)


@functools.lru_cache(maxsize=4)
def load(model: str, corpus: str, seed: int, data_dir: str, clients: str = ALL) -> WorkloadData:
    """The workload and data for (model, corpus); cached for the life of the process.

    `clients` ("all", a list such as "0-3,7", or "none"): the training clients whose data this
    process holds (`infra.runs.RunRef.clients`).
    """
    spec = workload_spec(model)
    held = None if clients == ALL else parse_clients(clients, spec.num_clients(corpus))
    return spec.load(model, corpus, seed, Path(data_dir), held)


def load_for(config: ExperimentConfig, data_dir: Path, clients: str = ALL) -> WorkloadData:
    """`load` for a configuration."""
    return load(config.model, config.corpus, config.seed, str(data_dir), clients)


def _worker_workload(corpus: str | None) -> WorkloadSpec:
    """The first entry that reads corpus preset `corpus`, or (None) whose data comes from the seed."""
    if corpus is not None:
        corpus_config(corpus)  # raises naming the presets
    for spec in WORKLOADS.values():
        if (corpus in spec.corpora) if corpus is not None else not spec.corpora:
            return spec
    raise ValueError("no registered workload makes its data from the seed: pass --corpus")


def worker_clients(corpus: str | None, clients: str) -> tuple[int, ...]:
    """The clients `fedprune worker --corpus CORPUS --clients CLIENTS` stands for, checked against its
    workload's clients (without `--corpus`: the first entry whose data comes from the seed)."""
    return parse_clients(clients, _worker_workload(corpus).num_clients(corpus or "toy"))


def prepare_worker(corpus: str | None, data_dir: Path, served: tuple[int, ...]) -> Path | None:
    """Make the data of a worker's `served` clients under `data_dir`; where it is, or None when its
    workload has nothing to make (data from the seed)."""
    prepare = _worker_workload(corpus).prepare
    return None if prepare is None or corpus is None else prepare(corpus, data_dir, served)
