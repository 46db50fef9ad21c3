"""A pruned client's Conformer convolution module with its pointwise convolutions' tensors laid out
as ``nn.Conv1d`` lays them out, against the (N, L, C) products seen through a transpose, side by side.

`fedprune_core.submodel.SlicedPointwiseConv1d` computes a pointwise convolution as a matrix product
over the channels of (N, L, C) rows. Seen through a transpose, its output is a channels-last
(N, C, L) tensor, and so is the gradient it sends back to a contiguous input; the GLU, the depthwise
convolution, the batch norm and the SiLU between the module's two pointwise convolutions then meet
tensors of two layouts, which elementwise kernels run several times slower on a CPU. Since the
tenth session (2026-12-03) the output is contiguous and a contiguous input gets a contiguous
gradient, as with ``nn.Conv1d``.

Printed, in CPU ms (median over interleaved repetitions, the order shuffled with a fixed seed):
1. SiLU's backward at the pruned module's size (16 x 72 x 63), its input and gradient of one layout
   and of the two;
2. the convolution module of the first Conformer block of `small`'s dense client and of its 50%
   column-pruned client (`bench_client.py`'s uniform masks), forward and backward on one
   ``(16, 63, 144)`` input: the pruned module as FedPrune runs it and with the transposed layout.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layout.py
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch
from bench_client import Variant, _transposed_pointwise, variants
from torch import nn

from fedprune_core.speech.workload import SpeechWorkload
from fedprune_core.submodel import SlicedPointwiseConv1d, build_client_model
from fedprune_core.training import reuse_freed_heap

FRAMES, BATCH = 63, 16


def interleaved_ms(cases: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median CPU ms of each case over `reps` rounds, every round running each case once in a
    shuffled order (3 warm-up rounds)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    order = random.Random(0)
    for rep in range(3 + reps):
        for name, fn in order.sample(list(cases.items()), len(cases)):
            start = time.process_time()
            fn()
            if rep >= 3:
                times[name].append(time.process_time() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def silu_backward(reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    contiguous = torch.randn(BATCH, 72, FRAMES, generator=g)
    channels_last = torch.randn(BATCH, FRAMES, 72, generator=g).transpose(1, 2)
    grad = torch.randn(BATCH, 72, FRAMES, generator=g)
    grad_channels_last = torch.randn(BATCH, FRAMES, 72, generator=g).transpose(1, 2)
    ms = interleaved_ms({
        "input and gradient contiguous": lambda: torch.ops.aten.silu_backward(grad, contiguous),
        "input and gradient channels-last": lambda: torch.ops.aten.silu_backward(grad_channels_last, channels_last),
        "input contiguous, gradient channels-last": lambda: torch.ops.aten.silu_backward(grad_channels_last,
                                                                                         contiguous),
    }, reps)
    print(f"\nSiLU backward, ({BATCH}, 72, {FRAMES}), CPU ms (median of {reps})\n")
    for name, value in ms.items():
        print(f"- {name}: {value:.3f}")


def conv_module(reps: int) -> None:
    workload = SpeechWorkload("small")
    dense, pruned = variants("small", 0.5)[:2]

    def module(variant: Variant) -> nn.Module:
        client = build_client_model(workload.build_model(), variant.payload, variant.specs)
        return client.module.get_submodule("transcriber.conformer.conformer_layers.0.conv_module")

    modules = {"dense": module(dense), "pruned": module(pruned)}
    x = torch.randn(BATCH, FRAMES, 144, generator=torch.Generator().manual_seed(1), requires_grad=True)
    laid_out = SlicedPointwiseConv1d.forward

    def step(name: str, forward: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with mock.patch.object(SlicedPointwiseConv1d, "forward", forward):
                modules[name](x).sum().backward()
        return run

    ms = interleaved_ms({
        "dense (nn.Conv1d)": step("dense", laid_out),
        "pruned, laid out as nn.Conv1d": step("pruned", laid_out),
        "pruned, transposed (before)": step("pruned", _transposed_pointwise),
    }, reps)
    base = ms["dense (nn.Conv1d)"]
    print(f"\n`small`'s first convolution module, forward and backward of ({BATCH}, {FRAMES}, 144), CPU ms "
          f"(median of {reps})\n")
    print("| module | CPU ms | / dense |\n|---|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.2f} | {value / base:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    reuse_freed_heap()  # as a client's training does
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread")
    silu_backward(args.reps)
    conv_module(args.reps)


if __name__ == "__main__":
    main()
