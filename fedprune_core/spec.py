"""The record of how one parameter is pruned (`PrunableSpec`), and the Linear layers that read a
convolution channel by channel (`ChannelReader`).

Shared by `fedprune_core.prunable`, which chooses the parameters and builds their specs, and
`fedprune_core.units`, which finds the units those specs leave unread: prunable builds on units,
and units on this module alone. `fedprune_core.prunable` re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedprune_core.masks import PATTERN_SPECS


@dataclass(frozen=True)
class PrunableSpec:
    """How one parameter is pruned.

    Attributes:
        name: parameter name in `model.named_parameters()`.
        shape: the parameter's full shape.
        splits: number of stacked matrices along dim 0 (3 for a fused q/k/v projection).
        linear: True when the owner computes a plain matrix product a client can replace by a
            physically smaller slice of it: an `nn.Linear`, a pointwise `nn.Conv1d` (kernel 1, no
            groups, stride, padding or dilation), or the projections of a plain
            `nn.MultiheadAttention` (see `fedprune_core.prunable.is_plain_attention`).
        pattern: the pattern used for this parameter ("unstructured" for 1-D tensors).
        feeds: for a weight whose output rows are the units a later layer reads (see
            `fedprune_core.units`), that layer's weight name: output row r is unit r % its inputs.
        taps: the adjacent columns the column patterns keep or prune together: the kernel taps of
            one input channel of a convolution with several input channels per group, the
            features of one channel of a `ChannelReader`'s Linear, else 1.
    """

    name: str
    shape: tuple[int, ...]
    splits: int
    linear: bool
    pattern: str
    feeds: str = ""
    taps: int = 1

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """Shape of each of the `splits` 2-D matrices."""
        rows = self.shape[0] // self.splits
        return rows, self.numel // self.shape[0]


def is_sliced(spec: PrunableSpec) -> bool:
    """Whether a parameter travels as physically smaller Linear blocks (Linear, pointwise Conv1d,
    attention projections) under a structured pattern."""
    return spec.linear and not PATTERN_SPECS[spec.pattern].entrywise


@dataclass(frozen=True)
class ChannelReader:
    """A Linear that reads a convolution's output flattened channel by channel: its input features
    ``[c * taps, (c + 1) * taps)`` are output channel c of the convolution (for a 2-D convolution
    over (time, frequency), the channel's frequency bins at one frame).

    A module declares its own with a ``channel_readers()`` method (names relative to the module).
    Under the column patterns the Linear's columns are pruned a channel at a time, so a pruned
    column leaves a whole output channel of the convolution unread: a dead unit
    (`fedprune_core.units`) that a client does not compute.

    Attributes:
        conv: weight name of the convolution.
        linear: weight name of the Linear.
        taps: input features of the Linear per channel.
    """

    conv: str
    linear: str
    taps: int


def channel_readers(model: nn.Module) -> tuple[ChannelReader, ...]:
    """The `ChannelReader`s the modules of `model` declare, with full weight names."""
    found: list[ChannelReader] = []
    for path, m in model.named_modules():
        declared = getattr(m, "channel_readers", None)
        if callable(declared):
            p = f"{path}." if path else ""
            found += [ChannelReader(p + r.conv, p + r.linear, r.taps) for r in declared()]
    return tuple(found)
