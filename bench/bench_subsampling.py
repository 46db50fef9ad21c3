"""The subsampling's second Conv2d of a 50% column-pruned client: computed masked dense (``F.conv2d``,
oneDNN on a CPU, pruned columns held as zeros: what a client trains today) against two ways of
computing only the kept columns, forward and backward, side by side.

Column pruning sees a ``(C_out, C_in, 3, 3)`` weight as ``(C_out, C_in * 9)``: a pruned column is
an (input channel, kernel tap) pair, so no smaller ``nn.Conv2d`` computes the kept ones. The two
candidates, both exact (checked against ``F.conv2d`` before timing):

- **unfolded**: the kept columns' input patches gathered into one ``(B, K_kept, H' * W')`` matrix
  (one strided channel gather per tap), one matrix product with the ``(C_out, K_kept)`` weight; in
  backward the gradient of that matrix is added back tap by tap;
- **per tap**: for each tap, its kept input channels of the strided input times that tap's
  ``(C_out, kept channels)`` weight, accumulated; no patch matrix.

Shapes are a client's training step: 2.5 s of audio (251 x 80 log-mel frames), after the first
convolution ``(B, C, 126, 40)``; `small` (batch 16, 32 channels) and `paper` (batch 2, 512
channels). Half of the ``C * 9`` columns kept, chosen by a seeded permutation.

Neither beats the masked dense convolution (docs/benchmarks.md), so since 2026-12-03 a column of a
convolution with several input channels is a whole input channel (`PrunableSpec.taps`). The second
table times what a client trains now: both layers (`SubsamplingConvs`) with the second over half
of its input channels (`ChannelSlicedConv2d`, the first computing only those), against all
channels masked dense, after checking outputs and gradients agree.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_subsampling.py
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from bench_depthwise import cpu_ms

from fedprune_core.speech.model import SubsamplingConvs
from fedprune_core.submodel import ChannelSlicedConv2d
from fedprune_core.training import reuse_freed_heap

HEIGHT, WIDTH = 126, 40
CASES = [("small", 16, 32), ("paper", 2, 512)]  # (model, batch, channels)
Tap = tuple[int, int, torch.Tensor]
"""(kernel row, kernel column, kept input channels) of one kernel tap."""


def kept_taps(columns: torch.Tensor) -> list[Tap]:
    """The taps of a ``(C_in, 3, 3)`` column mask that keep any input channel."""
    return [(i, j, columns[:, i, j].nonzero().flatten()) for i in range(3) for j in range(3)
            if bool(columns[:, i, j].any())]


def _tap_view(padded: torch.Tensor, i: int, j: int, height: int, width: int) -> torch.Tensor:
    """The input each output position reads at kernel tap (i, j): stride 2 from (i, j)."""
    return padded[:, :, i:i + 2 * height:2, j:j + 2 * width:2]


class _Unfolded(torch.autograd.Function):
    """``conv2d(h, w, b, stride=2, padding=1)`` over the kept columns only, as one matrix product."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, taps: list[Tap]) -> torch.Tensor:
        ctx.save_for_backward(h, w)
        ctx.taps = taps
        cols = _patches(h, taps)
        batch, _, height, width = cols.shape
        out = torch.matmul(_kept_weight(w, taps), cols.view(batch, -1, height * width)) + b[:, None]
        return out.view(batch, -1, height, width)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        h, w = ctx.saved_tensors
        cols = _patches(h, ctx.taps)
        batch, _, height, width = cols.shape
        g = grad.reshape(batch, grad.shape[1], height * width)
        grad_kept = torch.bmm(g, cols.view(batch, -1, height * width).transpose(1, 2)).sum(0)
        grad_cols = torch.matmul(_kept_weight(w, ctx.taps).t(), g).view(cols.shape)
        grad_padded = h.new_zeros(h.shape[0], h.shape[1], h.shape[2] + 2, h.shape[3] + 2)
        grad_w = torch.zeros_like(w)
        start = 0
        for i, j, channels in ctx.taps:
            stop = start + channels.numel()
            _tap_view(grad_padded, i, j, height, width).index_add_(1, channels, grad_cols[:, start:stop])
            grad_w[:, channels, i, j] = grad_kept[:, start:stop]
            start = stop
        return grad_padded[:, :, 1:-1, 1:-1], grad_w, g.sum((0, 2)), None


def _patches(h: torch.Tensor, taps: list[Tap]) -> torch.Tensor:
    """``(B, K_kept, H', W')``: per kept column, the input it multiplies at every output position."""
    height, width = (h.shape[2] + 1) // 2, (h.shape[3] + 1) // 2
    padded = F.pad(h, (1, 1, 1, 1))
    return torch.cat([_tap_view(padded, i, j, height, width).index_select(1, c) for i, j, c in taps], 1)


def _kept_weight(w: torch.Tensor, taps: list[Tap]) -> torch.Tensor:
    """``(C_out, K_kept)``: the kept columns of ``w``, in `_patches`' order."""
    return torch.cat([w[:, c, i, j] for i, j, c in taps], 1)


def per_tap(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, taps: list[Tap]) -> torch.Tensor:
    """``conv2d(h, w, b, stride=2, padding=1)`` over the kept columns, one product per tap (autograd)."""
    batch, height, width = h.shape[0], (h.shape[2] + 1) // 2, (h.shape[3] + 1) // 2
    padded = F.pad(h, (1, 1, 1, 1))
    out = b[None, :, None].expand(batch, -1, height * width)
    for i, j, channels in taps:
        x = _tap_view(padded, i, j, height, width).index_select(1, channels).reshape(batch, -1, height * width)
        out = out + torch.matmul(w[:, channels, i, j], x)
    return out.view(batch, -1, height, width)


