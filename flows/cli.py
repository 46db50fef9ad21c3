"""`fedprune`: run, resume and inspect federated pruning experiments, and manage the local stack.

Every command validates its input first; bad input prints one clear line and exits with code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from infra.settings import apply_quiet_defaults

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
apply_quiet_defaults(os.environ)  # before Prefect configures logging

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
stack_app = typer.Typer(help="The local stack on 127.0.0.1: Prefect server + UI, MLflow server + UI, SeaweedFS S3.",
                        no_args_is_help=True)
data_app = typer.Typer(help="Speech corpora.", no_args_is_help=True)
runs_app = typer.Typer(help="Runs in storage.", no_args_is_help=True)
cluster_app = typer.Typer(help="A Dask cluster whose workers stand for clients (docs/cluster.md).",
                          no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
app.add_typer(stack_app, name="stack")
app.add_typer(data_app, name="data")
app.add_typer(runs_app, name="runs")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _settings() -> Any:
    from infra.settings import Settings

    return Settings()


def parse_overrides(pairs: list[str], config_file: Path | None) -> dict[str, Any]:
    """`--set a.b=value` pairs (values parsed as JSON when they parse) over an optional JSON file."""
    overrides: dict[str, Any] = json.loads(config_file.read_text()) if config_file else {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r} must look like section.key=value, e.g. pruning.sparsity=0.3")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = overrides
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return overrides


def _run_flow(**params: Any) -> dict[str, Any]:
    from infra.prefect_api import ensure_prefect_api

    settings = _settings()
    api = ensure_prefect_api(settings)
    from flows.experiment import experiment

    result: dict[str, Any] = experiment(**params)
    ui = api.removesuffix("/api")
    typer.echo(json.dumps(result, indent=2))
    typer.echo(f"Prefect UI: {ui}  (flow runs)")
    typer.echo(f"MLflow: {settings.tracking_uri}  (browse: `mlflow ui --backend-store-uri {settings.tracking_uri}`"
               " or the stack's MLflow UI)")
    return result


@app.command()
def run(
    preset: Annotated[str, typer.Option(help="Named configuration: toy, tiny or small.")] = "tiny",
    set_: Annotated[list[str], typer.Option("--set", help="Override, e.g. --set pruning.sparsity=0.3")] = [],  # noqa: B006
    config: Annotated[Path | None, typer.Option(help="JSON file of nested overrides.", exists=True)] = None,
    run_id: Annotated[str | None, typer.Option(help="Run id (letters, digits, - and _); new if omitted.")] = None,
    experiment_name: Annotated[str, typer.Option("--experiment", help="MLflow experiment and storage folder.")]
    = "fedprune",
    rounds_per_segment: Annotated[int, typer.Option(help="Rounds per child flow run.")] = 100,
    checkpoint_every: Annotated[int, typer.Option(help="Commit a checkpoint every N rounds.")] = 10,
    keep_last: Annotated[int, typer.Option(help="Retention: keep the last K checkpoints ...")] = 3,
    keep_every: Annotated[int, typer.Option(help="... and every M-th round.")] = 1000,
    task_runner: Annotated[str, typer.Option(help="threads, processes or dask.")] = "threads",
    max_workers: Annotated[int, typer.Option(help="Concurrent client-train tasks.")] = 4,
    dask_address: Annotated[str | None, typer.Option(
        help="Scheduler of a Dask cluster whose workers stand for the clients (`fedprune worker`); "
             "with --task-runner dask.")] = None,
    insecure: Annotated[bool, typer.Option(help="Allow plain tcp:// to a non-loopback scheduler.")] = False,
) -> None:
    """Run a federated pruning experiment (or resume it, if RUN_ID exists with the same configuration)."""
    from infra.errors import InfraError

    try:
        overrides = parse_overrides(set_, config)
        _validate_run(preset, overrides, run_id, experiment_name, rounds_per_segment, checkpoint_every, keep_last,
                      keep_every, task_runner, max_workers, dask_address, insecure)
        _check_cluster(preset, overrides, dask_address)
    except (ValueError, OSError, InfraError) as e:
        _fail(str(e))
    _run_flow(preset=preset, overrides=overrides, run_id=run_id, experiment_name=experiment_name,
              rounds_per_segment=rounds_per_segment, checkpoint_every=checkpoint_every, keep_last=keep_last,
              keep_every=keep_every, task_runner=task_runner, max_workers=max_workers, dask_address=dask_address,
              insecure=insecure)


def _validate_run(
    preset: str, overrides: dict[str, Any], run_id: str | None, experiment_name: str, *numbers: Any
) -> None:
    """Everything that can be checked without side effects, before Prefect starts."""
    from fedprune_core.presets import preset as make_preset
    from infra.checkpoint import validate_run_id
    from infra.runs import RunOptions
    from infra.workloads import num_clients

    config = make_preset(preset, overrides)
    RunOptions(*numbers)
    if run_id is not None:
        validate_run_id(run_id)
    clients = num_clients(config)
    if config.federated.clients_per_round > clients:
        raise ValueError(
            f"federated.clients_per_round={config.federated.clients_per_round} exceeds the {clients} clients "
            f"available: lower it to at most {clients}"
        )
    storage = _check_services()
    if config.init_from:
        from infra.runs import warm_start_source

        warm_start_source(storage, experiment_name, config.init_from)


def _check_cluster(preset: str, overrides: dict[str, Any], dask_address: str | None) -> None:
    """With a cluster: its scheduler answers and a worker serves each client (the flow checks again)."""
    if dask_address is None:
        return
    from fedprune_core.presets import preset as make_preset
    from infra.cluster import check_served, connect, served_clients
    from infra.workloads import num_clients

    with connect(dask_address) as client:
        check_served(served_clients(client), num_clients(make_preset(preset, overrides)), dask_address)


def _check_services() -> Any:
    """The configured storage, once it and the tracking server answer."""
    from infra.storage import check_reachable, open_storage
    from infra.tracking import check_tracking_uri

    settings = _settings()
    storage = open_storage(settings.storage_url, settings.s3_endpoint_url)
    check_reachable(storage, create_bucket=True)
    check_tracking_uri(settings.tracking_uri)
    return storage


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(help="The run to resume.")],
    experiment_name: Annotated[str | None, typer.Option("--experiment", help="Its experiment, if ambiguous.")]
    = None,
) -> None:
    """Resume a run from its last committed checkpoint into the same MLflow run."""
    from infra.checkpoint import CheckpointStore, list_runs, validate_run_id
    from infra.errors import InfraError
    from infra.storage import open_storage

    try:
        validate_run_id(run_id)
        _check_services()
        settings = _settings()
        storage = open_storage(settings.storage_url, settings.s3_endpoint_url)
        found = [r for r in list_runs(storage, experiment_name) if r.run_id == run_id]
        if not found:
            raise ValueError(f"run_id={run_id!r} does not exist in {settings.storage_url}: see `fedprune runs list`")
        if len(found) > 1:
            raise ValueError(f"run_id={run_id!r} exists in several experiments: pass --experiment")
        stored = CheckpointStore(storage, found[0].experiment, run_id).read_config()
    except (ValueError, InfraError) as e:
        _fail(str(e))
    _run_flow(preset=stored["preset"], overrides=stored["overrides"], run_id=run_id,
              experiment_name=found[0].experiment, **stored["options"])


@app.command()
def sweep(
    name: Annotated[str, typer.Option(help="Sweep name: MLflow experiment, storage folder, run-id prefix.")] = "paper",
    warmup_rounds: Annotated[str, typer.Option(help="Rounds of each dense FedAvg warm-up stage, comma-separated.")]
    = "80,60",
    rounds: Annotated[int, typer.Option(help="Rounds of each variant after the warm-up.")] = 24,
    clients_per_round: Annotated[int, typer.Option(help="Clients sampled per round.")] = 4,
    local_steps: Annotated[int, typer.Option(help="Local steps per client and round.")] = 5,
    parallel: Annotated[int, typer.Option(help="Runs at once, one process each.")] = 2,
    threads_per_run: Annotated[int, typer.Option(help="Torch threads per run.")] = 1,
    out_dir: Annotated[Path | None, typer.Option(
        help="Where the table, CSV and plots go (default: $FEDPRUNE_HOME/results/NAME).")] = None,
    preset: Annotated[str, typer.Option(help="Configuration the runs override (small: the speech benchmark).")]
    = "small",
    only: Annotated[str, typer.Option(help="Comma-separated variant names to run (default: all).")] = "",
    warmup_from: Annotated[str, typer.Option(
        help="EXPERIMENT/RUN_ID of a finished warm-up (e.g. paper/paper-warmup2) to start from instead of "
             "running the warm-up.")] = "",
) -> None:
    """The paper's experiments on the speech benchmark (about 2.5-3 hours on 2 cores); skips finished runs."""
    from fedprune_core.presets import preset as make_preset
    from fedprune_core.sweep import paper_sweep
    from infra.checkpoint import validate_run_id
    from infra.errors import InfraError

    try:
        validate_run_id(name)
        selected = tuple(v for v in only.split(",") if v)
        try:
            stages = tuple(int(r) for r in warmup_rounds.split(","))
        except ValueError:
            raise ValueError(f"--warmup-rounds {warmup_rounds!r} must be integers with commas, e.g. 80,60") from None
        plan = paper_sweep(name, stages, rounds, clients_per_round, local_steps, preset=preset, only=selected,
                           warmup_from=warmup_from)
        for variant in (*plan.warmups, *plan.variants):
            make_preset(plan.preset, variant.overrides)
        if parallel < 1 or threads_per_run < 1:
            raise ValueError(f"--parallel {parallel} / --threads-per-run {threads_per_run} must be >= 1: pass 2 / 1")
        storage = _check_services()
        if warmup_from:
            from infra.runs import warm_start_source

            warm_start_source(storage, name, warmup_from)
    except (ValueError, InfraError) as e:
        _fail(str(e))
    from infra.prefect_api import ensure_prefect_api

    ensure_prefect_api(_settings())
    from flows.sweep import sweep as sweep_flow

    files = sweep_flow(name=name, warmup_rounds=list(stages), rounds=rounds, clients_per_round=clients_per_round,
                       local_steps=local_steps, parallel=parallel, threads_per_run=threads_per_run,
                       out_dir=str(out_dir) if out_dir else None, preset=preset, only=list(selected),
                       warmup_from=warmup_from)
    typer.echo(json.dumps(files, indent=2))


