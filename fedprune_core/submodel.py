"""What a client downloads, trains and uploads (Lin et al. 2022, Sec. 2.1; Caldas et al. 2018).

A payload is a flat dict of tensors, encoded per parameter (running statistics travel like dense
parameters):

- dense (not pruned): down `name`, up `name`.
- sliced (the weight of an `nn.Linear` or a pointwise `nn.Conv1d` under a structured pattern):
  down `name|w{i}` for each kept block, with `name|r{i}` / `name|c{i}` its kept row / column
  indices (int32, omitted when all are kept); up `name|w{i}`.
- masked (anything else pruned): down `name|v`, the kept values, plus `name|g`, the kept group ids
  (int32), or for unstructured masks `name|b`, a packed bit mask (one bit per entry); up `name|v`.

A sliced Linear is trained by `SlicedLinear` (a pointwise conv by `SlicedPointwiseConv1d`) as
physically smaller dense blocks, so the client's parameters, gradients, optimizer state and
matmul work shrink with sparsity. `payload_nbytes`
is the exact number of bytes of a payload's tensors.

With `rescale_kept` (Federated Dropout) a client trains its sub-model as inverted dropout: the
outputs of a row-pruned weight's kept units are scaled by rows / kept rows of their matrix, so
activations keep the full model's expected size; the weights themselves are not scaled, and the
server evaluates the full model unscaled, as dropout does at inference.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from fedprune_core.masks import GROUP_SCORES, expand_groups, groups_of
from fedprune_core.prunable import PrunableSpec, from_matrices, matrices
from fedprune_core.types import MaskDict, Payload, StateDict

SEP = "|"
_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


def payload_nbytes(payload: Payload) -> int:
    """Exact bytes of a payload's tensor data."""
    return sum(t.numel() * t.element_size() for t in payload.values())


def is_sliced(spec: PrunableSpec) -> bool:
    """Whether a parameter travels as physically smaller Linear blocks (Linear or pointwise Conv1d)."""
    return spec.linear and spec.splits == 1 and spec.pattern != "unstructured"


