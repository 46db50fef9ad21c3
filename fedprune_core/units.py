"""Units a pruned layer no longer reads, and the work they free in the layers before it.

Column pruning removes input features of a layer. When that layer is the only reader of a hidden
unit (a feed-forward module's hidden unit, a convolution module's channel, a joint network
dimension), every weight that only computes that unit is dead: it cannot change the output, and
its gradient is exactly zero. A client therefore need not download, compute or upload it: the
layers that produce the unit emit only the live units (compact), the per-unit layers between them
(depthwise convolution, batch norm) run on the live channels, and the reading layer takes the
compact input as it is. The arithmetic of every live unit is unchanged, so training is the same
as with the dead weights present (Adam leaves an entry with zero gradient where it was).

A `UnitGroup` names one such set of units. `find_unit_groups` recognizes the torchaudio blocks the
speech workload is built from:

- Conformer feed-forward module: ``Linear(d, h) -> SiLU -> Dropout -> Linear(h, d)``; units: the
  h hidden units (producer ``sequential.1``, reader ``sequential.4``).
- Conformer convolution module with batch norm: ``pointwise(d, 2c) -> GLU -> depthwise(c) ->
  BatchNorm(c) -> SiLU -> pointwise(c, d)``; units: the c channels, each produced by two rows of the
  first pointwise convolution (value and gate).
- Transducer joint network: ``ReLU(source + target) -> Linear(J, V)`` with the source from the
  encoder's output ``Linear``; units: the J joint dimensions (the target, behind the prediction
  network's layer norm, is computed whole and gathered).

A group applies only when its reader and producers are all sliced (`PrunableSpec.linear`, a
structured pattern). Per-unit layers that mix units (group norm, layer norm) stop a group.

An attention's heads make a head group (`find_head_groups`): its units are the dimensions of the
fused q/k/v in-projection's rows and the out projection's columns, a head's dimensions alive or
dead together (`UnitGroup.span`). A pruned column of the out projection does not kill the q and k
rows of its dimension (the head's scores read them all), so column pruning does not use them;
Federated Dropout, which drops whole heads, does, and its client runs the attention on the kept
heads (`fedprune_core.submodel.SlicedMultiheadAttention`).

A `ChannelReader` (a Linear reading a convolution's output flattened channel by channel, such as
the speech model's subsampling) makes a channel group (`find_channel_groups`): under the column
patterns the Linear prunes whole channels, each unread channel is a dead output channel of the
convolution, whose (masked, not sliced) weight loses those rows, and a client's convolution
computes the live channels only (`fedprune_core.submodel.ChannelSlicedConv2d`). Federated Dropout's
hidden units are `find_unit_groups`' and `find_head_groups`'.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torchaudio.models import RNNT
from torchaudio.models.conformer import _ConvolutionModule, _FeedForwardModule
from torchaudio.models.rnnt import _Joiner

from fedprune_core.depthwise import DepthwiseConv1d, depthwise_conv1d
from fedprune_core.masks import CHANNEL_PATTERNS, PATTERN_SPECS
from fedprune_core.spec import PrunableSpec, channel_readers, is_sliced
from fedprune_core.types import MaskDict


@dataclass(frozen=True)
class UnitGroup:
    """Units read by one layer.

    Attributes:
        reader: weight name of the layer whose input features are the units.
        producers: weight names of the layers whose output rows are the units (row r is unit
            r % width: a GLU's value and gate halves are two rows per unit).
        per_unit: module paths of the layers between that act on each unit alone (depthwise
            convolution, batch norm) or gather the units (the joint network).
        width: number of units.
        taps: the reader's input features per unit, adjacent (a channel group's features per
            channel), else 1.
        entries: the parameters and running statistics besides the producers' and reader's weights
            whose entry r along dim 0 serves unit r % width alone: the producers' biases, the
            per-unit layers' parameters and statistics, and the scale and shift of the layer norm the
            joint network gathers its target dimensions from. A client without unit u leaves their
            entries of u untouched (`held_entries`).
        span: the adjacent units that live or die together, else 1: an attention head's head_dim
            dimensions (`find_head_groups`), whose q and k rows are dead only with the whole head.
    """

    reader: str
    producers: tuple[str, ...]
    per_unit: tuple[str, ...]
    width: int
    taps: int = 1
    entries: tuple[str, ...] = ()
    span: int = 1


def find_unit_groups(model: nn.Module, specs: dict[str, PrunableSpec]) -> tuple[UnitGroup, ...]:
    """The unit groups of `model` whose reader and producers are all sliced under `specs`."""
    found: list[UnitGroup] = []
    for path, m in model.named_modules():
        p = f"{path}." if path else ""
        if isinstance(m, _FeedForwardModule):
            hidden = m.sequential[1]
            found.append(UnitGroup(f"{p}sequential.4.weight", (f"{p}sequential.1.weight",), (), hidden.out_features))
        elif isinstance(m, _ConvolutionModule) and type(m.sequential[3]) is nn.BatchNorm1d:
            depthwise = m.sequential[2]
            found.append(UnitGroup(
                f"{p}sequential.5.weight", (f"{p}sequential.0.weight",), (f"{p}sequential.2", f"{p}sequential.3"),
                depthwise.out_channels,
            ))
        elif isinstance(m, RNNT) and isinstance(m.joiner, _Joiner):
            output = getattr(m.transcriber, "output", None)
            if type(output) is nn.Linear:
                target_norm = getattr(m.predictor, "output_layer_norm", None)
                gathered = (f"{p}predictor.output_layer_norm",) if isinstance(target_norm, nn.LayerNorm) else ()
                found.append(UnitGroup(
                    f"{p}joiner.linear.weight", (f"{p}transcriber.output.weight",), (f"{p}joiner",),
                    output.out_features, entries=_entries_of(model, gathered),
                ))
    groups = (replace(g, entries=_entries_of(model, _bias_owners(g) + g.per_unit) + g.entries) for g in found)
    return tuple(g for g in groups if all(_sliced(specs.get(n)) for n in (g.reader, *g.producers)))


def find_head_groups(model: nn.Module, specs: dict[str, PrunableSpec]) -> tuple[UnitGroup, ...]:
    """The head groups of `model`: one per `nn.MultiheadAttention` whose fused in-projection and out
    projection are both sliced under `specs` (a plain attention, `PrunableSpec.linear`).

    A group's units are the attention's embed_dim dimensions, `UnitGroup.span` = head_dim of them a
    head: row r of the in-projection (q, k, v stacked) computes dimension r % embed_dim, the out
    projection reads dimension j as its column j, and the in-projection bias serves the rows. Its
    units are dead a head at a time only: a head's q and k rows die with the whole head (its scores
    sum over all its dimensions), not with a column of the out projection, so these groups are not
    `find_unit_groups`' and do not link producers to readers for the column patterns; a strategy
    that drops whole heads links them itself (Federated Dropout of hidden units).
    """
    found = []
    for path, m in model.named_modules():
        p = f"{path}." if path else ""
        if not isinstance(m, nn.MultiheadAttention) or not all(
            _sliced(specs.get(n), splits) for n, splits in ((f"{p}in_proj_weight", 3), (f"{p}out_proj.weight", 1))
        ):
            continue
        bias = (f"{p}in_proj_bias",) if m.in_proj_bias is not None else ()
        found.append(UnitGroup(f"{p}out_proj.weight", (f"{p}in_proj_weight",), (), m.embed_dim, entries=bias,
                               span=m.head_dim))
    return tuple(found)


def _bias_owners(group: UnitGroup) -> tuple[str, ...]:
    return tuple(n.removesuffix(".weight") for n in group.producers)


def _entries_of(model: nn.Module, paths: tuple[str, ...]) -> tuple[str, ...]:
    """Names of the parameters and running statistics the modules at `paths` hold themselves (not
    their submodules': the joint network's output layer is the reader)."""
    names = []
    for path in paths:
        module = model.get_submodule(path)
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        names += [f"{path}.{n}" for n, t in own if t is not None and t.dim() > 0]
    return tuple(names)


def held_entries(groups: tuple[UnitGroup, ...], masks: MaskDict, shapes: dict[str, torch.Size]) -> MaskDict:
    """Bool masks of the `UnitGroup.entries` a client held: those of the units its reader mask
    reads (groups without a reader mask are held whole, and have no entry). Names not in `shapes`
    (not federated, e.g. `num_batches_tracked`) are left out.

    Args:
        groups: the unit groups whose units clients may drop.
        masks: the client's masks (`Strategy.client_masks`).
        shapes: full shapes of the server's state entries.
    """
    held: MaskDict = {}
    for g in groups:
        if g.reader not in masks:
            continue
        live = live_units(masks[g.reader], g.taps)
        for name in g.entries:
            if name in shapes:
                shape = shapes[name]
                rows = live.repeat(shape[0] // g.width)
                held[name] = rows.view(-1, *([1] * (len(shape) - 1))).expand(shape)
    return held


def _sliced(spec: PrunableSpec | None, splits: int = 1) -> bool:
    return spec is not None and is_sliced(spec) and spec.splits == splits


def find_channel_groups(model: nn.Module, specs: dict[str, PrunableSpec]) -> tuple[UnitGroup, ...]:
    """The channel groups of `model`'s `ChannelReader`s whose Linear is sliced under a column pattern
    that prunes it by channels, and whose convolution is masked (`specs` holds it)."""
    found = []
    for r in channel_readers(model):
        reader, conv = specs.get(r.linear), specs.get(r.conv)
        if not _sliced(reader) or conv is None or PATTERN_SPECS[conv.pattern].entrywise:
            continue
        assert reader is not None
        if reader.pattern in CHANNEL_PATTERNS and reader.taps == r.taps and reader.shape[1] % r.taps == 0:
            found.append(UnitGroup(r.linear, (r.conv,), (), reader.shape[1] // r.taps, r.taps))
    return tuple(found)


def link_units(model: nn.Module, specs: dict[str, PrunableSpec]) -> dict[str, PrunableSpec]:
    """`specs` with each producer's `feeds` set to its group's reader (unit and channel groups)."""
    out = dict(specs)
    for g in find_unit_groups(model, specs) + find_channel_groups(model, specs):
        for name in g.producers:
            out[name] = replace(out[name], feeds=g.reader)
    return out


def live_units(reader_mask: torch.Tensor, taps: int = 1) -> torch.Tensor:
    """Bool (in_features // taps,): the units a Linear / pointwise conv mask reads any input feature
    of, `taps` adjacent features a unit (see `UnitGroup.taps`)."""
    return reader_mask.reshape(reader_mask.shape[0], -1).any(0).view(-1, taps).any(1)


def live_masks(masks: MaskDict, specs: dict[str, PrunableSpec]) -> MaskDict:
    """`masks` with the rows of each producer that only compute dead units removed."""
    out = dict(masks)
    for name, spec in specs.items():
        if not spec.feeds or name not in masks or spec.feeds not in masks:
            continue
        live = live_units(masks[spec.feeds], specs[spec.feeds].taps)
        if bool(live.all()):
            continue
        rows = live.repeat(spec.shape[0] // live.numel())
        out[name] = masks[name] & rows.view(-1, *([1] * (masks[name].dim() - 1)))
    return out


# --- client side: per-unit layers on the live units -----------------------------------------------


class LiveDepthwiseConv1d(nn.Module):
    """A depthwise `nn.Conv1d` run on the live channels: same parameters (full shape), compact input.

    Built from a `DepthwiseConv1d`, it sums over the kernel positions `taps` only (None: all), as
    that layer does; from another depthwise `nn.Conv1d`, it calls ``F.conv1d``.
    """

    def __init__(self, conv: nn.Conv1d, units: torch.Tensor) -> None:
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.by_taps = isinstance(conv, DepthwiseConv1d)
        self.register_buffer("units", units)
        self.register_buffer("taps", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        units: torch.Tensor = self.units  # type: ignore[assignment]
        bias = None if self.bias is None else self.bias.index_select(0, units)
        weight = self.weight.index_select(0, units)
        if self.by_taps:
            return depthwise_conv1d(x, weight, bias, int(self.padding[0]), self.taps)  # type: ignore[arg-type]
        return F.conv1d(x, weight, bias, self.stride, self.padding, self.dilation, groups=units.numel())


class LiveBatchNorm1d(nn.Module):
    """An `nn.BatchNorm1d` run on the live channels; their running statistics update in place."""

    def __init__(self, norm: nn.BatchNorm1d, units: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias = norm.weight, norm.bias
        self.register_buffer("running_mean", norm.running_mean)
        self.register_buffer("running_var", norm.running_var)
        self.register_buffer("num_batches_tracked", norm.num_batches_tracked)
        self.momentum, self.eps = norm.momentum, norm.eps
        self.register_buffer("units", units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        units: torch.Tensor = self.units  # type: ignore[assignment]
        mean: torch.Tensor = self.running_mean  # type: ignore[assignment]
        var: torch.Tensor = self.running_var  # type: ignore[assignment]
        live_mean, live_var = mean.index_select(0, units), var.index_select(0, units)
        weight = None if self.weight is None else self.weight.index_select(0, units)
        bias = None if self.bias is None else self.bias.index_select(0, units)
        y = F.batch_norm(x, live_mean, live_var, weight, bias, self.training, self.momentum or 0.0, self.eps)
        if self.training:
            with torch.no_grad():
                mean.index_copy_(0, units, live_mean)
                var.index_copy_(0, units, live_var)
                self.num_batches_tracked.add_(1)  # type: ignore[operator]
        return y


class LiveJoiner(nn.Module):
    """The transducer joint network on the live joint dimensions: the (compact) source encodings plus
    the target encodings' live dimensions, ReLU or tanh, then the output layer (compact input)."""

    def __init__(self, joiner: _Joiner, units: torch.Tensor) -> None:
        super().__init__()
        self.linear = joiner.linear
        self.activation = joiner.activation
        self.register_buffer("units", units)

    def forward(
        self, source_encodings: torch.Tensor, source_lengths: torch.Tensor, target_encodings: torch.Tensor,
        target_lengths: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.linear(self.hidden(source_encodings, target_encodings)), source_lengths, target_lengths

    def hidden(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(..., T, live)`` compact source and ``(..., U, D)`` target encodings -> ``(..., T, U, live)``."""
        source, target = self.inputs(source, target)
        return self.activation(source.unsqueeze(-2) + target.unsqueeze(-3))

    def inputs(self, source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The compact source and the target encodings' live dimensions: what the joint adds."""
        units: torch.Tensor = self.units  # type: ignore[assignment]
        return source, target.index_select(-1, units)


def live_module(module: nn.Module, units: torch.Tensor) -> nn.Module:
    """The per-unit `module` run on `units` (long indices) only."""
    if isinstance(module, nn.Conv1d):
        return LiveDepthwiseConv1d(module, units)
    if isinstance(module, nn.BatchNorm1d):
        if module.momentum is None:
            raise ValueError("a batch norm with momentum=None (cumulative average) cannot run on live units: set one")
        return LiveBatchNorm1d(module, units)
    if isinstance(module, _Joiner):
        return LiveJoiner(module, units)
    raise TypeError(f"{type(module).__name__} is not a per-unit layer find_unit_groups knows")