@runs_app.command("list")
def runs_list(experiment_name: Annotated[str | None, typer.Option("--experiment")] = None) -> None:
    """List runs in storage with their last committed round."""
    from infra.checkpoint import list_runs
    from infra.storage import open_storage

    settings = _settings()
    for r in list_runs(open_storage(settings.storage_url, settings.s3_endpoint_url), experiment_name):
        typer.echo(f"{r.experiment}\t{r.run_id}\tlatest round {r.latest_round}")


@stack_app.command("up")
def stack_up_cmd() -> None:
    """Start Prefect, MLflow and SeaweedFS on 127.0.0.1 and write an env file to source."""
    from infra.errors import InfraError
    from infra.stack import describe, stack_up, write_stack_env

    settings = _settings()
    try:
        statuses = stack_up(settings)
    except InfraError as e:
        _fail(str(e))
    typer.echo(json.dumps(describe(statuses), indent=2))
    typer.echo(f"To use it: source {write_stack_env(settings)}")


@stack_app.command("down")
def stack_down_cmd() -> None:
    """Stop the local stack."""
    from infra.stack import stack_down

    typer.echo(f"stopped: {', '.join(stack_down(_settings())) or 'nothing was running'}")


@stack_app.command("status")
def stack_status_cmd() -> None:
    """Show each service: running, healthy, pid, URL, log file."""
    from infra.stack import describe, stack_status

    typer.echo(json.dumps(describe(stack_status(_settings())), indent=2))


