"""How much the batch norms' running statistics matter to a stored run's WER.

Before running statistics were federated, a server evaluated every model with the initial
statistics (mean 0, variance 1) while clients trained with batch statistics. This loads the last
stored state of each named run (local storage, `<FEDPRUNE_HOME>/storage/<experiment>/<run>/`),
evaluates it on the held-out speakers as stored (with the state's statistics, or the initial ones
where the state has none), then with statistics re-estimated by forward passes over 16 utterances
of each of 32 training clients (cumulative average, no training), and prints both WERs.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bn_diagnostic.py paper-long64-dense paper-long64-fp-s50
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedprune_core.speech.workload import SpeechWorkload
from infra.workloads import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run ids in the experiment")
    parser.add_argument("--experiment", default="paper")
    parser.add_argument("--home", default=os.environ.get("FEDPRUNE_HOME", ".fedprune"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    home = Path(args.home)
    data = load("small", "bench", 0, str(home / "data"))
    workload = data.workload
    assert isinstance(workload, SpeechWorkload)
    for run in args.runs:
        rounds = home / "storage" / args.experiment / run / "rounds"
        last = sorted(rounds.iterdir())[-1]
        flat = load_file(str(last / "state.safetensors"))
        weights = {k.partition("/")[2]: v for k, v in flat.items() if k.startswith("weights/")}
        masks = {k.partition("/")[2]: v for k, v in flat.items() if k.startswith("masks/")}
        model = workload.build_model()
        model.load_state_dict({n: w * masks[n] if n in masks else w for n, w in weights.items()}, strict=False)
        model.eval()
        with torch.no_grad():
            stored = workload.evaluate(model, data.eval_examples)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the passes below
        model.train()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for client in data.clients[:32]:
                workload.loss_fn(model, workload.collate(list(client[:16]), generator=g))
        model.eval()
        with torch.no_grad():
            recalibrated = workload.evaluate(model, data.eval_examples)
        print(f"{run} (round {int(last.name)}): WER {stored['wer']:.1%} with the stored statistics, "
              f"{recalibrated['wer']:.1%} re-estimated", flush=True)


if __name__ == "__main__":
    main()
