"""`fedprune`: run, resume and inspect federated pruning experiments, and manage the local stack.

Every command validates its input first; bad input prints one clear line and exits with code 2.
`run` and `resume` end with a summary on stdout (one JSON object with ``--json``); logs go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer._click.exceptions import NoArgsIsHelpError  # typer 0.29 vendors click; pinned in pyproject.toml

from infra.settings import Settings, apply_quiet_defaults

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
apply_quiet_defaults(os.environ)  # before Prefect configures logging

HELP = {"help_option_names": ["-h", "--help"]}  # every command's context inherits it
app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  context_settings=HELP)
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


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        typer.echo(f"fedprune {version('fedprune')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    pass


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


OutageBudget = Annotated[float | None, typer.Option(
    "--outage-budget", help="Seconds to wait for unreachable storage, MLflow or Prefect API before stopping "
    "resumably (default: FEDPRUNE_OUTAGE_BUDGET_S, else 300).")]


def _set_outage_budget(seconds: float | None) -> None:
    """`--outage-budget`: FEDPRUNE_OUTAGE_BUDGET_S for this process and the task processes it starts."""
    if seconds is None:
        return
    if seconds < 0:
        raise ValueError(f"--outage-budget {seconds:g} must be >= 0 seconds: pass e.g. 300")
    os.environ["FEDPRUNE_OUTAGE_BUDGET_S"] = str(seconds)


def _settings() -> Settings:
    """The settings, or exit 2 with one line naming the bad variable."""
    from infra.settings import load_settings

    try:
        return load_settings()
    except ValueError as e:
        _fail(str(e))


OVERRIDES_EXAMPLE = '{"pruning": {"sparsity": 0.3}}'
_JSON_KINDS: dict[type, str] = {list: "an array", str: "a string", int: "a number", float: "a number",
                                bool: "a boolean", type(None): "null"}


def parse_overrides(pairs: list[str], config_file: Path | None) -> dict[str, Any]:
    """`--set a.b=value` pairs (values parsed as JSON when they parse) over an optional JSON file."""
    overrides = read_config_file(config_file) if config_file else {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        *parents, leaf = key.split(".")
        if not sep or "" in (*parents, leaf):
            raise ValueError(f"--set {pair!r} must look like section.key=value, e.g. pruning.sparsity=0.3")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = overrides
        for depth, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                section = ".".join(parents[: depth + 1])
                raise ValueError(
                    f"--set {pair!r} sets a key inside {section!r}, which is a value ({node!r}), not a section: "
                    f"set {section}=... itself, or a key of a section such as pruning.sparsity=0.3"
                )
        node[leaf] = value
    return overrides


def read_config_file(path: Path) -> dict[str, Any]:
    """The nested overrides in a `--config` JSON file (one object), or ValueError naming the file and the fix."""
    fix = f"it must hold one JSON object of nested overrides, e.g. {OVERRIDES_EXAMPLE}"
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise ValueError(f"--config {str(path)!r} cannot be read ({reason}): pass a readable file; {fix}") from None
    if not text.strip():
        raise ValueError(f"--config {str(path)!r} is empty: {fix}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"--config {str(path)!r} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}): "
            f"fix the file; {fix}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {str(path)!r} holds {_JSON_KINDS.get(type(data), 'a value')}, not an object: {fix}")
    return data


def _prefect_api(settings: Settings) -> str:
    """The Prefect API URL (a local server is started or shared on demand), or exit 2 with one line."""
    from infra.errors import InfraError
    from infra.prefect_api import ensure_prefect_api

    try:
        return ensure_prefect_api(settings)
    except (ValueError, InfraError) as e:
        _fail(str(e))


AsJson = Annotated[bool, typer.Option(
    "--json", help="Print the summary as one JSON object (flows.summary.FIELDS): nothing else on stdout.")]


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """While the flow runs, what is written to stdout (MLflow's "View run" lines, task processes) goes to
    stderr, so stdout holds only the command's result."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _run_flow(as_json: bool, **params: Any) -> dict[str, Any]:
    """Run the experiment flow; print its summary (text, or one JSON object) on stdout, logs on stderr."""
    settings = _settings()
    from infra.interrupt import install as install_interrupt
    from infra.outage import OutageError, configured_budget_s, find_outage, hide_outage_errors
    from infra.prefect_api import api_is_ours, prefect_api_lost, wait_for_prefect_api
    from infra.stores import describe

    ours = api_is_ours(settings)
    api = _prefect_api(settings)
    typer.echo(describe(settings)[0], err=True)  # which store this run goes to (`fedprune runs list` says more)
    from fedprune_core.participation import RoundFailedError
    from fedprune_core.presets import preset as make_preset
    from flows.experiment import experiment
    from flows.validation import new_run_id

    run_id = params["run_id"] = params["run_id"] or new_run_id(make_preset(params["preset"], params["overrides"]).name)
    name = params["experiment_name"]
    command = f"fedprune resume {run_id}" + ("" if name == "fedprune" else f" --experiment {name}")
    hide_outage_errors()
    install_interrupt()
    while True:
        try:
            with _stdout_to_stderr():
                result: dict[str, Any] = experiment(**params)
            break
        except KeyboardInterrupt:
            typer.secho(f"interrupted: run {run_id} stopped at its last checkpoint; to go on: `{command}`",
                        fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(130) from None
        except RoundFailedError as error:
            typer.secho(f"error: {error}: `{command}`", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        except Exception as error:
            outage = find_outage(error)
            if outage is None and prefect_api_lost(error, api):
                typer.secho(f"the Prefect API at {api} went away ({type(error).__name__}): run {run_id} goes on from "
                            "its last checkpoint once it answers", fg=typer.colors.YELLOW, err=True)
                try:
                    wait_for_prefect_api(settings, api, ours, configured_budget_s())
                    continue
                except OutageError as lost:
                    outage = lost
            if outage is None:
                raise
            typer.secho(f"error: {outage}; run {run_id} stopped at its last checkpoint: once it is back, "
                        f"`{command}`", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
    from flows.summary import as_text

    typer.echo(json.dumps(result) if as_json else as_text(result))
    return result


@app.command()
def run(
    preset: Annotated[str, typer.Option(help="Named configuration: toy, tiny or small.")] = "tiny",
    set_: Annotated[list[str], typer.Option("--set", help="Override, e.g. --set pruning.sparsity=0.3")] = [],  # noqa: B006
    config: Annotated[Path | None, typer.Option(help="JSON file of nested overrides.")] = None,
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
    outage_budget: OutageBudget = None,
    as_json: AsJson = False,
) -> None:
    """Run a federated pruning experiment (or resume it, if RUN_ID exists with the same configuration)."""
    from flows.validation import check_run
    from infra.errors import InfraError
    from infra.runs import RunOptions

    try:
        _set_outage_budget(outage_budget)
        settings = _settings()
        overrides = parse_overrides(set_, config)
        options = RunOptions(rounds_per_segment, checkpoint_every, keep_last, keep_every, task_runner, max_workers,
                             dask_address, insecure)
        checked = check_run(preset, overrides, run_id, experiment_name, options, settings)
    except (ValueError, OSError, InfraError) as e:
        _fail(str(e))
    # the run id is fixed here (made now for a new run), so a run the CLI starts again after an outage resumes it
    _run_flow(as_json, preset=preset, overrides=overrides, run_id=checked.run_id, experiment_name=experiment_name,
              **options.__dict__)


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(help="The run to resume.")],
    experiment_name: Annotated[str | None, typer.Option("--experiment", help="Its experiment, if ambiguous.")]
    = None,
    outage_budget: OutageBudget = None,
    as_json: AsJson = False,
) -> None:
    """Resume a run from its newest checkpoint that verifies (newer, damaged ones are set aside) into the same
    MLflow run."""
    from flows.validation import check_run, check_services
    from infra.checkpoint import CheckpointStore, find_runs, validate_run_id
    from infra.errors import InfraError
    from infra.runs import RunOptions

    try:
        _set_outage_budget(outage_budget)
        settings = _settings()
        validate_run_id(run_id)
        storage = check_services(settings)
        found = [experiment for experiment, r in find_runs(storage, experiment_name) if r == run_id]
        if not found:
            raise ValueError(f"run_id={run_id!r} does not exist in {settings.storage_url}: see `fedprune runs list`")
        if len(found) > 1:
            raise ValueError(f"run_id={run_id!r} exists in several experiments: pass --experiment")
        stored = CheckpointStore(storage, found[0], run_id).read_config()
        options = RunOptions(**stored["options"])
        check_run(stored["preset"], stored["overrides"], run_id, found[0], options, settings)
    except (ValueError, OSError, InfraError) as e:
        _fail(str(e))
    _run_flow(as_json, preset=stored["preset"], overrides=stored["overrides"], run_id=run_id,
              experiment_name=found[0], **stored["options"])


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
    from flows.validation import check_request, check_services
    from infra.checkpoint import validate_experiment, validate_run_id
    from infra.errors import InfraError
    from infra.runs import MAX_WORKERS

    try:
        settings = _settings()
        validate_run_id(name)
        validate_experiment(name)
        make_preset(preset)  # its name, before the sweep reads its model
        selected = tuple(v for v in only.split(",") if v)
        try:
            stages = tuple(int(r) for r in warmup_rounds.split(","))
        except ValueError:
            raise ValueError(f"--warmup-rounds {warmup_rounds!r} must be integers with commas, e.g. 80,60") from None
        plan = paper_sweep(name, stages, rounds, clients_per_round, local_steps, preset=preset, only=selected,
                           warmup_from=warmup_from)
        for variant in (*plan.warmups, *plan.variants):
            check_request(plan.preset, variant.overrides, plan.run_id(variant), name)
        if not (1 <= parallel <= MAX_WORKERS and 1 <= threads_per_run <= MAX_WORKERS):
            raise ValueError(
                f"--parallel {parallel} / --threads-per-run {threads_per_run} must be in [1, {MAX_WORKERS}] "
                "(MAX_WORKERS): pass 2 / 1"
            )
        if out_dir is not None:
            _check_out_dir(out_dir)
        storage = check_services(settings)
        if warmup_from:
            from infra.runs import warm_start_source

            warm_start_source(storage, name, warmup_from)
    except (ValueError, InfraError) as e:
        _fail(str(e))
    _prefect_api(settings)
    from flows.sweep import sweep as sweep_flow

    files = sweep_flow(name=name, warmup_rounds=list(stages), rounds=rounds, clients_per_round=clients_per_round,
                       local_steps=local_steps, parallel=parallel, threads_per_run=threads_per_run,
                       out_dir=str(out_dir) if out_dir else None, preset=preset, only=list(selected),
                       warmup_from=warmup_from)
    typer.echo(json.dumps(files, indent=2))


@app.command()
def compare(
    name: Annotated[str, typer.Option(help="MLflow experiment, storage folder and run-id prefix.")] = "compare",
    rounds: Annotated[int, typer.Option(help="Rounds of each run, from scratch.")] = 32,
    seeds: Annotated[str, typer.Option(help="Paired seeds, comma-separated.")] = "0,1,2,3,4",
    budgets: Annotated[str, typer.Option(help="Client download budgets (shares of dense), comma-separated.")]
    = "0.75,0.5,0.35",
    parallel: Annotated[int, typer.Option(help="Runs at once, one process each.")] = 2,
    threads_per_run: Annotated[int, typer.Option(help="Torch threads per run.")] = 1,
    last_evals: Annotated[int, typer.Option(help="A run's WER: the mean of its last this many evaluations.")] = 3,
    out_dir: Annotated[Path | None, typer.Option(
        help="Where the report goes (default: $FEDPRUNE_HOME/results/NAME).")] = None,
) -> None:
    """FP, Federated Dropout and PruneFL at matched client budgets over paired seeds, with intervals;
    skips finished runs, resumes the others."""
    from flows.validation import check_request, check_services
    from infra.checkpoint import validate_experiment, validate_run_id
    from infra.errors import InfraError
    from infra.runs import MAX_WORKERS

    try:
        settings = _settings()
        validate_run_id(name)
        validate_experiment(name)
        seed_list = _numbers(seeds, int, "--seeds", "0,1,2,3,4")
        budget_list = _numbers(budgets, float, "--budgets", "0.75,0.5,0.35")
        if not all(0.0 < b < 1.0 for b in budget_list):
            raise ValueError(f"--budgets {budgets!r}: each must be a share of dense in (0, 1), e.g. 0.75,0.5,0.35")
        if not (1 <= parallel <= MAX_WORKERS and 1 <= threads_per_run <= MAX_WORKERS and last_evals >= 1):
            raise ValueError(f"--parallel {parallel} / --threads-per-run {threads_per_run} must be in "
                             f"[1, {MAX_WORKERS}] (MAX_WORKERS) and --last-evals {last_evals} >= 1: pass 2 / 1 / 3")
        from fedprune_core.budgets import Knobs
        from fedprune_core.sweep import compare_sweep, fd_lr_pilot, sgd_lr_pilot
        from flows.sweep import compare_knobs, middle_knobs

        # every run the flow may start, with stand-in knobs: rounds, seeds and run ids are checked in
        # a moment; the knobs themselves (seconds of bisection) only after
        stand_in = [Knobs(b, 0.5, 0.5, 0.5, 0.5) for b in budget_list]
        plan, _ = compare_sweep(name, rounds, tuple(seed_list), stand_in)
        for variant in (*plan.variants, *fd_lr_pilot(name, rounds, 0.5), *sgd_lr_pilot(name, rounds, 0.5)):
            check_request(plan.preset, variant.overrides, plan.run_id(variant), name)
        if out_dir is not None:
            _check_out_dir(out_dir)
        check_services(settings)
        middle_knobs(compare_knobs(tuple(budget_list)))  # Federated Dropout reaches the middle budget
    except (ValueError, InfraError) as e:
        _fail(str(e))
    _prefect_api(settings)
    from flows.sweep import compare as compare_flow

    files = compare_flow(name=name, rounds=rounds, seeds=seed_list, budgets=budget_list, parallel=parallel,
                         threads_per_run=threads_per_run, last_evals=last_evals,
                         out_dir=str(out_dir) if out_dir else None)
    typer.echo(json.dumps(files, indent=2))


def _numbers(text: str, kind: type, option: str, example: str) -> list[Any]:
    """Comma-separated numbers of `kind`, or a ValueError naming `option` and an `example`."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{option} {text!r} must be numbers with commas, e.g. {example}")
    return values


def _check_out_dir(out_dir: Path) -> None:
    """`out_dir` is a directory, or one that can be created (no file in its way)."""
    path = out_dir.resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out-dir {str(out_dir)!r} must be a directory, but {existing} is a file: pass a directory")


@runs_app.command("list")
def runs_list(
    experiment_name: Annotated[str | None, typer.Option("--experiment", help="Only this experiment's runs.")] = None,
) -> None:
    """List the runs in storage: status (running, finished, failed, interrupted), round x of N, last
    evaluation, start time. Which store is listed, and how to list the other, goes to stderr."""
    from infra.errors import InfraError
    from infra.run_status import list_statuses, table
    from infra.storage import S3Storage, check_reachable, open_storage
    from infra.stores import describe

    try:
        settings = _settings()
        storage = open_storage(settings.storage_url, settings.s3_endpoint_url)
        if isinstance(storage, S3Storage):  # fail fast; a local directory need not exist to be listed
            check_reachable(storage)
        statuses = list_statuses(storage, experiment_name)
    except (ValueError, OSError, InfraError) as e:
        _fail(str(e))
    for line in describe(settings):
        typer.echo(line, err=True)
    if statuses:
        typer.echo(table(statuses))
    else:
        typer.echo(f"no runs in {settings.storage_url}", err=True)


@stack_app.command("up")
def stack_up_cmd() -> None:
    """Start Prefect, MLflow and SeaweedFS on 127.0.0.1 and write an env file to source."""
    from infra.errors import InfraError
    from infra.stack import describe, stack_up, write_stack_env

    settings = _settings()
    try:
        statuses = stack_up(settings)
    except (ValueError, InfraError) as e:
        _fail(str(e))
    typer.echo(json.dumps(describe(statuses), indent=2))
    typer.echo(f"To use it: source {write_stack_env(settings)}")


@stack_app.command("down")
def stack_down_cmd() -> None:
    """Stop the local stack."""
    from infra.stack import stack_down

    try:
        stopped = stack_down(_settings())
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@stack_app.command("status")
def stack_status_cmd() -> None:
    """Show each service: running, healthy, pid, URL, log file."""
    from infra.stack import describe, stack_status

    try:
        statuses = stack_status(_settings())
    except ValueError as e:
        _fail(str(e))
    typer.echo(json.dumps(describe(statuses), indent=2))


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
    from infra.cluster import check_address, check_worker_security, format_clients, worker_argv
    from infra.errors import InfraError
    from infra.workloads import prepare_worker, worker_clients

    try:
        address = check_address(scheduler, insecure)
        check_worker_security(address)
        served = worker_clients(corpus, clients)
        if not served:
            raise ValueError(f"--clients {clients!r} names no client: a worker stands for at least one")
    except (ValueError, InfraError) as e:
        _fail(str(e))
    path = prepare_worker(corpus, _settings().home / "data", served)  # before joining: the first round does not wait
    if path is not None:
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
    """Console entry point: like `app()`, but a usage error is one line too (exit code 2)."""
    try:
        code = app(sys.argv[1:], standalone_mode=False)
    except NoArgsIsHelpError as e:
        e.show()
        code = e.exit_code
    except typer.TyperException as e:  # typer's parsing: unknown option, value of the wrong type ...
        typer.secho(f"error: {usage_line(e)}", fg=typer.colors.RED, err=True)
        code = e.exit_code
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


def usage_line(error: typer.TyperException) -> str:
    """A usage error as one line: the message, the value given (when typer parsed it), where to read more."""
    from pydantic import ValidationError

    message = " ".join(error.format_message().split()).rstrip(".")
    cause = error.__cause__  # typer parses values with pydantic, which keeps the value given
    if isinstance(cause, ValidationError) and cause.errors():
        message += f" (given: {cause.errors()[0]['input']!r})"
    ctx = getattr(error, "ctx", None)
    where = f"`{ctx.command_path} --help`" if ctx is not None else "`--help`"
    return f"{message}: see {where}"


if __name__ == "__main__":
    main()
