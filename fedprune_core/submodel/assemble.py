"""Client-model assembly: load a payload into the model a client trains, and encode its upload.

`build_client_model` replaces each sliced weight's layer by its `fedprune_core.submodel.sliced`
layer, loads masked parameters with their masks, and runs the layers around dead units (see
`fedprune_core.units`) on the live units only; `client_update` encodes the trained values as
`fedprune_core.submodel.payload` describes.

With `rescale_kept` (Federated Dropout) a client trains its sub-model as inverted dropout: the
outputs of a row-pruned weight's kept units are scaled by rows / kept rows of their matrix (a unit
group's hidden units, dropped as the reader's columns: the reader's product by units / kept
units, once, where they are read), so activations keep the full model's expected size; the
weights themselves are not scaled, and the server evaluates the full model unscaled, as dropout
does at inference.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from fedprune_core.depthwise import DepthwiseConv1d, kept_taps
from fedprune_core.prunable import PrunableSpec, is_plain_attention, is_sliced
from fedprune_core.submodel.payload import SEP, decode_mask, payload_blocks
from fedprune_core.submodel.sliced import (
    Block,
    ChannelSlicedConv2d,
    SlicedLinear,
    SlicedMultiheadAttention,
    SlicedPointwiseConv1d,
)
from fedprune_core.types import MaskDict, Payload
from fedprune_core.units import (
    LiveDepthwiseConv1d,
    UnitGroup,
    find_channel_groups,
    find_head_groups,
    find_unit_groups,
    live_module,
)

_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


class _RowScale(nn.Module):
    """Parametrization: a weight with each output row (dim 0) multiplied by its factor."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale: torch.Tensor = self.scale  # type: ignore[assignment]
        return weight * scale.view(-1, *([1] * (weight.dim() - 1)))


def kept_unit_scale(kept_rows: torch.Tensor, splits: int) -> torch.Tensor:
    """Inverted-dropout factor of each output row: rows / kept rows of its stacked matrix."""
    per = kept_rows.reshape(splits, -1)
    kept = per.sum(1, keepdim=True).clamp(min=1)
    return (per.shape[1] / kept).expand(per.shape).reshape(-1).to(torch.float32)


def _check_row_pattern(spec: PrunableSpec) -> None:
    if spec.pattern != "row":
        raise ValueError(
            f"rescale_kept scales kept output units, but {spec.name} is pruned by pattern {spec.pattern!r}: "
            "use it with row (unit) dropping only, as Federated Dropout does"
        )


