"""The payload: what a client downloads and uploads (Lin et al. 2022, Sec. 2.1; Caldas et al. 2018).

A payload is a flat dict of tensors, encoded per parameter (running statistics travel like dense
parameters):

- dense (not pruned): down `name`, up `name`.
- sliced (the weight of an `nn.Linear`, a pointwise `nn.Conv1d` or an attention projection under a
  structured pattern; rows that only compute dead units, see `fedprune_core.units`, left out):
  down `name|w{i}` for each kept block (one per `fedprune_core.masks.block_regions` region: the
  matrix, or the two halves of a half pattern, for each stacked q/k/v matrix), with `name|r{i}` /
  `name|c{i}` its kept row / column indices (int32, omitted when the block spans its whole
  region); up `name|w{i}`.
- masked (anything else pruned): down `name|v`, the kept values, plus `name|g`, the kept group ids
  (int32), or for unstructured masks `name|b`, a packed bit mask (one bit per entry); up `name|v`.
  A masked `nn.Conv2d` whose mask prunes whole input channels is trained over the kept channels
  only (`fedprune_core.submodel.sliced.ChannelSlicedConv2d`); its values travel in the same order.

The server writes a payload with `extract` and scatters an upload back with `expand`; a client
reads one with `fedprune_core.submodel.assemble.build_client_model` and writes its upload with
`client_update`. `payload_nbytes` is the exact number of bytes of a payload's tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedprune_core.masks import PATTERN_SPECS, block_regions, expand_groups, group_scores, groups_of
from fedprune_core.prunable import PrunableSpec, from_matrices, is_sliced, matrices
from fedprune_core.types import MaskDict, Payload, StateDict
from fedprune_core.units import live_masks

SEP = "|"
"""Between a parameter's name and the part of its encoding: `name|w0`, `name|v`."""


def payload_nbytes(payload: Payload) -> int:
    """Exact bytes of a payload's tensor data."""
    return sum(t.numel() * t.element_size() for t in payload.values())


def float_entries(payload: Payload) -> int:
    """Entries of a payload's float tensors: the values a client holds (indices left out)."""
    return sum(t.numel() for t in payload.values() if t.is_floating_point())


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
    """Kept group ids (int32), numbered across the spec's stacked matrices.

    Raises:
        ValueError: the mask keeps part of a group (it was not made with the spec's pattern and taps).
    """
    parts = matrices(mask, spec)
    grids = [groups_of(m, spec.pattern, spec.taps) for m in parts]
    rebuilt = [expand_groups(g, spec.pattern, spec.matrix_shape, spec.taps) for g in grids]
    if not all(torch.equal(r, m) for r, m in zip(rebuilt, parts, strict=True)):
        raise ValueError(
            f"the mask of {spec.name} keeps part of a {spec.pattern} group (taps={spec.taps}): make masks with "
            "fedprune_core.masks.make_mask(..., pattern=spec.pattern, taps=spec.taps)"
        )
    return torch.cat([g.flatten() for g in grids]).nonzero().flatten().to(torch.int32)


def groups_to_mask(ids: torch.Tensor, spec: PrunableSpec) -> torch.Tensor:
    """Full-shape bool mask from kept group ids."""
    shape2d = spec.matrix_shape
    grid_shape = group_scores(torch.zeros(shape2d), spec.pattern, spec.taps).shape
    per = grid_shape.numel()
    keep = torch.zeros(per * spec.splits, dtype=torch.bool)
    keep[ids.long()] = True
    parts = [expand_groups(g.reshape(grid_shape), spec.pattern, shape2d, spec.taps) for g in keep.split(per)]
    return from_matrices(parts, spec)


