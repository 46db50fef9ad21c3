"""Crash-safe checkpoints of a federated pruning run, in the layout fixed by DESIGN.md.

```
<experiment>/<run_id>/config.json
<experiment>/<run_id>/rounds/<round:06d>/<name>.safetensors    state, masks, ... (any names)
<experiment>/<run_id>/rounds/<round:06d>/manifest.json          round, created, meta, sha256 + size
<experiment>/<run_id>/LATEST                                    {"round": N}, written last
<experiment>/<run_id>/final/<name>                              artifacts such as the compact model
<experiment>/<run_id>/damaged/<round:06d>-<reason>-<time>/...   rounds set aside by `recover`
```
A round is committed when its objects, then its manifest, then ``LATEST`` are written. A reader
verifies every sha256, so a crash at any point leaves the previous checkpoint readable and
nothing committed is lost.

Resuming goes through `CheckpointStore.recover`: it starts from the round ``LATEST`` names when
that round verifies, else (``LATEST`` missing, unreadable, or naming a damaged round) from the
newest round whose manifest and objects verify. Every round newer than that one which has files
is moved (copied, then deleted) to ``damaged/<round:06d>-<reason>-<UTC time>/``, an unreadable
``LATEST`` to ``damaged/latest-<UTC time>/LATEST``; then ``LATEST`` names the round resumed from,
so the resumed run commits forward as usual. A run with committed rounds of which none verifies
is never started over: `UnrecoverableRunError`, and nothing is moved.

Temporary files of interrupted writes (local storage's ``.tmp-*``) under the run are removed: all
of them by `recover` (no write of the run is running then), and those older than `TMP_MAX_AGE_S`
by `apply_retention`, which runs after every commit.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from infra.errors import CheckpointNotFoundError, CorruptCheckpointError, StorageKeyError, UnrecoverableRunError
from infra.storage import (
    Storage,
    get_json,
    json_bytes,
    put_json,
    remove_temporaries,
    sha256_hex,
    tensors_from_bytes,
    tensors_to_bytes,
    validate_key,
)

FORMAT_VERSION = 1
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_EXPERIMENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_ROUND_DIR_RE = re.compile(r"^rounds/(\d{6,})/")
_RESERVED_NAMES = frozenset({"manifest"})
_MANIFEST = "manifest.json"
TMP_MAX_AGE_S = 600.0
"""`apply_retention` removes temporary files of writes started longer ago than this (10 minutes)."""

if TYPE_CHECKING:  # torch is loaded with the first checkpoint object, not to list runs
    import torch

TensorGroups = dict[str, dict[str, "torch.Tensor"]]


@dataclass(frozen=True)
class Checkpoint:
    """One committed, verified round.

    Attributes:
        round_num: the round the state is at the end of.
        tensors: object name (e.g. "state", "masks") -> tensor name -> tensor.
        meta: the caller's dict given to `CheckpointStore.commit` (phase, rng state, MLflow run id ...).
    """

    round_num: int
    tensors: TensorGroups
    meta: dict[str, Any]


@dataclass(frozen=True)
class RunSummary:
    """A run found in storage: where it is and how far it got (None = no committed round)."""

    experiment: str
    run_id: str
    latest_round: int | None


@dataclass(frozen=True)
class DamagedRound:
    """A round newer than the one a run resumes from: `recover` sets it aside.

    Attributes:
        round_num: the round.
        reason: "checksum" (an object differs from its manifest), "missing-object", "bad-manifest"
            (unreadable or not describing the round), or "uncommitted" (no manifest, or a manifest
            LATEST never named: a commit that did not finish).
    """

    round_num: int
    reason: str


@dataclass(frozen=True)
class Recovery:
    """Where a run resumes (`CheckpointStore.plan_recovery`) and what stands in the way.

    Attributes:
        base: the run's key prefix, ``<experiment>/<run_id>``.
        round_num: the round LATEST names when it verifies, else the newest round that verifies;
            None when the run never committed a round.
        meta: that round's manifest meta (MLflow run id ...); {} when `round_num` is None.
        damaged: rounds newer than `round_num` that have files, ascending.
        latest: the round LATEST names; None when LATEST is missing or unreadable.
        latest_unreadable: LATEST exists but is not {"round": <int>}.
    """

    base: str
    round_num: int | None
    meta: dict[str, Any]
    damaged: tuple[DamagedRound, ...]
    latest: int | None
    latest_unreadable: bool

    @property
    def warning(self) -> str | None:
        """One line saying where the run resumes and what `recover` set aside; None if nothing was wrong."""
        latest = self._latest_problem()
        if not self.damaged and latest is None:
            return None
        if self.round_num is None:
            parts = [f"run {self.base!r} starts from round 0: none of its rounds was committed"]
        else:
            parts = [f"run {self.base!r} resumes from round {self.round_num}, the newest round that verifies"]
        aside = [f"round {d.round_num} ({d.reason})" for d in self.damaged]
        aside += ["LATEST"] if self.latest_unreadable else []
        parts += [latest] if latest else []
        parts += [f"set aside under {self.base}/damaged/: {', '.join(aside)}"] if aside else []
        return "; ".join(parts)

    def _latest_problem(self) -> str | None:
        if self.latest_unreadable:
            return "LATEST was unreadable"
        if self.latest == self.round_num:
            return None
        return "LATEST was missing" if self.latest is None else f"LATEST named round {self.latest}"


def validate_run_id(run_id: str) -> str:
    """Return `run_id` if it is 1-64 of [A-Za-z0-9_-], else raise ValueError naming it."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise ValueError(
            f"run_id={run_id!r} must be 1-64 characters from [A-Za-z0-9_-] (no '/', '.', spaces): "
            "pass e.g. 'run-2024-05-01_a'"
        )
    return run_id


