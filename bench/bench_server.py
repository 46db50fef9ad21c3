"""Server cost of Federated Pruning: importance scores plus masks, per round, at the paper's size.

Builds the paper's Conformer-Transducer L (Lin et al., Interspeech 2022: 17 Conformer blocks of
width 512, a 640-wide LSTM prediction network, a 2048-wide joint; `build_model("paper")`) and
times `FedPrune.score` + `FedPrune.mask` of every round in which the masks are recomputed:
sparsify rounds (linear ramp: nested masks, the costliest ranking) then refine rounds
(`refine_every=1`: masks re-ranked over all coordinates). Weight scores with the L2 norm, target
sparsity 0.5, uniform and adaptive allocation, for each pattern. Weights are held fixed between
rounds: the cost of scoring and ranking does not depend on their values.

Prunable: every weight of rank >= 2 whose 2-D view has an even number of rows and columns, so
that all five patterns (half patterns need even sizes) prune the same parameters; this leaves out
the depthwise convolutions (kernel 31), the first subsampling convolution, the 29-symbol
embedding and the joint output layer (0.4M of the model's 116M parameters).

    .venv/bin/python bench/bench_server.py                 # every pattern, 4 rounds each
    .venv/bin/python bench/bench_server.py --patterns column --rounds 6

Issue 2 target: at most 2 s per round on a 2-core CPU. The table is a printed figure, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch

from fedprune_core.allocation import ALLOCATIONS
from fedprune_core.config import PruningConfig
from fedprune_core.engine import ServerState
from fedprune_core.masks import PATTERNS
from fedprune_core.prunable import find_prunable
from fedprune_core.schedule import ScheduleConfig, phase_at
from fedprune_core.speech.model import build_model, count_parameters
from fedprune_core.strategies.fedprune import FedPrune

TARGET_S = 2.0
"""Issue 2: scoring plus masks of one round in at most this many seconds."""


@dataclass(frozen=True)
class Timing:
    """Seconds of one configuration, per round."""

    pattern: str
    allocation: str
    score_s: list[float]
    mask_s: list[float]

    @property
    def total_s(self) -> list[float]:
        return [a + b for a, b in zip(self.score_s, self.mask_s, strict=True)]


def even_weights(model: torch.nn.Module) -> tuple[str, ...]:
    """Names of the weights of rank >= 2 whose 2-D view has even rows and columns."""
    names = []
    for name, p in model.named_parameters():
        if p.dim() >= 2 and p.shape[0] % 2 == 0 and (p.numel() // p.shape[0]) % 2 == 0:
            names.append(name)
    return tuple(names)


def time_rounds(
    model: torch.nn.Module, prunable: tuple[str, ...], pattern: str, allocation: str, rounds: int
) -> Timing:
    """Score and mask `rounds` rounds: half of them sparsifying, the rest refining."""
    sparsify = max(1, rounds // 2)
    strategy = FedPrune(
        specs=find_prunable(model, prunable, pattern),
        pruning=PruningConfig(
            sparsity=0.5,
            pattern=pattern,
            score_source="weight",
            score_norm="l2",
            allocation=allocation,
            prunable=prunable,
        ),
        schedule=ScheduleConfig(
            num_rounds=rounds,
            sparsify_rounds=sparsify,
            ramp="linear",
            refine_rounds=rounds - sparsify,
            refine_every=1,
        ),
    )
    state = ServerState(0, {n: p.detach() for n, p in model.named_parameters()})
    score_s, mask_s = [], []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        scores = strategy.score(state, r)
        t1 = time.perf_counter()
        masks = strategy.mask(state, scores, r)
        t2 = time.perf_counter()
        assert phase_at(r, strategy.schedule) in ("sparsify", "refine")
        score_s.append(t1 - t0)
        mask_s.append(t2 - t1)
        state = ServerState(r, state.weights, masks, scores)
    return Timing(pattern, allocation, score_s, mask_s)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    parser.add_argument("--allocations", nargs="+", default=list(ALLOCATIONS), choices=ALLOCATIONS)
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per configuration")
    args = parser.parse_args()

    model = build_model("paper")
    prunable = even_weights(model)
    specs = find_prunable(model, prunable, "column")
    print(
        f"model: Conformer-Transducer 'paper', {count_parameters(model) / 1e6:.1f}M parameters; "
        f"prunable: {len(specs)} tensors, {sum(s.numel for s in specs.values()) / 1e6:.1f}M entries"
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )
    print(
        f"{args.rounds} rounds per row (sparsify with a linear ramp, then refine re-ranking every round); "
        "weight scores, L2, sparsity 0.5; medians over the rounds\n"
    )
    print("| pattern | allocation | score s | mask s | score + mask s/round | max | median / 2 s target |")
    print("|---|---|---|---|---|---|---|")
    for pattern in args.patterns:
        for allocation in args.allocations:
            t = time_rounds(model, prunable, pattern, allocation, args.rounds)
            med = statistics.median(t.total_s)
            print(
                f"| {pattern} | {allocation} | {statistics.median(t.score_s):.3f} | "
                f"{statistics.median(t.mask_s):.3f} | {med:.3f} | {max(t.total_s):.3f} | "
                f"{med / TARGET_S:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
