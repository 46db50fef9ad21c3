"""How much of the dense model a Federated Pruning client holds, against the sparsity asked for.

FedPrune's `pruning.sparsity` counts the prunable weights the masks remove. A client holds
less than 1 - sparsity of the dense model: hidden units that no layer reads after column pruning
are dropped with the rows that compute them (`fedprune_core.units`), and what stays unpruned
(biases, norms) is counted too. Issue 6 compares FP@0.5 with dense "with half the client
parameters"; this finds the sparsity at which a client holds a given fraction of the dense
model's parameters, for the masks the server would build from a trained run's weights.

For each sparsity: one-shot masks of the configuration's pruning section (pattern, allocation,
score, prunable) from the run's last committed weights, the payload a client downloads
(`extract`), and the number of float entries in it (the client's parameters and running
statistics) against the dense payload's. Then bisection for `--target`.

    .venv/bin/python bench/client_size.py --run paper/paper-warmup2 \\
        --config docs/results/learning-rate/long64lr1-fp-s50.json --target 0.5

With `--fed-dropout UNITS` the same for Federated Dropout (`fed_dropout.units` UNITS): a client's
share of the dense parameters at rates 0.1 to 0.78, then the rate that meets each `--target`
(`fedprune_core.strategies.fed_dropout.client_share`, `rate_for_share`); no stored run is read, as
a Federated Dropout client's size does not depend on the weights. `--preset` picks the experiment
preset (and so the model), `small` by default.

    .venv/bin/python bench/client_size.py --fed-dropout hidden --target 0.75 0.5 0.35 [--preset demo]

Pure computation on stored weights; a printed figure, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from fedprune_core.budgets import one_shot_masks
from fedprune_core.config import ExperimentConfig
from fedprune_core.engine import ServerState
from fedprune_core.presets import preset
from fedprune_core.prunable import PrunableSpec, find_prunable
from fedprune_core.speech.model import build_model
from fedprune_core.strategies.fed_dropout import client_share, rate_for_share
from fedprune_core.submodel import extract, float_entries
from fedprune_core.types import MaskDict, StateDict
from infra.runs import STATE_OBJECT, warm_start_source
from infra.settings import Settings
from infra.storage import open_storage


def load_weights(run: str) -> StateDict:
    """The last committed weights of run "EXPERIMENT/RUN_ID" in the configured storage."""
    settings = Settings()
    checkpoint = warm_start_source(open_storage(settings.storage_url, settings.s3_endpoint_url), "", run).load()
    return ServerState.from_flat(checkpoint.round_num, checkpoint.tensors[STATE_OBJECT]).weights


def one_shot_fp_masks(
    config: ExperimentConfig, specs: dict[str, PrunableSpec], weights: StateDict, sparsity: float
) -> MaskDict:
    """The masks FedPrune builds from `weights` at `sparsity` in one shot, by `config`'s pruning
    section (pattern, allocation, score)."""
    return one_shot_masks(dataclasses.replace(config.pruning, sparsity=sparsity), specs, weights)


def client_fraction(
    config: ExperimentConfig, specs: dict[str, PrunableSpec], weights: StateDict, sparsity: float
) -> tuple[float, float]:
    """(client parameters / dense, realized sparsity of the prunable weights) at `sparsity`."""
    masks = one_shot_fp_masks(config, specs, weights, sparsity)
    pruned = sum(int((~m).sum()) for m in masks.values()) / sum(s.numel for s in specs.values())
    return float_entries(extract(weights, masks, specs)) / float_entries(extract(weights, {}, {})), pruned


def fed_dropout_sizes(units: str, targets: list[float], name: str = "small") -> None:
    """Print a Federated Dropout client's share of the dense model of preset `name` by rate, and the rate
    of each target."""
    config = preset(name, {"strategy": "fed_dropout", "fed_dropout": {"units": units}})
    model = build_model(config.model)
    print(f"fed_dropout, units {units}, {name}\n\n| rate | client parameters / dense |\n|---|---|")
    for rate in (0.1, 0.25, 0.5, 0.78):
        print(f"| {rate:.2f} | {client_share(config, model, rate):.4f} |", flush=True)
    for target in targets:
        try:
            rate = rate_for_share(config, model, target)
        except ValueError as error:
            print(f"\ntarget {target}: {error}")
            continue
        print(f"\nrate {rate:.4f}: a client holds {client_share(config, model, rate):.4f} of the dense parameters "
              f"(target {target})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="EXPERIMENT/RUN_ID whose last weights to score (Federated Pruning)")
    parser.add_argument("--config", type=Path, help="JSON overrides of the preset (Federated Pruning)")
    parser.add_argument("--fed-dropout", choices=("rows", "hidden"), help="Federated Dropout's units instead")
    parser.add_argument("--target", type=float, nargs="+", default=[0.5], help="client parameters / dense to find")
    parser.add_argument("--preset", default="small", help="the experiment preset whose model to size")
    args = parser.parse_args()
    if args.fed_dropout:
        fed_dropout_sizes(args.fed_dropout, args.target, args.preset)
        return
    if args.run is None or args.config is None:
        parser.error("--run and --config are needed for Federated Pruning (or pass --fed-dropout UNITS)")
    config = preset(args.preset, json.loads(args.config.read_text()))
    weights = load_weights(args.run)
    p = config.pruning
    specs = find_prunable(build_model(config.model), p.prunable, p.pattern, p.include_1d)
    print(f"{args.run}, {config.pruning.pattern}, {config.pruning.allocation}, score {config.pruning.score_source} "
          f"{config.pruning.score_norm}\n\n| sparsity | realized | client parameters / dense |\n|---|---|---|")
    for s in (0.3, 0.35, 0.4, 0.45, 0.5):
        fraction, realized = client_fraction(config, specs, weights, s)
        print(f"| {s:.2f} | {realized:.4f} | {fraction:.4f} |", flush=True)
    lo, hi = 0.0, config.pruning.sparsity if config.pruning.sparsity > 0 else 0.9
    for _ in range(12):  # the client's share falls as sparsity grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if client_fraction(config, specs, weights, mid)[0] > args.target[0] else (lo, mid)
    fraction, realized = client_fraction(config, specs, weights, hi)
    print(f"\nsparsity {hi:.4f} (realized {realized:.4f}): a client holds {fraction:.4f} of the dense parameters "
          f"(target {args.target[0]})")


if __name__ == "__main__":
    main()