def validate_experiment(experiment: str) -> str:
    """Return `experiment` if it is 1-128 of [A-Za-z0-9_.-] not starting with '.' or '-'."""
    if not isinstance(experiment, str) or not _EXPERIMENT_RE.match(experiment):
        raise ValueError(
            f"experiment={experiment!r} must be 1-128 characters from [A-Za-z0-9_.-], starting with a "
            "letter, digit or '_': pass e.g. 'librispeech-fp'"
        )
    return experiment


def _validate_object_name(name: str) -> str:
    if not isinstance(name, str) or not _RUN_ID_RE.match(name) or name in _RESERVED_NAMES:
        raise ValueError(
            f"checkpoint object name {name!r} must be 1-64 characters from [A-Za-z0-9_-] and not "
            f"{sorted(_RESERVED_NAMES)}: pass e.g. 'state' or 'masks'"
        )
    return name


def _validate_round(round_num: int) -> int:
    if isinstance(round_num, bool) or not isinstance(round_num, int) or round_num < 0:
        raise ValueError(f"round_num={round_num!r} must be an int >= 0: pass the round just finished")
    return round_num


class CheckpointStore:
    """Writes and reads the checkpoints of one run, `<experiment>/<run_id>/` in `storage`.

    Args:
        storage: where the objects live (local directory or S3).
        experiment: experiment name, one key segment, e.g. ``"librispeech-fp"``.
        run_id: run identifier, 1-64 of [A-Za-z0-9_-].
    """

    def __init__(self, storage: Storage, experiment: str, run_id: str) -> None:
        self.storage = storage
        self.experiment = validate_experiment(experiment)
        self.run_id = validate_run_id(run_id)
        self.base = f"{experiment}/{run_id}"

    def __repr__(self) -> str:
        return f"CheckpointStore({self.storage.url}/{self.base})"

    # ----------------------------------------------------------------- keys

    def round_prefix(self, round_num: int) -> str:
        """Key prefix of one round's directory, e.g. ``exp/run/rounds/000012/``."""
        return f"{self.base}/rounds/{round_num:06d}/"

    def object_key(self, round_num: int, name: str) -> str:
        """Key of one round's tensor object, e.g. ``exp/run/rounds/000012/masks.safetensors``."""
        return f"{self.round_prefix(round_num)}{name}.safetensors"

    def manifest_key(self, round_num: int) -> str:
        """Key of one round's manifest."""
        return f"{self.round_prefix(round_num)}manifest.json"

    @property
    def latest_key(self) -> str:
        """Key of the LATEST pointer."""
        return f"{self.base}/LATEST"

    @property
    def config_key(self) -> str:
        """Key of the run's configuration."""
        return f"{self.base}/config.json"

    # ----------------------------------------------------------------- config

    def exists(self) -> bool:
        """Return whether this run has a stored configuration."""
        return self.storage.exists(self.config_key)

    def write_config(self, config: dict[str, Any]) -> None:
        """Store the run's configuration; writing the same one again is a no-op. A run that never
        committed a round (it failed while starting) may be given a new configuration: nothing
        committed depends on the old one.

        Raises:
            ValueError: if a different configuration is stored for a run with committed rounds.
        """
        data = _json_roundtrip(config, "config")
        if self.exists() and self.latest_round() is not None:
            stored = self.read_config()
            if stored != data:
                changed = sorted(k for k in set(stored) | set(data) if stored.get(k) != data.get(k))
                raise ValueError(
                    f"run {self.base!r} has a different config (differing top-level keys: {changed}): "
                    "a run's config never changes; resume with the stored config or pick a new run_id"
                )
            return
        put_json(self.storage, self.config_key, data)

    def read_config(self) -> dict[str, Any]:
        """Return the stored configuration (`CheckpointNotFoundError` if none)."""
        try:
            config: dict[str, Any] = get_json(self.storage, self.config_key)
        except StorageKeyError:
            raise CheckpointNotFoundError(
                f"run {self.base!r} has no config.json in {self.storage.url}: check experiment and run_id "
                "(see list_runs), or start the run first"
            ) from None
        return config

    # ----------------------------------------------------------------- commit

    def commit(self, round_num: int, tensors: TensorGroups, meta: dict[str, Any]) -> None:
        """Commit one round: every object, then its manifest, then LATEST.

        Re-committing the round LATEST names with identical tensors is a no-op (a retried task).

        Args:
            round_num: the round the state is at the end of (>= 0).
            tensors: object name -> tensor name -> tensor; e.g. {"state": ..., "masks": ...}.
            meta: JSON-serializable dict stored in the manifest (phase, rng state, MLflow run id ...).

        Raises:
            ValueError: for bad names, non-JSON meta, a round older than LATEST (while LATEST still
                verifies), or the LATEST round again with different content.
        """
        _validate_round(round_num)
        meta = _json_roundtrip(meta, "meta")
        blobs = {_validate_object_name(name): tensors_to_bytes(group) for name, group in tensors.items()}
        objects = {name: {"sha256": sha256_hex(b), "size": len(b)} for name, b in blobs.items()}
        if self._is_repeat_commit(round_num, objects):
            return
        for name, blob in blobs.items():
            self.storage.put_bytes(self.object_key(round_num, name), blob)
        manifest = {
            "format": FORMAT_VERSION,
            "round": round_num,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "meta": meta,
            "objects": objects,
        }
        put_json(self.storage, self.manifest_key(round_num), manifest)
        put_json(self.storage, self.latest_key, {"round": round_num})

    def _is_repeat_commit(self, round_num: int, objects: dict[str, dict[str, Any]]) -> bool:
        latest = self._read_latest_or_none()
        if latest is None or round_num > latest or self._damage(latest) is not None:
            return False  # nothing committed yet, moving forward, or LATEST is damaged: write it.
        if round_num < latest:
            raise ValueError(
                f"round_num={round_num} is older than the committed LATEST={latest} of run {self.base!r}: "
                "checkpoints only move forward; resume the run (recover()) and commit later rounds"
            )
        if self._read_manifest(latest)["objects"] == objects:
            return True
        raise ValueError(
            f"round {round_num} of run {self.base!r} is already committed with different tensors: "
            "a committed round never changes; check that the run is deterministic or use a new run_id"
        )

    # ----------------------------------------------------------------- read

    def latest_round(self) -> int | None:
        """Return the round LATEST names, or None if no round was ever committed.

        Raises:
            CorruptCheckpointError: if LATEST exists but is not {"round": <int>}.
        """
        try:
            data = get_json(self.storage, self.latest_key)
        except StorageKeyError:
            return None
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("round"), int):
            raise CorruptCheckpointError(
                f"{self.storage.url}/{self.latest_key} is not {{'round': <int>}}: it was modified outside "
                f"fedprune; {_FALLBACK}",
                reason="bad-latest",
            )
        round_num: int = data["round"]
        return round_num

    def _read_latest_or_none(self) -> int | None:
        try:
            return self.latest_round()
        except CorruptCheckpointError:
            return None

    def load(self, round_num: int | None = None) -> Checkpoint:
        """Load and verify one committed round (default: the one LATEST names).

        Raises:
            CheckpointNotFoundError: nothing committed, or that round has no manifest.
            CorruptCheckpointError: naming the object that is missing, altered or unreadable.
        """
        if round_num is None:
            round_num = self.latest_round()
            if round_num is None:
                raise CheckpointNotFoundError(
                    f"run {self.base!r} in {self.storage.url} has no committed checkpoint (no LATEST): "
                    "start the run from scratch, or check experiment and run_id (see list_runs)"
                )
        manifest = self._read_manifest(_validate_round(round_num))
        tensors = {
            name: self._load_object(round_num, name, info) for name, info in manifest["objects"].items()
        }
        return Checkpoint(round_num=round_num, tensors=tensors, meta=manifest["meta"])

    def _read_manifest(self, round_num: int) -> dict[str, Any]:
        key = self.manifest_key(round_num)
        try:
            manifest = get_json(self.storage, key)
        except StorageKeyError:
            raise CheckpointNotFoundError(
                f"round {round_num} of run {self.base!r} was never committed (no {key}): "
                f"load a committed round; committed: {self.committed_rounds()}"
            ) from None
        except ValueError as error:
            raise CorruptCheckpointError(f"{key} is not valid JSON ({error}): {_FALLBACK}", "bad-manifest") from None
        if not _manifest_is_well_formed(manifest, round_num):
            raise CorruptCheckpointError(f"{key} does not describe round {round_num}: {_FALLBACK}", "bad-manifest")
        return manifest

    def _load_object(self, round_num: int, name: str, info: dict[str, Any]) -> dict[str, torch.Tensor]:
        return tensors_from_bytes(self._verified_bytes(round_num, name, info))

    def _verified_bytes(self, round_num: int, name: str, info: dict[str, Any]) -> bytes:
        key = self.object_key(round_num, name)
        try:
            data = self.storage.get_bytes(key)
        except StorageKeyError:
            raise CorruptCheckpointError(
                f"{key} is missing but its manifest lists it: {_FALLBACK}", "missing-object"
            ) from None
        digest = sha256_hex(data)
        if digest != info["sha256"] or len(data) != info["size"]:
            raise CorruptCheckpointError(
                f"{key} fails its check (sha256 {digest[:12]}.. size {len(data)}, manifest says "
                f"{info['sha256'][:12]}.. size {info['size']}): {_FALLBACK}",
                "checksum",
            )
        return data

    def _damage(self, round_num: int) -> str | None:
        """None when the round's manifest and every object it lists verify, else why not
        (a `DamagedRound.reason`)."""
        try:
            manifest = self._read_manifest(round_num)
            for name, info in manifest["objects"].items():
                self._verified_bytes(round_num, name, info)
        except CheckpointNotFoundError:
            return "uncommitted"
        except CorruptCheckpointError as error:
            return error.reason
        return None

    # ----------------------------------------------------------------- recovery

    def plan_recovery(self) -> Recovery:
        """Find the round a resumed run starts from, and the rounds in its way; changes nothing.

        The round LATEST names if it verifies, else the newest round whose manifest and objects
        verify. Rounds newer than it that have any file are `Recovery.damaged`.

        Raises:
            UnrecoverableRunError: the run has committed rounds (a manifest or LATEST exists) but none
                verifies; starting it over would mix two runs under one id.
        """
        latest, unreadable = self._latest_as_read()
        rounds = self._round_files()
        candidates = [latest] if latest is not None else []
        candidates += sorted((r for r, names in rounds.items() if _MANIFEST in names), reverse=True)
        recovered, damage = self._newest_verified(candidates)
        newer = sorted(r for r in rounds if recovered is None or r > recovered)
        damaged = tuple(DamagedRound(r, damage.get(r) or "uncommitted") for r in newer)
        committed = latest is not None or unreadable or any(_MANIFEST in rounds[r] for r in rounds)
        if recovered is None and committed:
            raise UnrecoverableRunError(self._unrecoverable(latest, unreadable, damaged))
        meta = self._read_manifest(recovered)["meta"] if recovered is not None else {}
        return Recovery(self.base, recovered, meta, damaged, latest, unreadable)

    def _newest_verified(self, candidates: list[int]) -> tuple[int | None, dict[int, str]]:
        """The first of `candidates` that verifies (None if none does), and why those before it failed."""
        damage: dict[int, str] = {}
        for round_num in candidates:
            reason = damage.get(round_num) or self._damage(round_num)
            if reason is None:
                return round_num, damage
            damage[round_num] = reason
        return None, damage

    def _latest_as_read(self) -> tuple[int | None, bool]:
        try:
            return self.latest_round(), False
        except CorruptCheckpointError:
            return None, True

    def _unrecoverable(self, latest: int | None, unreadable: bool, damaged: tuple[DamagedRound, ...]) -> str:
        pointer = "unreadable" if unreadable else "missing" if latest is None else f"round {latest}"
        found = ", ".join(f"{d.round_num} ({d.reason})" for d in damaged) or "none"
        return (
            f"run {self.base!r} in {self.storage.url} has committed rounds but none verifies (LATEST: {pointer}; "
            f"rounds: {found}): it is not started over and nothing was changed; restore "
            f"{self.base}/rounds/ from a backup, or start a new run under another run_id"
        )

    def recover(self, plan: Recovery | None = None) -> Recovery:
        """Make the run resumable from `plan` (default: `plan_recovery()`); returns the plan.

        Removes every temporary file of an interrupted write under the run (none of its writes is
        running when a run is opened), moves each damaged round (copied, then deleted) to
        ``damaged/<round:06d>-<reason>-<UTC time>/`` and an unreadable LATEST to
        ``damaged/latest-<UTC time>/LATEST``, then points LATEST at `plan.round_num`. Running it
        again changes nothing; a crash part-way leaves a state it finishes.

        Raises:
            UnrecoverableRunError: see `plan_recovery`.
        """
        remove_temporaries(self.storage, f"{self.base}/")
        plan = plan or self.plan_recovery()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for damaged in plan.damaged:
            prefix = self.round_prefix(damaged.round_num)
            self._set_aside(prefix, f"{damaged.round_num:06d}-{damaged.reason}-{stamp}")
        if plan.latest_unreadable:
            self._set_aside(self.latest_key, f"latest-{stamp}")
        if plan.round_num is not None and plan.latest != plan.round_num:
            put_json(self.storage, self.latest_key, {"round": plan.round_num})
        return plan

    def _set_aside(self, prefix: str, folder: str) -> None:
        """Copy every object under `prefix` to ``damaged/<folder>[-n]/``, then delete it (a manifest first,
        so a crash in between leaves an uncommitted round, never a committed one with objects gone)."""
        keys = self.storage.list_keys(prefix)
        target = f"{self.base}/damaged/{folder}"
        copies = 1
        while self.storage.list_keys(f"{target}/"):
            copies += 1
            target = f"{self.base}/damaged/{folder}-{copies}"
        start = prefix.rfind("/") + 1
        for key in keys:
            self.storage.put_bytes(f"{target}/{key[start:]}", self.storage.get_bytes(key))
        for key in sorted(keys, key=lambda k: not k.endswith(_MANIFEST)):
            self.storage.delete(key)

    def committed_rounds(self) -> list[int]:
        """Rounds that have a manifest (committed, or written but not yet named by LATEST), sorted."""
        return sorted(r for r, names in self._round_files().items() if _MANIFEST in names)

    def _round_files(self) -> dict[int, set[str]]:
        start = len(self.base) + 1
        rounds: dict[int, set[str]] = {}
        for key in self.storage.list_keys(f"{self.base}/rounds/"):
            match = _ROUND_DIR_RE.match(key[start:])
            if match:
                rounds.setdefault(int(match.group(1)), set()).add(key[start + match.end() :])
        return rounds

    # ----------------------------------------------------------------- retention

    def apply_retention(self, keep_last: int, keep_every: int) -> list[int]:
        """Delete old rounds, keeping the last `keep_last` committed and every `keep_every`-th.

        Never deletes LATEST's round nor any round newer than it (possibly being written, or
        left for `recover` to set aside); deletes nothing while LATEST is missing or unreadable.
        Uncommitted leftovers (no manifest) older than LATEST are deleted too, and so are temporary
        files of writes under the run started more than `TMP_MAX_AGE_S` ago.

        Args:
            keep_last: how many of the newest committed rounds to keep (>= 1).
            keep_every: also keep rounds that are multiples of this (0 = none).

        Returns:
            The deleted rounds, ascending.
        """
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be >= 1: the newest round is always kept")
        if keep_every < 0:
            raise ValueError(f"keep_every={keep_every} must be >= 0: pass 0 to keep no periodic rounds")
        remove_temporaries(self.storage, f"{self.base}/", older_than_s=TMP_MAX_AGE_S)
        latest = self._read_latest_or_none()
        if latest is None:
            return []
        rounds = self._round_files()
        committed = sorted(r for r, names in rounds.items() if _MANIFEST in names and r <= latest)
        keep = set(committed[-keep_last:]) | {latest}
        keep |= {r for r in committed if keep_every and r % keep_every == 0}
        doomed = sorted(r for r in rounds if r < latest and r not in keep)
        for round_num in doomed:
            # Manifest first: a crash mid-delete leaves an uncommitted leftover, never a corrupt round.
            self.storage.delete(self.manifest_key(round_num))
            self.storage.delete_prefix(self.round_prefix(round_num))
        return doomed

    # ----------------------------------------------------------------- artifacts

    def artifact_key(self, name: str) -> str:
        """Key of a run artifact, e.g. ``exp/run/final/model.safetensors``."""
        return validate_key(f"{self.base}/final/{name}")

    def put_artifact(self, name: str, data: bytes) -> None:
        """Store a run artifact (e.g. the exported compact model) under ``final/<name>``."""
        self.storage.put_bytes(self.artifact_key(name), data)

    def get_artifact(self, name: str) -> bytes:
        """Read a run artifact (`StorageKeyError` if missing)."""
        return self.storage.get_bytes(self.artifact_key(name))


