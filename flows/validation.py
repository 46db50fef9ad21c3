"""Every check of a run's input that writes nothing: one path and one wording for all callers.

The CLI calls `check_run` before it starts Prefect, so bad input costs one line on stderr and no
flow run; the experiment flow's `prepare` calls it again (a deployment's parameters never passed
the CLI) and writes only after it passed. The checks run cheapest first: the input alone
(configuration, options, names), then whether the services answer (on a cluster: that a worker
serves each client), then what storage holds (a warm start's source, an existing run's
configuration). Settings (`infra.settings.load_settings`) are checked where they are read.

No Prefect import here: the CLI reaches a verdict before Prefect's import and server start.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from fedprune_core.config import ExperimentConfig
from fedprune_core.presets import preset as make_preset
from infra.checkpoint import CheckpointStore, Recovery, validate_experiment, validate_run_id
from infra.runs import RunOptions, warm_start_source
from infra.settings import Settings
from infra.storage import Storage, check_reachable, open_storage
from infra.workloads import num_clients

SHOWN_DIFFERENCES = 4
"""Differing keys an error about an existing run shows (the count of the others follows)."""


@dataclass(frozen=True)
class CheckedRun:
    """A run's input after every check: what `prepare` needs to create or continue the run.

    Attributes:
        config: the validated configuration.
        run_id: the given run id, or a new one made from the configuration's name.
        record: what the run's config.json holds (an existing run's matches it).
        storage: the run's storage, reachable.
        recovery: where an existing run resumes (`CheckpointStore.plan_recovery`: the newest round that
            verifies, and the damaged rounds in its way); its `round_num` is None for a new run or one
            that committed nothing.
        existed: whether storage already holds a run with this id.
    """

    config: ExperimentConfig
    run_id: str
    record: dict[str, Any]
    storage: Storage
    recovery: Recovery
    existed: bool


def check_run(
    preset: str,
    overrides: dict[str, Any] | None,
    run_id: str | None,
    experiment_name: str,
    options: RunOptions,
    settings: Settings,
) -> CheckedRun:
    """Check everything about a run that can be checked without writing.

    Raises:
        ValueError and `infra.errors.InfraError`: one line naming the value, the rule and the fix.
    """
    config = check_request(preset, overrides, run_id, experiment_name)
    storage = check_services(settings)
    if options.dask_address:  # the cluster answers and serves every client
        from infra.cluster import check_cluster  # imports Dask: after the cheap checks

        check_cluster(options.dask_address, num_clients(config))
    if config.init_from:
        warm_start_source(storage, experiment_name, config.init_from)
    run_id = run_id or new_run_id(config.name)
    store = CheckpointStore(storage, experiment_name, run_id)
    record = {"experiment": config.to_dict(), "options": options.__dict__, "preset": preset,
              "overrides": overrides or {}}
    existed = store.exists()
    recovery = store.plan_recovery()  # UnrecoverableRunError: committed rounds, none verifies
    if recovery.round_num is not None:
        check_same_run(store.read_config(), record, run_id)
    return CheckedRun(config, run_id, record, storage, recovery, existed)


def check_request(
    preset: str, overrides: dict[str, Any] | None, run_id: str | None, experiment_name: str
) -> ExperimentConfig:
    """The checks that need nothing but the input; returns the configuration."""
    try:
        config = make_preset(preset, overrides)
    except TypeError as error:  # a value of a shape no validator expected, e.g. a number where pairs go
        raise ValueError(
            f"overrides {json.dumps(overrides)} hold a value of the wrong shape ({error}): give each key the "
            "shape of its default (see fedprune_core.config)"
        ) from None
    validate_experiment(experiment_name)
    if run_id is not None:
        validate_run_id(run_id)
    else:
        _check_name_makes_run_id(config.name)
    clients = num_clients(config)
    if config.federated.clients_per_round > clients:
        raise ValueError(
            f"federated.clients_per_round={config.federated.clients_per_round} exceeds the {clients} clients of "
            f"corpus {config.corpus!r}: lower it to at most {clients}"
        )
    return config


def new_run_id(name: str) -> str:
    """A new run's id: the configuration's name and 8 random hex digits."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def _check_name_makes_run_id(name: str) -> None:
    try:
        validate_run_id(new_run_id(name))
    except ValueError:
        raise ValueError(
            f"name={name!r} starts the new run's id, which must be 1-64 characters from [A-Za-z0-9_-]: set name "
            f"to at most {64 - len(new_run_id(''))} such characters, or pass a run id"
        ) from None


def check_services(settings: Settings) -> Storage:
    """The configured storage, once it and the tracking store answer.

    Creates the local storage directory (or S3 bucket) and the embedded MLflow database's directory
    when they are missing; writes nothing else.
    """
    from infra.tracking import check_tracking_uri  # imports MLflow: after the cheap checks

    storage = open_storage(settings.storage_url, settings.s3_endpoint_url)
    check_reachable(storage, create_bucket=True)
    check_tracking_uri(settings.tracking_uri)
    return storage


def check_same_run(stored: dict[str, Any], requested: dict[str, Any], run_id: str) -> None:
    """Raise ValueError naming the keys in which an existing run's configuration differs from `requested`."""
    requested = json.loads(json.dumps(requested))  # as stored: tuples become lists
    # A run stored before a configuration key existed has no entry for it: read it with today's
    # defaults, as the run itself does, so an upgrade does not make it unresumable.
    with_defaults = ExperimentConfig.from_dict(stored["experiment"]).to_dict()
    diffs = _differences(json.loads(json.dumps(with_defaults)), requested["experiment"])
    diffs += _differences(stored["options"], requested["options"], "options")
    if diffs:
        more = f" and {len(diffs) - SHOWN_DIFFERENCES} more" if len(diffs) > SHOWN_DIFFERENCES else ""
        raise ValueError(
            f"run_id={run_id!r} exists with a different configuration ({'; '.join(diffs[:SHOWN_DIFFERENCES])}"
            f"{more}): resume it with `fedprune resume {run_id}` (which reuses its stored configuration) or "
            "pick a new run id"
        )


def _differences(stored: Any, given: Any, key: str = "") -> list[str]:
    """Dotted keys where two nested dicts differ, each with both values."""
    if isinstance(stored, dict) and isinstance(given, dict):
        keys = sorted(set(stored) | set(given))
        return [d for k in keys for d in _differences(stored.get(k), given.get(k), f"{key}.{k}" if key else k)]
    return [] if stored == given else [f"{key}: {stored!r} stored, {given!r} given"]
