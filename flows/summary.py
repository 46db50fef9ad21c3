"""The end of a run at a glance: its result, a client's size and traffic against dense, its time, its pages.

The experiment flow returns the summary, a flat JSON object (`FIELDS`); `fedprune run` and
`fedprune resume` print `as_text` (or the object itself with ``--json``), and the flow run carries
`as_markdown` as a Prefect artifact.
"""

from __future__ import annotations

import re
from typing import Any

FIELDS: tuple[str, ...] = (
    "run_id", "experiment", "preset", "strategy", "status", "resumed", "rounds", "rounds_run", "time_s",
    "wer", "cer", "evaluation",
    "client_parameters", "dense_parameters", "client_parameters_vs_dense",
    "bytes_down_per_round", "bytes_up_per_round", "dense_bytes_per_round", "bytes_down_vs_dense",
    "bytes_up_vs_dense", "client_flops_per_step", "dense_flops_per_step", "flops_vs_dense",
    "target", "target_metric", "target_round", "target_client_time_s", "target_client_bytes",
    "target_modelled_time_s",
    "prefect_flow_run_id", "prefect_flow_run_url", "mlflow_run_id", "mlflow_run_url", "mlflow_ui_command",
    "tracking_uri", "storage_url",
)
"""Every key of a summary. ``wer`` and ``cer`` are fractions (None for a workload without them);
``evaluation`` holds every metric of the last evaluation; ``*_per_round`` are a client's bytes in one
round, the run's mean; ``*_flops_per_step`` are FLOPs of one local step (`fedprune_core.budget`), the mean
over the rounds that counted them (None if none did); ``*_vs_dense`` divide by dense's; ``target*``: the
configured ``target`` of ``target_metric`` (``eval_wer`` or ``eval_accuracy``), the first round that
reached it and the clients' time (each round's slowest client, summed) and bytes (down and up, every
client) up to it, and ``target_modelled_time_s`` the rounds' time under PruneFL's time model (None
for other strategies), None when not set or never reached; ``mlflow_ui_command`` serves ``mlflow_run_url``
when tracking is not a server (else None); ``time_s`` and ``rounds_run`` are this start's."""


def duration(seconds: float) -> str:
    """e.g. 4.2s, 7m05s, 3h02m, 2d04h."""
    if seconds < 59.95:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}{(whole % size) // sub_size:02d}{sub}"
    return f"{whole // 60}m{whole % 60:02d}s"


def _result(summary: dict[str, Any]) -> str:
    if summary["wer"] is not None:
        cer = f", CER {100 * summary['cer']:.1f}%" if summary["cer"] is not None else ""
        return f"WER {100 * summary['wer']:.1f}%{cer}"
    shown = [f"{k.removeprefix('eval_')} {v:.4g}" for k, v in summary["evaluation"].items()]
    return ", ".join(shown) or "no evaluation"


def _compute(summary: dict[str, Any]) -> str:
    if summary["flops_vs_dense"] is None:
        return "not counted"
    return (f"per local step: {summary['flops_vs_dense']:.2f} x dense FLOPs "
            f"({summary['client_flops_per_step']:,.0f} of {summary['dense_flops_per_step']:,.0f})")


def _target(summary: dict[str, Any]) -> str:
    s = summary
    if s["target"] is None:
        return "none set (--set target=...)"
    goal = f"{s['target_metric'] or 'metric'} {s['target']:.4g}"
    if s["target_round"] is None:
        return f"{goal}: not reached"
    modelled = "" if s["target_modelled_time_s"] is None else \
        f" ({duration(s['target_modelled_time_s'])} modelled)"
    return (f"{goal}: reached at round {s['target_round']}, after {duration(s['target_client_time_s'])} of client time"
            f"{modelled} and {s['target_client_bytes']:,.0f} client bytes")


def rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) pairs, the same for the terminal and the artifact."""
    s = summary
    started = f"rounds {s['rounds'] - s['rounds_run'] + 1}-{s['rounds']} (resumed)" if s["resumed"] \
        else f"{s['rounds']} rounds"
    if s["rounds_run"] == 0:
        started = "no round left to run (resumed a finished run)"
    mlflow = s["mlflow_run_url"] + (f"  (serve it: `{s['mlflow_ui_command']}`)" if s["mlflow_ui_command"] else "")
    return [
        ("run", f"{s['run_id']} ({s['experiment']}): {s['strategy']}, preset {s['preset']}, {s['status']}"),
        ("final evaluation", _result(s)),
        ("client model", f"{s['client_parameters']:,} parameters = {s['client_parameters_vs_dense']:.2f} x dense "
                         f"({s['dense_parameters']:,})"),
        ("client traffic", f"per round: down {s['bytes_down_vs_dense']:.2f} x dense, up {s['bytes_up_vs_dense']:.2f}"
                           f" x dense (dense: {s['dense_bytes_per_round']:,} bytes each way)"),
        ("client compute", _compute(s)),
        ("target", _target(s)),
        ("time", f"{duration(s['time_s'])} for {started}"),
        ("Prefect", s["prefect_flow_run_url"] or "(no flow run)"),
        ("MLflow", mlflow),
        ("checkpoints", f"{s['storage_url']}/{s['experiment']}/{s['run_id']}"),
    ]


def as_text(summary: dict[str, Any]) -> str:
    """Aligned lines for a terminal."""
    pairs = rows(summary)
    width = max(len(label) for label, _ in pairs)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in pairs)


def as_markdown(summary: dict[str, Any]) -> str:
    """A Markdown table; URLs become links."""
    def cell(value: str) -> str:
        linked = re.sub(r"(https?://\S+)", r"[\1](\1)", value)
        return linked.replace("|", "\\|")

    lines = [f"# FedPrune run {summary['run_id']}", "", "| | |", "|---|---|"]
    lines += [f"| {label} | {cell(value)} |" for label, value in rows(summary)]
    return "\n".join(lines) + "\n"


def artifact_key(experiment: str, run_id: str) -> str:
    """The run's Prefect artifact key: lowercase letters, digits and dashes (Prefect's rule)."""
    return re.sub(r"[^a-z0-9-]", "-", f"{experiment}-{run_id}".lower())