def _manifest_is_well_formed(manifest: Any, round_num: int) -> bool:
    if not isinstance(manifest, dict) or manifest.get("round") != round_num:
        return False
    objects = manifest.get("objects")
    if not isinstance(objects, dict) or not isinstance(manifest.get("meta"), dict):
        return False
    return all(
        isinstance(info, dict) and isinstance(info.get("sha256"), str) and isinstance(info.get("size"), int)
        for info in objects.values()
    )


_FALLBACK = (
    "the checkpoint is damaged; resume falls back to the newest round that verifies and sets newer ones "
    "aside under damaged/"
)


def _json_roundtrip(obj: dict[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{what} must be a dict, got {type(obj).__name__}: pass a JSON-like dict")
    try:
        result: dict[str, Any] = json.loads(json_bytes(obj))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{what} is not JSON-serializable ({error}): store only str/int/float/bool/None/list/dict; "
            "convert tensors to lists or commit them as tensors"
        ) from None
    return result


def _is_run_dir(experiment: str, run_id: str) -> bool:
    return bool(_EXPERIMENT_RE.match(experiment) and _RUN_ID_RE.match(run_id))


def find_runs(storage: Storage, experiment: str | None = None) -> list[tuple[str, str]]:
    """(experiment, run_id) of the runs stored in `storage` (those with a config.json), sorted; reads no object.

    Args:
        storage: where runs live.
        experiment: only this experiment's runs; None for all.
    """
    prefix = f"{validate_experiment(experiment)}/" if experiment is not None else ""
    found = []
    for key in storage.list_keys(prefix):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "config.json" and _is_run_dir(parts[0], parts[1]):
            found.append((parts[0], parts[1]))
    return found


def list_runs(storage: Storage, experiment: str | None = None) -> list[RunSummary]:
    """Return the runs stored in `storage` (those with a config.json) with their latest committed round,
    sorted by experiment, run_id.

    Args:
        storage: where runs live.
        experiment: only this experiment's runs; None for all.
    """
    return [RunSummary(e, r, CheckpointStore(storage, e, r)._read_latest_or_none()) for e, r in
            find_runs(storage, experiment)]