def _slice_channels(
    model: nn.Module, masks: MaskDict, outputs: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Masked plain `nn.Conv2d` layers whose masks prune whole input channels, or with dead output
    channels (`outputs`: the live ones, by weight name), become `ChannelSlicedConv2d` over the kept
    input and live output channels; their masks become the same slices.

    Returns:
        the new weights, by parameter name.
    """
    outputs = outputs or {}
    weights: dict[str, torch.Tensor] = {}
    for name, mask in list(masks.items()):
        path, _, leaf = name.rpartition(".")
        conv = model.get_submodule(path) if leaf == "weight" else None
        if type(conv) is not nn.Conv2d or conv.groups != 1:
            continue
        channels = mask.any(dim=(0, 2, 3)).nonzero().flatten()
        live = outputs.get(name)
        if live is not None and bool(mask.any(dim=(1, 2, 3)).index_fill(0, live, False).any()):
            raise ValueError(
                f"the mask of {name} keeps weights of output channels no later layer reads: build masks with "
                "fedprune_core.units.live_masks, as extract() does"
            )
        if 0 < channels.numel() and (channels.numel() < conv.in_channels or live is not None):
            sliced = ChannelSlicedConv2d(conv, channels, live)
            _replace_module(model, path, sliced)
            masks[name] = (mask if live is None else mask[live])[:, channels].contiguous()
            weights[name] = sliced.weight
    return weights


@dataclass(frozen=True)
class ClientModel:
    """A model set up from a payload.

    Attributes:
        module: the model to train (sliced Linear layers replaced by `SlicedLinear`).
        project: re-zeroes pruned entries of masked parameters; call after each optimizer step.
        masks: masks of the masked (not sliced) parameters, by parameter name (a
            `ChannelSlicedConv2d`'s: of its kept channels).
        statistics: names of the running statistics loaded from the payload (uploaded as trained).
    """

    module: nn.Module
    project: Callable[[], None]
    masks: MaskDict
    statistics: tuple[str, ...] = ()


def _replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)


@dataclass(frozen=True)
class _Compact:
    """Where a unit group's live units sit in a compact layer: `pos[u]` for unit u (-1: dead)."""

    pos: torch.Tensor
    live: torch.Tensor

    def rows(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """Compact positions of a producer's global output rows (row r: copy r // width of unit r % width)."""
        pos = self.pos[rows % width]
        if bool((pos < 0).any()):
            raise ValueError("the payload holds rows of dead units: it was not built by extract() with live masks")
        return pos + (rows // width) * self.live.numel()


def _compact_units(
    model: nn.Module, payload: Payload, specs: dict[str, PrunableSpec]
) -> tuple[dict[str, _Compact], dict[str, tuple[_Compact, int]], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per reader, producer and per-unit module of each unit group with dead units: where the live
    units sit (readers; producers with the group's width; per-unit modules: the live unit ids);
    and per masked convolution of a channel group with dead channels, its live output channels.

    Raises:
        ValueError: a channel group's reader reads part of a channel's features.
    """
    readers: dict[str, _Compact] = {}
    producers: dict[str, tuple[_Compact, int]] = {}
    per_unit: dict[str, torch.Tensor] = {}
    conv_outputs: dict[str, torch.Tensor] = {}
    for g in find_unit_groups(model, specs) + _dropped_heads(model, specs) + find_channel_groups(model, specs):
        cols = [c for _, c, _ in payload_blocks(payload, g.reader, specs[g.reader])]
        if not cols:
            continue  # sent dense
        live = torch.unique(torch.cat(cols))
        if live.numel() == g.width * g.taps:
            continue
        pos = torch.full((g.width * g.taps,), -1, dtype=torch.long)
        pos[live] = torch.arange(live.numel())
        compact = _Compact(pos, live)
        readers[g.reader] = compact
        if g.taps > 1:  # a channel group: whole channels are read, the convolution computes those
            channels = torch.unique(live // g.taps)
            if live.numel() != channels.numel() * g.taps:
                raise ValueError(
                    f"the payload of {g.reader} reads part of a channel's {g.taps} features: it was not built "
                    "by extract() from masks made with the spec's taps"
                )
            conv_outputs.update({n: channels for n in g.producers})
            continue
        producers.update({n: (compact, g.width) for n in g.producers})
        per_unit.update({path: live for path in g.per_unit})
    return readers, producers, per_unit, conv_outputs


def _dropped_heads(model: nn.Module, specs: dict[str, PrunableSpec]) -> tuple[UnitGroup, ...]:
    """The head groups whose in-projection feeds the out projection: heads dropped whole (Federated
    Dropout), so the attention runs on the kept ones. Under column pruning a pruned column of the
    out projection leaves its q and k rows alive (`fedprune_core.units.find_head_groups`)."""
    return tuple(g for g in find_head_groups(model, specs) if all(specs[n].feeds == g.reader for n in g.producers))


def _hidden_unit_weights(specs: dict[str, PrunableSpec]) -> frozenset[str]:
    """Weights of unit groups whose units are dropped as columns of the reader (and rows of its
    producers): Federated Dropout of hidden units, scaled once, where the units are read."""
    by_columns = {n for n, s in specs.items() if s.pattern == "column"}
    readers = {s.feeds for s in specs.values() if s.feeds in by_columns}
    return frozenset(n for n, s in specs.items() if n in readers or s.feeds in readers)


def _identity_to_none(index: torch.Tensor, size: int) -> torch.Tensor | None:
    return None if torch.equal(index, torch.arange(size)) else index


@torch.no_grad()
def build_client_model(
    model: nn.Module, payload: Payload, specs: dict[str, PrunableSpec], rescale_kept: bool = False
) -> ClientModel:
    """Load a payload into `model` (modified in place) and return what the client trains.

    Sliced weights become `SlicedLinear` / `SlicedPointwiseConv1d` layers (attention:
    `SlicedMultiheadAttention`); layers of a unit group with dead units run on the live units only,
    and so does any module that declares ``keep_live_units()`` (called once its layers are sliced:
    the speech model's prediction network, `fedprune_core.speech.lstm`).

    Args:
        rescale_kept: train as inverted dropout (see the module's docstring); row pattern only.
    """
    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    statistics = tuple(n for n, b in model.named_buffers() if n in payload)
    for name in statistics:
        model.get_buffer(name).copy_(payload[name])
    readers, producers, per_unit, conv_outputs = _compact_units(model, payload, specs)
    masks: MaskDict = {}
    for name, p in params.items():
        if name in payload:
            p.copy_(payload[name])
        elif name in specs and not is_sliced(specs[name]):
            masks[name] = decode_mask(payload, name, specs[name])
            p.zero_()
            p[masks[name]] = payload[f"{name}{SEP}v"]
            if rescale_kept:
                _check_row_pattern(specs[name])
                kept = masks[name].reshape(p.shape[0], -1).any(1)
                owner, _, leaf = name.rpartition(".")
                row_scale = _RowScale(kept_unit_scale(kept, specs[name].splits))
                parametrize.register_parametrization(model.get_submodule(owner), leaf, row_scale, unsafe=True)
    sliced: dict[str, SlicedLinear] = {}
    hidden_units = _hidden_unit_weights(specs)
    for name in (n for n in params if n in specs and is_sliced(specs[n]) and n not in payload):
        sliced[name] = _sliced_layer(model, name, payload, specs[name], readers, producers, rescale_kept, hidden_units)
    for path, m in list(model.named_modules()):  # attention takes its own projections
        if isinstance(m, nn.MultiheadAttention) and is_plain_attention(m):
            prefix = f"{path}." if path else ""
            in_proj = sliced.pop(f"{prefix}in_proj_weight", None)
            out_proj = sliced.pop(f"{prefix}out_proj.weight", None)
            if in_proj is not None or out_proj is not None:
                _replace_module(model, path, SlicedMultiheadAttention(m, in_proj, out_proj or m.out_proj))
    for name, layer in sliced.items():
        _replace_module(model, name.removesuffix(".weight"), layer)
    for path, live in per_unit.items():
        _replace_module(model, path, live_module(model.get_submodule(path), live))
    _skip_pruned_taps(model, masks)
    params.update(_slice_channels(model, masks, conv_outputs))
    for m in model.modules():  # layers that compute fewer units once sliced (the speech model's LSTM)
        keep_live_units = getattr(m, "keep_live_units", None)
        if callable(keep_live_units):
            keep_live_units()

    def project() -> None:
        with torch.no_grad():
            for n, m in masks.items():
                params[n].mul_(m)

    return ClientModel(model, project, masks, statistics)


def _skip_pruned_taps(model: nn.Module, masks: MaskDict) -> None:
    """Depthwise convolutions with a masked weight sum over the kernel positions their (live)
    channels keep only."""
    for path, m in model.named_modules():
        mask = masks.get(f"{path}.weight")
        if mask is None:
            continue
        if isinstance(m, LiveDepthwiseConv1d) and m.by_taps:
            units: torch.Tensor = m.units  # type: ignore[assignment]
            m.taps = kept_taps(mask, units)
        elif isinstance(m, DepthwiseConv1d):
            m.taps = kept_taps(mask)


def _sliced_layer(
    model: nn.Module,
    name: str,
    payload: Payload,
    spec: PrunableSpec,
    readers: dict[str, _Compact],
    producers: dict[str, tuple[_Compact, int]],
    rescale_kept: bool,
    hidden_units: frozenset[str] = frozenset(),
) -> SlicedLinear:
    """The sliced layer that trains weight `name`'s payload blocks, in compact coordinates where its
    inputs or outputs are live units."""
    if name.endswith("in_proj_weight"):  # its bias is added by the attention
        out_features, bias, kind = spec.shape[0], None, SlicedLinear
    else:
        layer = model.get_submodule(name.removesuffix(".weight"))
        assert isinstance(layer, nn.Linear | nn.Conv1d)
        out_features = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        bias, kind = layer.bias, SlicedLinear if isinstance(layer, nn.Linear) else SlicedPointwiseConv1d
    in_features = spec.numel // spec.shape[0]
    full = payload_blocks(payload, name, spec)
    bias_index: torch.Tensor | None = None
    if name in producers:
        compact, width = producers[name]
        copies = out_features // width
        out_features = copies * compact.live.numel()
        bias_index = (compact.live[None, :] + width * torch.arange(copies)[:, None]).flatten()
        full = [(compact.rows(r, width), c, w) for r, c, w in full]
    if name in readers:
        in_features = readers[name].live.numel()
        full = [(r, readers[name].pos[c], w) for r, c, w in full]
    blocks: list[Block] = [
        (_identity_to_none(r, out_features), _identity_to_none(c, in_features), w) for r, c, w in full
    ]
    scale: torch.Tensor | None = None
    if rescale_kept and name in hidden_units:  # scaled once, where the kept units are read
        if name in readers:
            scale = torch.full((out_features,), readers[name].pos.numel() / readers[name].live.numel())
    elif rescale_kept:
        _check_row_pattern(spec)
        kept = torch.zeros(out_features, dtype=torch.bool)
        for rows, _, _ in blocks:
            kept[slice(None) if rows is None else rows] = True
        scale = kept_unit_scale(kept, spec.splits)
    return kind(out_features, blocks, bias, scale, bias_index)


def client_update(
    client: ClientModel, specs: dict[str, PrunableSpec], tensors: dict[str, torch.Tensor] | None = None
) -> Payload:
    """The payload a client uploads after training: trained values only, no indices.

    Args:
        client: the trained client model.
        specs: the prunable specs the payload was built with.
        tensors: per-parameter tensors of the client module to encode instead of its parameters
            (e.g. accumulated squared gradients), keyed like `client.module.named_parameters()`;
            running statistics are uploaded only without them.
    """
    params = tensors if tensors is not None else dict(client.module.named_parameters())
    update: Payload = {}
    if tensors is None:
        update.update({n: client.module.get_buffer(n).detach().clone() for n in client.statistics})
    for parametrized_name, t in params.items():
        name = _PARAMETRIZED.sub(r"\1\2", parametrized_name)  # a rescaled masked weight: its own name
        path, _, leaf = name.rpartition(".")
        weight_name = f"{path}.weight" if f"{path}.weight" in specs else f"{path}_weight"  # fused: in_proj_weight
        if weight_name in specs and is_sliced(specs[weight_name]) and leaf.startswith("w"):
            update[f"{weight_name}{SEP}{leaf}"] = t.detach().clone()
        elif name in client.masks:
            update[f"{name}{SEP}v"] = t.detach()[client.masks[name]].clone()
        else:
            update[name] = t.detach().clone()
    return update
