"""A run's storage: its configuration, the per-round work objects tasks exchange by key, and
its checkpoints. Tasks get a small `RunRef` and open everything else from it, once per process.

Work objects live under `<experiment>/<run_id>/work/<round:06d>/` and are deleted once a
checkpoint covers them; checkpoints are `infra.checkpoint`'s committed rounds. Work objects are
scratch: a crash loses them and the run recomputes them from the last checkpoint. With the
thread task runner every task of a run shares one process, so they stay in memory as tensors
(`TensorScratch`: nothing is serialized). With processes or Dask only the client-train tasks run
elsewhere, so only what crosses to and from them, the payloads down and the updates up, goes to
the run's storage as safetensors (`StoredScratch`); the server's own objects (state, scores,
masks) stay in the flow's memory (`SplitScratch`).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from fedprune_core.config import MAX_ROUNDS, ExperimentConfig
from fedprune_core.engine import ServerState, Strategy, init_state
from fedprune_core.participation import RoundParticipation
from fedprune_core.strategies import make_strategy
from fedprune_core.training import is_running_stat, model_state
from infra.checkpoint import CheckpointStore
from infra.cluster import check_address
from infra.errors import StorageKeyError
from infra.storage import (
    CachingStorage,
    Storage,
    get_json,
    open_storage,
    put_json,
    tensors_from_bytes,
    tensors_to_bytes,
)
from infra.workloads import WorkloadData, load_for

STATE_OBJECT = "state"


class Scratch(Protocol):
    """Where a run's tasks exchange work objects (tensors by key); a crash may lose them."""

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None: ...

    def get(self, key: str) -> dict[str, torch.Tensor]: ...

    def delete_prefix(self, prefix: str) -> None: ...

    def moved_bytes(self, key: str) -> int:
        """Bytes the last put or get of `key` moved through storage (0 in memory); asked once."""
        ...