@data_app.command("generate")
def data_generate(
    corpus: Annotated[str, typer.Option(help="Corpus preset: test or bench.")] = "test",
    clients: Annotated[str, typer.Option(help="Training clients to synthesize: all, or e.g. 0-15,32.")] = "all",
    held_out: Annotated[bool, typer.Option(help="Also the held-out test speakers (the server's evaluation data).")]
    = True,
) -> None:
    """Synthesize a speech corpus (or some clients of it) with eSpeak NG into the cache (once; reused afterwards)."""
    from infra.cluster import parse_clients
    from infra.speech_data import generate_corpus
    from infra.workloads import corpus_config

    try:
        config = corpus_config(corpus)
        chosen = None if clients == "all" else parse_clients(clients, config.num_clients)
    except ValueError as e:
        _fail(str(e))
    path = generate_corpus(config, _settings().home / "data", clients=chosen, held_out=held_out)
    typer.echo(f"corpus {corpus!r} at {path}")


@app.command()
def worker(
    scheduler: Annotated[str, typer.Option(help="The Dask scheduler, e.g. tls://scheduler.example.org:8786.")],
    clients: Annotated[str, typer.Option(help="The clients this worker stands for: e.g. 0-15,32, or all.")],
    corpus: Annotated[str | None, typer.Option(
        help="Speech corpus preset (test, bench) whose clients' data the worker prepares; omit for the toy "
             "workloads, whose data comes from the seed.")] = None,
    name: Annotated[str | None, typer.Option(help="Unique worker name (default: HOST-clients-SPEC).")] = None,
    nthreads: Annotated[int, typer.Option(help="Concurrent tasks per worker process.")] = 1,
    nworkers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
    insecure: Annotated[bool, typer.Option(help="Allow plain tcp:// to a non-loopback scheduler.")] = False,
    death_timeout: Annotated[float | None, typer.Option(
        help="Seconds to wait for the scheduler before giving up (default: forever).")] = None,
) -> None:
    """Start a Dask worker that stands for CLIENTS and holds only their data, under this FEDPRUNE_HOME."""
    from infra.cluster import check_address, check_worker_security, format_clients, parse_clients, worker_argv
    from infra.errors import InfraError
    from infra.speech_data import generate_corpus
    from infra.workloads import TOY_CLIENTS, corpus_config

    try:
        address = check_address(scheduler, insecure)
        check_worker_security(address)
        config = corpus_config(corpus) if corpus else None
        served = parse_clients(clients, config.num_clients if config else TOY_CLIENTS)
        if not served:
            raise ValueError(f"--clients {clients!r} names no client: a worker stands for at least one")
    except (ValueError, InfraError) as e:
        _fail(str(e))
    if config is not None:  # prepared before joining, so the first round does not wait for synthesis
        path = generate_corpus(config, _settings().home / "data", clients=served, held_out=False)
        typer.echo(f"clients {format_clients(served)} of corpus {corpus!r} at {path}")
    import socket

    name = name or f"{socket.gethostname()}-clients-{format_clients(served)}"
    argv = worker_argv(address, served, name, nthreads, nworkers, death_timeout)
    sys.stdout.flush()
    os.execv(argv[0], argv)


@cluster_app.command("certs")
def cluster_certs(
    directory: Annotated[Path, typer.Argument(help="Where the CA, certificates and env files go.")],
    host: Annotated[list[str], typer.Option(help="Host name or IP to name in the certificates (repeatable).")]
    = [],  # noqa: B006
) -> None:
    """Make a CA and TLS certificates for the scheduler, the workers and the flow, with an env file per role."""
    from infra.certs import make_certificates

    files = make_certificates(directory, host or None)
    typer.echo(f"CA: {directory / 'ca.pem'} (keep {directory / 'ca-key.pem'} off the cluster)")
    for role, paths in files.items():
        typer.echo(f"{role}: source {paths.env}")


def main() -> None:
    """Console entry point."""
    app(sys.argv[1:])


if __name__ == "__main__":
    main()