# --- masks <-> group ids and bits -------------------------------------------------------------


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8, 8 entries a byte (little-endian bit order)."""
    flat = mask.flatten().to(torch.uint8)
    flat = F.pad(flat, (0, (-flat.numel()) % 8)).reshape(-1, 8)
    return (flat << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_bits`."""
    n = 1
    for d in shape:
        n *= d
    bits = (packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.flatten()[:n].to(torch.bool).reshape(shape)


def mask_to_groups(mask: torch.Tensor, spec: PrunableSpec) -> torch.Tensor:
    """Kept group ids (int32), numbered across the spec's stacked matrices."""
    grids = [groups_of(m, spec.pattern).flatten() for m in matrices(mask, spec)]
    return torch.cat(grids).nonzero().flatten().to(torch.int32)


def groups_to_mask(ids: torch.Tensor, spec: PrunableSpec) -> torch.Tensor:
    """Full-shape bool mask from kept group ids."""
    shape2d = spec.matrix_shape
    grid_shape = GROUP_SCORES[spec.pattern](torch.zeros(shape2d)).shape
    per = grid_shape.numel()
    keep = torch.zeros(per * spec.splits, dtype=torch.bool)
    keep[ids.long()] = True
    parts = [expand_groups(g.reshape(grid_shape), spec.pattern, shape2d) for g in keep.split(per)]
    return from_matrices(parts, spec)


def linear_blocks(mask: torch.Tensor, pattern: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(kept rows, kept columns) index pairs of the dense blocks a structured Linear mask keeps."""
    out_f, in_f = mask.shape
    rows, cols = torch.arange(out_f), torch.arange(in_f)
    if pattern == "row":
        return [(mask[:, 0].nonzero().flatten(), cols)]
    if pattern == "column":
        return [(rows, mask[0].nonzero().flatten())]
    if pattern == "half_row":
        h = in_f // 2
        return [(mask[:, 0].nonzero().flatten(), cols[:h]), (mask[:, h].nonzero().flatten(), cols[h:])]
    h = out_f // 2
    return [(rows[:h], mask[0].nonzero().flatten()), (rows[h:], mask[h].nonzero().flatten())]


# --- server side: extract and expand ----------------------------------------------------------


def extract(weights: StateDict, masks: MaskDict, specs: dict[str, PrunableSpec]) -> Payload:
    """The payload a client downloads: every parameter, pruned ones in compact form."""
    payload: Payload = {}
    for name, w in weights.items():
        if name not in masks:
            payload[name] = w.detach().clone()
            continue
        spec, mask = specs[name], masks[name]
        if is_sliced(spec):  # a Linear's (out, in) weight, or a pointwise conv's (out, in, 1)
            w2 = w.reshape(w.shape[0], -1)
            for i, (r, c) in enumerate(linear_blocks(mask.reshape(w2.shape), spec.pattern)):
                payload[f"{name}{SEP}w{i}"] = w2[r][:, c].detach().clone()
                if r.numel() != w2.shape[0]:
                    payload[f"{name}{SEP}r{i}"] = r.to(torch.int32)
                if c.numel() != w2.shape[1]:
                    payload[f"{name}{SEP}c{i}"] = c.to(torch.int32)
            continue
        payload[f"{name}{SEP}v"] = w[mask].detach().clone()
        if spec.pattern == "unstructured":
            payload[f"{name}{SEP}b"] = pack_bits(mask)
        else:
            payload[f"{name}{SEP}g"] = mask_to_groups(mask, spec)
    return payload


def expand(
    update: Payload, masks: MaskDict, specs: dict[str, PrunableSpec], shapes: dict[str, torch.Size]
) -> tuple[StateDict, MaskDict]:
    """Scatter an uploaded update back to full shape.

    Returns:
        (values, held): full-shape values, and for pruned parameters the bool mask of the
        coordinates the client held (dense parameters are held everywhere and have no entry).
    """
    values: StateDict = {}
    for name, shape in shapes.items():
        if name not in masks:
            values[name] = update[name]
            continue
        mask, full = masks[name], torch.zeros(shape, dtype=_dtype_of(update, name))
        if is_sliced(specs[name]):
            full2 = full.view(shape[0], -1)
            for i, (r, c) in enumerate(linear_blocks(mask.reshape(full2.shape), specs[name].pattern)):
                full2[r[:, None], c[None, :]] = update[f"{name}{SEP}w{i}"]
        else:
            full[mask] = update[f"{name}{SEP}v"]
        values[name] = full
    return values, {name: masks[name] for name in shapes if name in masks}


def _dtype_of(update: Payload, name: str) -> torch.dtype:
    key = f"{name}{SEP}v" if f"{name}{SEP}v" in update else f"{name}{SEP}w0"
    return update[key].dtype


# --- client side -------------------------------------------------------------------------------


class SlicedLinear(nn.Module):
    """A Linear layer trained as the dense blocks its mask keeps.

    y = sum_i scatter_rows_i(x[..., cols_i] @ W_i^T) + b, with W_i of shape (|rows_i|, |cols_i|):
    parameters, gradients and matmul work are those of the kept blocks only.
    """

    def __init__(
        self,
        out_features: int,
        blocks: list[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]],
        bias: torch.Tensor | None,
        scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.out_features = out_features
        self.num_blocks = len(blocks)
        for i, (rows, cols, w) in enumerate(blocks):
            self.register_parameter(f"w{i}", nn.Parameter(w.clone()))
            self.register_buffer(f"r{i}", None if rows is None else rows.long())
            self.register_buffer(f"c{i}", None if cols is None else cols.long())
        self.bias = bias
        self.register_buffer("scale", scale)  # per output row, before the bias (inverted dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        out: torch.Tensor | None = None
        for i in range(self.num_blocks):
            rows, cols = getattr(self, f"r{i}"), getattr(self, f"c{i}")
            y = F.linear(x if cols is None else x.index_select(-1, cols), getattr(self, f"w{i}"))
            if rows is not None:
                y = x.new_zeros(*x.shape[:-1], self.out_features).index_add(-1, rows, y)
            out = y if out is None else out + y
        assert out is not None
        scale: torch.Tensor | None = self.scale  # type: ignore[assignment]
        if scale is not None:
            out = out * scale
        return out if self.bias is None else out + self.bias


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


class SlicedPointwiseConv1d(SlicedLinear):
    """A pointwise (kernel 1) Conv1d trained as the dense blocks its mask keeps: a `SlicedLinear`
    over the channel dimension of (N, C, L) inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, in_channels, L) -> (N, out_channels, L)."""
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


@dataclass(frozen=True)
class ClientModel:
    """A model set up from a payload.

    Attributes:
        module: the model to train (sliced Linear layers replaced by `SlicedLinear`).
        project: re-zeroes pruned entries of masked parameters; call after each optimizer step.
        masks: masks of the masked (not sliced) parameters, by parameter name.
        statistics: names of the running statistics loaded from the payload (uploaded as trained).
    """

    module: nn.Module
    project: Callable[[], None]
    masks: MaskDict
    statistics: tuple[str, ...] = ()


def _decode_mask(payload: Payload, name: str, spec: PrunableSpec) -> torch.Tensor:
    if f"{name}{SEP}b" in payload:
        return unpack_bits(payload[f"{name}{SEP}b"], spec.shape)
    return groups_to_mask(payload[f"{name}{SEP}g"], spec)


def _replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)


@torch.no_grad()
def build_client_model(
    model: nn.Module, payload: Payload, specs: dict[str, PrunableSpec], rescale_kept: bool = False
) -> ClientModel:
    """Load a payload into `model` (modified in place) and return what the client trains.

    Args:
        rescale_kept: train as inverted dropout (see the module's docstring); row pattern only.
    """
    params = dict(model.named_parameters())
    statistics = tuple(n for n, b in model.named_buffers() if n in payload)
    for name in statistics:
        model.get_buffer(name).copy_(payload[name])
    masks: MaskDict = {}
    for name, p in params.items():
        if name in payload:
            p.copy_(payload[name])
        elif name in specs and not is_sliced(specs[name]):
            masks[name] = _decode_mask(payload, name, specs[name])
            p.zero_()
            p[masks[name]] = payload[f"{name}{SEP}v"]
            if rescale_kept:
                _check_row_pattern(specs[name])
                kept = masks[name].reshape(p.shape[0], -1).any(1)
                owner, _, leaf = name.rpartition(".")
                row_scale = _RowScale(kept_unit_scale(kept, specs[name].splits))
                parametrize.register_parametrization(model.get_submodule(owner), leaf, row_scale, unsafe=True)
    for name in (n for n in params if n in specs and is_sliced(specs[n]) and n not in payload):
        path = name.removesuffix(".weight")
        linear = model.get_submodule(path)
        assert isinstance(linear, nn.Linear | nn.Conv1d)
        out_features = linear.out_features if isinstance(linear, nn.Linear) else linear.out_channels
        blocks = []
        i = 0
        while f"{name}{SEP}w{i}" in payload:
            rows, cols = payload.get(f"{name}{SEP}r{i}"), payload.get(f"{name}{SEP}c{i}")
            blocks.append((rows, cols, payload[f"{name}{SEP}w{i}"]))
            i += 1
        scale: torch.Tensor | None = None
        if rescale_kept:
            _check_row_pattern(specs[name])
            kept = torch.zeros(out_features, dtype=torch.bool)
            for rows, _, _ in blocks:
                kept[slice(None) if rows is None else rows.long()] = True
            scale = kept_unit_scale(kept, specs[name].splits)
        sliced = SlicedLinear if isinstance(linear, nn.Linear) else SlicedPointwiseConv1d
        _replace_module(model, path, sliced(out_features, blocks, linear.bias, scale))

    def project() -> None:
        with torch.no_grad():
            for n, m in masks.items():
                params[n].mul_(m)

    return ClientModel(model, project, masks, statistics)


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
        weight_name = f"{path}.weight"
        if weight_name in specs and is_sliced(specs[weight_name]) and leaf.startswith("w"):
            update[f"{weight_name}{SEP}{leaf}"] = t.detach().clone()
        elif name in client.masks:
            update[f"{name}{SEP}v"] = t.detach()[client.masks[name]].clone()
        else:
            update[name] = t.detach().clone()
    return update