class TensorScratch:
    """Work objects as tensors in this process's memory (the thread task runner).

    Tensors are copied in and out, so a task that changes its input in place changes no other
    task's input, as with stored objects; a copy costs a fraction of a safetensors round trip.
    """

    url = "memory://scratch"

    def __init__(self) -> None:
        self._items: dict[str, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        copy = {name: t.detach().clone() for name, t in tensors.items()}
        with self._lock:
            self._items[key] = copy

    def get(self, key: str) -> dict[str, torch.Tensor]:
        with self._lock:
            item = self._items.get(key)
        if item is None:
            raise StorageKeyError(key, self.url)
        return {name: t.clone() for name, t in item.items()}

    def delete_prefix(self, prefix: str) -> None:
        with self._lock:
            for key in [k for k in self._items if k.startswith(prefix)]:
                del self._items[key]

    def moved_bytes(self, key: str) -> int:
        return 0


class StoredScratch:
    """Work objects as safetensors in the run's storage (process and Dask task runners)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._moved: dict[str, int] = {}  # key -> bytes of its last put or get, until asked or deleted

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        data = tensors_to_bytes(tensors)
        self.storage.put_bytes(key, data)
        self._moved[key] = len(data)

    def get(self, key: str) -> dict[str, torch.Tensor]:
        data = self.storage.get_bytes(key)
        self._moved[key] = len(data)
        return tensors_from_bytes(data)

    def delete_prefix(self, prefix: str) -> None:
        self.storage.delete_prefix(prefix)
        for key in [k for k in list(self._moved) if k.startswith(prefix)]:
            self._moved.pop(key, None)

    def moved_bytes(self, key: str) -> int:
        return self._moved.pop(key, 0)


CROSSING = ("payload-", "update-")
"""Work objects (by name prefix) that cross between the flow's process and the client-train tasks."""


class SplitScratch:
    """Payloads and updates in the run's storage (they cross to other processes), the rest in memory."""

    def __init__(self, storage: Storage) -> None:
        self.memory = TensorScratch()
        self.stored = StoredScratch(storage)

    def _of(self, key: str) -> Scratch:
        return self.stored if key.rpartition("/")[2].startswith(CROSSING) else self.memory

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        self._of(key).put(key, tensors)

    def get(self, key: str) -> dict[str, torch.Tensor]:
        return self._of(key).get(key)

    def delete_prefix(self, prefix: str) -> None:
        self.memory.delete_prefix(prefix)
        self.stored.delete_prefix(prefix)

    def moved_bytes(self, key: str) -> int:
        return self._of(key).moved_bytes(key)


@dataclass(frozen=True)
class RunRef:
    """Everything a task needs to find a run: small, JSON-friendly, safe to log (no credentials).

    Attributes:
        storage_url, s3_endpoint_url: the run's storage.
        experiment, run_id: the run.
        data_dir: where the process that opens the run keeps its data.
        clients: the training clients whose data that process holds: "all", a list such as
            "0-3,7" (a cluster worker's own, `infra.cluster.local_ref`) or "none" (the flow's
            process when a cluster's workers hold the clients).
    """

    storage_url: str
    s3_endpoint_url: str | None
    experiment: str
    run_id: str
    data_dir: str
    clients: str = "all"


MAX_WORKERS = 1024
"""Concurrent client-train tasks of a run at most (threads or processes of one machine, or Dask workers)."""
TASK_RUNNERS: tuple[str, ...] = ("threads", "processes", "dask")
_OPTION_LIMITS: dict[str, tuple[int, str]] = {
    "rounds_per_segment": (MAX_ROUNDS, "MAX_ROUNDS"), "checkpoint_every": (MAX_ROUNDS, "MAX_ROUNDS"),
    "keep_last": (MAX_ROUNDS, "MAX_ROUNDS"), "keep_every": (MAX_ROUNDS, "MAX_ROUNDS"),
    "max_workers": (MAX_WORKERS, "MAX_WORKERS"),
}
"""The upper bound of each integer option, with its name."""


@dataclass(frozen=True)
class RunOptions:
    """How a run is orchestrated (not part of the experiment's result).

    Attributes:
        rounds_per_segment: rounds per child flow run.
        checkpoint_every: commit a checkpoint every this many rounds (and at each segment end).
        keep_last, keep_every: checkpoint retention (the last K, and every M-th round).
        task_runner: "threads", "processes" or "dask".
        max_workers: concurrent client-train tasks (a local runner's size; a cluster has its own).
        dask_address: the scheduler of an existing Dask cluster whose workers stand for the clients
            (`fedprune worker`); None starts a local cluster for task_runner "dask".
        insecure: allow plain tcp:// to a non-loopback scheduler (`infra.cluster.check_address`).
    """

    rounds_per_segment: int = 100
    checkpoint_every: int = 10
    keep_last: int = 3
    keep_every: int = 1000
    task_runner: str = "threads"
    max_workers: int = 4
    dask_address: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        for name, (limit, limit_name) in _OPTION_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                default = next(f.default for f in fields(self) if f.name == name)
                raise ValueError(
                    f"{name}={value!r} must be an integer in [1, {limit}] ({limit_name}): pass e.g. {default}"
                )
        if self.task_runner not in TASK_RUNNERS:
            raise ValueError(
                f"task_runner={self.task_runner!r} is not known: use one of {', '.join(TASK_RUNNERS)}"
            )
        if self.dask_address is not None:
            if self.task_runner != "dask":
                raise ValueError(
                    f"dask_address={self.dask_address!r} needs task_runner='dask', not {self.task_runner!r}: "
                    "pass --task-runner dask"
                )
            check_address(self.dask_address, self.insecure)


class Run:
    """One run's storage, configuration, workload and strategy (open with `open_run`)."""

    def __init__(self, ref: RunRef) -> None:
        self.ref = ref
        self.storage: Storage = CachingStorage(open_storage(ref.storage_url, ref.s3_endpoint_url))
        self.checkpoints = CheckpointStore(self.storage, ref.experiment, ref.run_id)
        stored = self.checkpoints.read_config()
        self.config = ExperimentConfig.from_dict(stored["experiment"])
        self.options = RunOptions(**stored["options"])
        threads = self.options.task_runner == "threads"
        self.scratch: Scratch = TensorScratch() if threads else SplitScratch(self.storage)
        self.data: WorkloadData = load_for(self.config, Path(ref.data_dir), ref.clients)
        self.strategy: Strategy = make_strategy(self.config, self._template())

    def _template(self) -> nn.Module:
        return self.data.workload.build_model()

    def work_key(self, round_num: int, name: str) -> str:
        return f"{self.ref.experiment}/{self.ref.run_id}/work/{round_num:06d}/{name}.safetensors"

    def put(self, round_num: int, name: str, tensors: dict[str, torch.Tensor]) -> str:
        """Store a work object and return its key."""
        key = self.work_key(round_num, name)
        self.scratch.put(key, tensors)
        return key

    def get(self, key: str) -> dict[str, torch.Tensor]:
        """A work object or a checkpoint object."""
        if "/work/" in key:
            return self.scratch.get(key)
        return tensors_from_bytes(self.storage.get_bytes(key))

    def state(self, key: str, round_num: int) -> ServerState:
        """The server state after `round_num`, stored at `key` (work object or checkpoint)."""
        return ServerState.from_flat(round_num, self.get(key))

    def get_or(self, key: str | None, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The object at `key`, or `own` when there is none (a round that keeps the state's scores
        and masks passes no keys)."""
        return own if key is None else self.get(key)

    def participation_key(self, round_num: int) -> str:
        """Key of the record of a round that left clients out."""
        return f"{self._participation_prefix}{round_num:06d}.json"

    @property
    def _participation_prefix(self) -> str:
        return f"{self.ref.experiment}/{self.ref.run_id}/participation/"

    @functools.cached_property
    def _recorded_rounds(self) -> set[int]:
        """The rounds with a participation record: listed once per process (the flow's, where dispatch
        and aggregate run), then kept up to date by `record_participation`, so a round costs no read."""
        keys = self.storage.list_keys(self._participation_prefix)
        return {int(k.rsplit("/", 1)[1].removesuffix(".json")) for k in keys if k.endswith(".json")}

    def record_participation(self, participation: RoundParticipation) -> None:
        """Keep who took part in a round that left a client out (before the round is aggregated), so
        the round, run again after a resume, trains the same clients. Complete rounds write nothing."""
        if not participation.complete:
            put_json(self.storage, self.participation_key(participation.round_num), participation.to_json())
            self._recorded_rounds.add(participation.round_num)

    def recorded_participation(self, round_num: int) -> RoundParticipation | None:
        """The record of `round_num` if an earlier run of it left a client out."""
        if round_num not in self._recorded_rounds:
            return None
        try:
            return RoundParticipation.from_json(get_json(self.storage, self.participation_key(round_num)))
        except StorageKeyError:
            return None

    def participation_records(self) -> list[RoundParticipation]:
        """Every round of the run that left a client out, in round order."""
        return [r for r in map(self.recorded_participation, sorted(self._recorded_rounds)) if r is not None]

    def record_placement(self, last_round: int, rows: list[dict[str, Any]]) -> None:
        """Keep where the client-train tasks of the rounds up to `last_round` since the previous record
        ran (`infra.cluster.placement_row`). Written just before the checkpoint of `last_round` commits:
        a crash before the commit reruns those rounds, whose record then replaces this one."""
        put_json(self.storage, f"{self._placement_prefix()}{last_round:06d}.json", {"rows": rows})

    def placement_rows(self, last_round: int) -> list[dict[str, Any]]:
        """Every placement row recorded for rounds up to `last_round`."""
        keys = self.storage.list_keys(self._placement_prefix())
        records = [get_json(self.storage, k) for k in keys if k.endswith(".json")]
        rows = {(row["round"], row["client"]): row for record in records for row in record["rows"]}
        return [row for (round_num, _), row in sorted(rows.items()) if round_num <= last_round]

    def _placement_prefix(self) -> str:
        return f"{self.ref.experiment}/{self.ref.run_id}/placement/"

    def checkpoint_key(self, round_num: int) -> str:
        return self.checkpoints.object_key(round_num, STATE_OBJECT)

    def initial_state(self) -> ServerState:
        """Round 0 before the strategy's set-up: the seeded model, or `config.init_from`'s last weights."""
        if not self.config.init_from:
            return init_state(self.data.workload, self.config.seed)
        source = warm_start_source(self.storage, self.ref.experiment, self.config.init_from)
        checkpoint = source.load()
        weights = ServerState.from_flat(checkpoint.round_num, checkpoint.tensors[STATE_OBJECT]).weights
        template = model_state(self._template())
        # a run from before running statistics were federated has none: start them from the template's
        weights.update({n: t for n, t in template.items() if is_running_stat(n) and n not in weights})
        expected = {n: t.shape for n, t in template.items()}
        got = {n: t.shape for n, t in weights.items()}
        if got != expected:
            diff = sorted(set(got) ^ set(expected)) or sorted(n for n in got if got[n] != expected[n])
            raise ValueError(
                f"init_from={self.config.init_from!r} holds a different model ({', '.join(diff[:3])} differ): "
                f"warm-start from a run of model {self.config.model!r}"
            )
        return ServerState(0, weights)

    def commit(self, state: ServerState, meta: dict[str, Any]) -> str:
        """Commit `state` as a checkpoint, apply retention, drop covered work objects."""
        self.checkpoints.commit(state.round_num, {STATE_OBJECT: state.flat()}, meta)
        self.checkpoints.apply_retention(self.options.keep_last, self.options.keep_every)
        self.scratch.delete_prefix(f"{self.ref.experiment}/{self.ref.run_id}/work/")
        return self.checkpoint_key(state.round_num)


def warm_start_source(storage: Storage, experiment: str, init_from: str) -> CheckpointStore:
    """The run `init_from` ("RUN_ID" in `experiment`, or "EXPERIMENT/RUN_ID") names, checked to hold a
    committed checkpoint.

    Raises:
        ValueError: naming the run when it does not exist or has nothing committed.
    """
    source_experiment, _, source_run = init_from.rpartition("/")
    try:
        store = CheckpointStore(storage, source_experiment or experiment, source_run)
    except ValueError as error:  # the store's own rules for experiment and run names
        raise ValueError(f"init_from={init_from!r}: {error}") from None
    if store.latest_round() is None:
        raise ValueError(
            f"init_from={init_from!r}: no committed checkpoint of run {store.base!r} in {storage.url}: "
            "finish (or resume) that run first, or name another from `fedprune runs list`"
        )
    return store


@functools.lru_cache(maxsize=8)
def open_run(ref: RunRef) -> Run:
    """The `Run` for `ref`, opened once per process."""
    return Run(ref)