def linear_blocks(
    mask: torch.Tensor, pattern: str, splits: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(kept rows, kept columns) index pairs of the dense blocks a structured 2-D mask keeps, one
    per `block_regions` region: the rows and columns with any kept entry in it (a row / column
    mask restricted to live rows, see `fedprune_core.units`, is still a product of the two)."""
    blocks = []
    for r0, r1, c0, c1 in block_regions((mask.shape[0], mask.shape[1]), pattern, splits):
        region = mask[r0:r1, c0:c1]
        blocks.append((region.any(1).nonzero().flatten() + r0, region.any(0).nonzero().flatten() + c0))
    return blocks


# --- server side: extract and expand ----------------------------------------------------------


def extract(weights: StateDict, masks: MaskDict, specs: dict[str, PrunableSpec]) -> Payload:
    """The payload a client downloads: every parameter, pruned ones in compact form."""
    payload: Payload = {}
    masks = live_masks(masks, specs)
    for name, w in weights.items():
        if name not in masks:
            payload[name] = w.detach().clone()
            continue
        spec, mask = specs[name], masks[name]
        if is_sliced(spec):  # a Linear's (out, in) weight, a pointwise conv's (out, in, 1), a fused q/k/v
            w2 = w.reshape(w.shape[0], -1)
            regions = block_regions((w2.shape[0], w2.shape[1]), spec.pattern, spec.splits)
            blocks = linear_blocks(mask.reshape(w2.shape), spec.pattern, spec.splits)
            for i, ((r, c), (r0, r1, c0, c1)) in enumerate(zip(blocks, regions, strict=True)):
                payload[f"{name}{SEP}w{i}"] = w2[r][:, c].detach().clone()
                if r.numel() != r1 - r0:  # indices only where the block is not its whole region
                    payload[f"{name}{SEP}r{i}"] = r.to(torch.int32)
                if c.numel() != c1 - c0:
                    payload[f"{name}{SEP}c{i}"] = c.to(torch.int32)
            continue
        payload[f"{name}{SEP}v"] = w[mask].detach().clone()
        if PATTERN_SPECS[spec.pattern].entrywise or spec.feeds:  # a producer's live mask is not one pattern's groups
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
        coordinates the client held (dense parameters are held everywhere and have no entry; rows
        that only compute dead units, see `fedprune_core.units`, are not held).
    """
    values: StateDict = {}
    masks = live_masks(masks, specs)
    for name, shape in shapes.items():
        if name not in masks:
            values[name] = update[name]
            continue
        mask, full = masks[name], torch.zeros(shape, dtype=_dtype_of(update, name))
        if is_sliced(specs[name]):
            full2 = full.view(shape[0], -1)
            spec = specs[name]
            for i, (r, c) in enumerate(linear_blocks(mask.reshape(full2.shape), spec.pattern, spec.splits)):
                full2[r[:, None], c[None, :]] = update[f"{name}{SEP}w{i}"]
        else:
            full[mask] = update[f"{name}{SEP}v"]
        values[name] = full
    return values, {name: masks[name] for name in shapes if name in masks}


def _dtype_of(update: Payload, name: str) -> torch.dtype:
    key = f"{name}{SEP}v" if f"{name}{SEP}v" in update else f"{name}{SEP}w0"
    return update[key].dtype


# --- client side: read a payload --------------------------------------------------------------


def decode_mask(payload: Payload, name: str, spec: PrunableSpec) -> torch.Tensor:
    """Full-shape bool mask of masked parameter `name`, from its packed bits or its group ids."""
    if f"{name}{SEP}b" in payload:
        return unpack_bits(payload[f"{name}{SEP}b"], spec.shape)
    return groups_to_mask(payload[f"{name}{SEP}g"], spec)


def payload_blocks(
    payload: Payload, name: str, spec: PrunableSpec
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(rows, columns, weight) of each payload block of sliced weight `name`, in full coordinates
    (a block without indices is its whole region)."""
    blocks = []
    regions = block_regions((spec.shape[0], spec.numel // spec.shape[0]), spec.pattern, spec.splits)
    for i, (r0, r1, c0, c1) in enumerate(regions):
        if f"{name}{SEP}w{i}" not in payload:
            break
        rows, cols = payload.get(f"{name}{SEP}r{i}"), payload.get(f"{name}{SEP}c{i}")
        blocks.append((torch.arange(r0, r1) if rows is None else rows.long(),
                       torch.arange(c0, c1) if cols is None else cols.long(), payload[f"{name}{SEP}w{i}"]))
    return blocks
