"""The Conformer's depthwise convolution: `fedprune_core.depthwise.depthwise_conv1d` (one multiply-add
per kernel tap) against ``F.conv1d`` (oneDNN on a CPU), forward and backward, side by side.

Shapes are those of a client's training step: `small` (batch 16, 144 channels) and `paper`
(batch 2, 512 channels), 63 frames (2.5 s after subsampling), kernel 31; dense, and as a 50%
column-pruned client runs it (half the channels live, every other tap kept). Then whole training
steps of `bench_client.py`'s dense and 50% column-pruned `small` clients, the two
implementations alternating in one process (`--models` to change or skip them).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_depthwise.py
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_client import BATCH, onednn_depthwise, synthetic_batch, train_once, variants

from fedprune_core.depthwise import depthwise_conv1d
from fedprune_core.speech.workload import SpeechWorkload
from fedprune_core.training import LocalTrainingConfig, reuse_freed_heap

KERNEL, FRAMES = 31, 63
CASES = [  # (label, batch, channels, taps kept)
    ("small dense", 16, 144, KERNEL),
    ("small pruned", 16, 72, 16),
    ("paper dense", 2, 512, KERNEL),
    ("paper pruned", 2, 256, 16),
]


def cpu_ms(fn: Callable[[], None], reps: int) -> float:
    """Median process CPU time of `fn` in ms, after 5 warm-up calls."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1000 * statistics.median(times)


def measure(batch: int, channels: int, kept: int, reps: int) -> dict[str, float]:
    """CPU ms of a forward and backward with ``F.conv1d`` (pruned taps as zero weights) and by taps."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, channels, FRAMES, generator=g)
    w = torch.randn(channels, 1, KERNEL, generator=g, requires_grad=True)
    b = torch.randn(channels, generator=g, requires_grad=True)
    taps = torch.linspace(0, KERNEL - 1, kept).round().long()
    zeroed = torch.zeros(KERNEL).index_fill_(0, taps, 1.0)
    masked = (w.detach() * zeroed).requires_grad_()  # a client's masked weight: pruned taps held as zeros
    convs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "conv1d": lambda x: F.conv1d(x, masked, b, padding=KERNEL // 2, groups=channels),
        "taps": lambda x: depthwise_conv1d(x, w, b, KERNEL // 2, None if kept == KERNEL else taps),
    }

    def step(conv: Callable[[torch.Tensor], torch.Tensor]) -> None:
        x = x0.clone().requires_grad_()
        conv(x).sum().backward()

    ms: dict[str, float] = {}
    for _ in range(2):  # alternate; keep the second pass
        ms = {name: cpu_ms(lambda c=conv: step(c), reps) for name, conv in convs.items()}  # type: ignore[misc]
    return ms


def whole_steps(model_name: str, reps: int) -> dict[tuple[str, str], float]:
    """Median CPU s of a training step per (implementation, client), the implementations alternating."""
    workload = SpeechWorkload(model_name)
    pair = variants(model_name, 0.5)
    batch = BATCH[model_name]
    utterances = synthetic_batch(workload, batch, 2.5, seed=0)
    local = LocalTrainingConfig(steps=4, batch_size=batch, lr=1e-3, optimizer="adam")
    cpu: dict[tuple[str, str], list[float]] = {(i, v.name): [] for i in ("oneDNN", "taps") for v in pair}
    for rep in range(reps):
        for impl in ("oneDNN", "taps") if rep % 2 == 0 else ("taps", "oneDNN"):
            with onednn_depthwise() if impl == "oneDNN" else contextlib.nullcontext():
                for v in pair:
                    cpu[(impl, v.name)] += train_once(workload, v, utterances, local, seed=rep).cpu_s
    return {key: statistics.median(times) for key, times in cpu.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=60, help="timed calls per kernel")
    parser.add_argument("--models", nargs="*", default=["small"], choices=list(BATCH))
    parser.add_argument("--step-reps", type=int, default=6, help="trainings (3 timed steps) per client and kernel")
    args = parser.parse_args()
    torch.set_num_threads(1)
    reuse_freed_heap()  # as a client trains
    print("| case | F.conv1d ms | taps ms | taps / F.conv1d |")
    print("|---|---|---|---|")
    for label, batch, channels, kept in CASES:
        ms = measure(batch, channels, kept, args.reps)
        print(f"| {label} (batch {batch}, {channels} channels, {kept} of {KERNEL} taps) | {ms['conv1d']:.2f} "
              f"| {ms['taps']:.2f} | {ms['taps'] / ms['conv1d']:.2f} |")
    for model_name in args.models:
        step = whole_steps(model_name, args.step_reps)
        print(f"\n| {model_name}, batch {BATCH[model_name]} | oneDNN step CPU s | taps step CPU s | taps / oneDNN |")
        print("|---|---|---|---|")
        for client in ("dense", "pruned"):
            a, b = step[("oneDNN", client)], step[("taps", client)]
            print(f"| {client} | {a:.3f} | {b:.3f} | {b / a:.3f} |")
        print(f"| pruned / dense | {step[('oneDNN', 'pruned')] / step[('oneDNN', 'dense')]:.3f} "
              f"| {step[('taps', 'pruned')] / step[('taps', 'dense')]:.3f} | |")


if __name__ == "__main__":
    main()