def measure(batch: int, channels: int, reps: int) -> dict[str, float]:
    """CPU ms of a forward and backward (with the ReLU after it) of each implementation, after
    checking that outputs and gradients match ``F.conv2d``'s."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(batch, channels, HEIGHT, WIDTH, generator=g).relu_().requires_grad_()
    columns = torch.zeros(channels * 9, dtype=torch.bool)
    columns[torch.randperm(channels * 9, generator=g)[: channels * 9 // 2]] = True
    columns = columns.view(channels, 3, 3)
    w = (0.05 * torch.randn(channels, channels, 3, 3, generator=g) * columns).requires_grad_()
    b = torch.randn(channels, generator=g, requires_grad=True)
    taps = kept_taps(columns)
    convs: dict[str, Callable[[], torch.Tensor]] = {
        "masked dense": lambda: F.conv2d(h, w, b, stride=2, padding=1),
        "unfolded": lambda: _Unfolded.apply(h, w, b, taps),
        "per tap": lambda: per_tap(h, w, b, taps),
    }
    reference = _grads(convs["masked dense"], (h, w, b), columns)
    for name, conv in convs.items():
        for got, want, what in zip(_grads(conv, (h, w, b), columns), reference, ("output", "h", "w", "b"),
                                   strict=True):
            error = float((got - want).abs().max() / want.abs().max())
            if error > 1e-4:
                raise AssertionError(f"{name}: {what} differs from F.conv2d's by {error:.1e} of its largest entry")

    def step(conv: Callable[[], torch.Tensor]) -> None:
        conv().relu().sum().backward()

    ms: dict[str, float] = {}
    for _ in range(2):  # alternate; keep the second pass
        ms = {name: cpu_ms(lambda c=conv: step(c), reps) for name, conv in convs.items()}  # type: ignore[misc]
    return ms


def measure_channels(batch: int, channels: int, reps: int) -> dict[str, float]:
    """CPU ms of a forward and backward of the whole subsampling, the second layer over half of its
    input channels against all of them masked dense, after checking both compute the same."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 2 * HEIGHT - 1, 2 * WIDTH, generator=g)
    torch.manual_seed(0)
    masked = SubsamplingConvs(channels)
    kept = torch.randperm(channels, generator=g)[: channels // 2].sort().values
    with torch.no_grad():
        masked[2].weight[:, torch.ones(channels, dtype=torch.bool).index_fill_(0, kept, False)] = 0.0
    client = copy.deepcopy(masked)
    client[2] = ChannelSlicedConv2d(masked[2], kept)
    outs = []
    for m in (masked, client):
        m.zero_grad()
        out = m(x)
        out.sum().backward()
        outs.append(out.detach())
    pairs = [(outs[1], outs[0], "output"), (client[0].weight.grad, masked[0].weight.grad, "first weight"),
             (client[2].weight.grad, masked[2].weight.grad[:, kept], "second weight")]
    for got, want, what in pairs:
        error = float((got - want).abs().max() / want.abs().max())  # type: ignore[operator]
        if error > 1e-4:
            raise AssertionError(f"kept channels: the {what} differs from masked dense by {error:.1e} of its largest")
    ms: dict[str, float] = {}
    for _ in range(2):  # alternate; keep the second pass
        ms = {name: cpu_ms(lambda m=m: m(x).sum().backward(), reps)  # type: ignore[misc]
              for name, m in (("all channels", masked), ("kept channels", client))}
    return ms


def _grads(conv: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...],
           columns: torch.Tensor) -> list[torch.Tensor]:
    """Output and input gradients of ``relu(conv()).sum()``; the weight's at kept columns only
    (the pruned ones are zeroed by the client's projection after every step)."""
    for x in inputs:
        x.grad = None
    out = conv()
    out.relu().sum().backward()
    grads = [x.grad.clone() for x in inputs]  # type: ignore[union-attr]
    grads[1] = grads[1] * columns
    return [out.detach(), *grads]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10, help="timed calls per implementation and pass")
    parser.add_argument("--models", nargs="+", default=[m for m, _, _ in CASES], choices=[m for m, _, _ in CASES])
    args = parser.parse_args()
    torch.set_num_threads(1)
    reuse_freed_heap()  # as train_local does: freed activations stay mapped
    print(f"torch {torch.__version__}, 1 thread; 50% of the (channel, tap) columns kept; forward + backward, "
          f"median CPU ms of {args.reps} calls (second of two alternating passes)\n")
    print("| model | batch x channels | masked dense (F.conv2d) | unfolded | per tap | unfolded / dense "
          "| per tap / dense |")
    print("|---|---|---|---|---|---|---|")
    for model, batch, channels in CASES:
        if model in args.models:
            ms = measure(batch, channels, args.reps)
            dense = ms["masked dense"]
            print(f"| {model} | {batch} x {channels} | {dense:.1f} | {ms['unfolded']:.1f} | {ms['per tap']:.1f} "
                  f"| {ms['unfolded'] / dense:.2f} | {ms['per tap'] / dense:.2f} |", flush=True)
    print("\nBoth layers (SubsamplingConvs), the second over half of its input channels (ChannelSlicedConv2d) "
          "against all channels masked dense; forward + backward, median CPU ms\n")
    print("| model | batch x channels | all channels | kept channels | kept / all |")
    print("|---|---|---|---|---|")
    for model, batch, channels in CASES:
        if model in args.models:
            ms = measure_channels(batch, channels, args.reps)
            print(f"| {model} | {batch} x {channels} | {ms['all channels']:.1f} | {ms['kept channels']:.1f} "
                  f"| {ms['kept channels'] / ms['all channels']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
