"""What a client downloads, trains and uploads (Lin et al. 2022, Sec. 2.1; Caldas et al. 2018).

A payload is a flat dict of tensors, encoded per parameter (running statistics travel like dense
parameters):

- dense (not pruned): down `name`, up `name`.
- sliced (the weight of an `nn.Linear`, a pointwise `nn.Conv1d` or an attention projection under a
  structured pattern; rows that only compute dead units, see `fedprune_core.units`, left out):
  down `name|w{i}` for each kept block (one per `block_regions` region: the matrix, or the two
  halves of a half pattern, for each stacked q/k/v matrix), with `name|r{i}` / `name|c{i}` its
  kept row / column indices (int32, omitted when the block spans its whole region); up `name|w{i}`.
- masked (anything else pruned): down `name|v`, the kept values, plus `name|g`, the kept group ids
  (int32), or for unstructured masks `name|b`, a packed bit mask (one bit per entry); up `name|v`.
  A masked `nn.Conv2d` whose mask prunes whole input channels is trained by `ChannelSlicedConv2d`
  over the kept channels only; its values travel in the same order.

A sliced Linear is trained by `SlicedLinear` (a pointwise conv by `SlicedPointwiseConv1d`,
attention by `SlicedMultiheadAttention`) as physically smaller dense blocks, so the client's
parameters, gradients, optimizer state and matmul work shrink with sparsity; layers around dead
units run on the live units only. `payload_nbytes` is the exact number of bytes of a payload's
tensors.

With `rescale_kept` (Federated Dropout) a client trains its sub-model as inverted dropout: the
outputs of a row-pruned weight's kept units are scaled by rows / kept rows of their matrix (a unit
group's hidden units, dropped as the reader's columns: the reader's product by units / kept
units, once, where they are read), so activations keep the full model's expected size; the
weights themselves are not scaled, and the server evaluates the full model unscaled, as dropout
does at inference.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from fedprune_core.depthwise import DepthwiseConv1d, kept_taps
from fedprune_core.masks import PATTERN_SPECS, block_regions, expand_groups, group_scores, groups_of
from fedprune_core.prunable import PrunableSpec, from_matrices, is_plain_attention, is_sliced, matrices
from fedprune_core.types import MaskDict, Payload, StateDict
from fedprune_core.units import LiveDepthwiseConv1d, find_channel_groups, find_unit_groups, live_masks, live_module

SEP = "|"
_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


def payload_nbytes(payload: Payload) -> int:
    """Exact bytes of a payload's tensor data."""
    return sum(t.numel() * t.element_size() for t in payload.values())


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


# --- client side -------------------------------------------------------------------------------


class SlicedLinear(nn.Module):
    """A Linear layer trained as the dense blocks its mask keeps.

    y = sum_i scatter_rows_i(x[..., cols_i] @ W_i^T) + b, with W_i of shape (|rows_i|, |cols_i|):
    parameters, gradients and matmul work are those of the kept blocks only. Rows and columns are
    in the layer's own coordinates: a layer that reads or emits only live units (see
    `fedprune_core.units`) has compact inputs or outputs, and `bias_index` picks the bias entries
    of its compact outputs. When the blocks' rows tile the output in order (one block with all
    rows, a fused q/k/v's three, half_column's two halves) the outputs are concatenated, not
    scattered.
    """

    def __init__(
        self,
        out_features: int,
        blocks: list[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]],
        bias: torch.Tensor | None,
        scale: torch.Tensor | None = None,
        bias_index: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.out_features = out_features
        self.num_blocks = len(blocks)
        every = [torch.arange(out_features) if r is None else r.long() for r, _, _ in blocks]
        self.tiled = sum(r.numel() for r in every) == out_features and torch.equal(
            torch.cat(every), torch.arange(out_features)
        )
        for i, (rows, cols, w) in enumerate(blocks):
            self.register_parameter(f"w{i}", nn.Parameter(w.clone()))
            self.register_buffer(f"r{i}", None if rows is None else rows.long())
            self.register_buffer(f"c{i}", None if cols is None else cols.long())
        self.bias = bias
        self.register_buffer("bias_index", bias_index)
        self.register_buffer("scale", scale)  # per output row, before the bias (inverted dropout)

    def forward(
        self, x: torch.Tensor, combine: bool = True, to_input: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> Any:
        """x: (..., in_features) -> (..., out_features).

        Args:
            x: the input; with ``to_input``, a tensor the input is a reshaping of (`forward_from`).
            combine: False: each block's ``x[..., cols_i] @ W_i^T``, unplaced, unscaled and without
                the bias.
            to_input: a differentiable reshaping (permute, reshape) of ``x`` to ``(..., in_features)``.
        """
        cols = [getattr(self, f"c{i}") for i in range(self.num_blocks)]
        weights = [getattr(self, f"w{i}") for i in range(self.num_blocks)]
        if to_input is not None:
            products = _GatheredLinear.apply(x, to_input, tuple(cols), *weights)
        elif combine and self.num_blocks == 1 and self.tiled and self.scale is None:
            # one product, the bias fused into it
            return F.linear(x if cols[0] is None else take_columns(x, cols[0]), weights[0], self._bias())
        elif all(c is not None for c in cols) and sum(c.numel() for c in cols) > x.shape[-1]:
            # the blocks' gathered inputs would outweigh x itself: keep x once, gather again in backward
            products = _GatheredLinear.apply(x, _identity, tuple(cols), *weights)
        else:
            products = [F.linear(x if c is None else take_columns(x, c), w) for c, w in zip(cols, weights, strict=True)]
        return self._combine(products) if combine else products

    def forward_from(self, source: torch.Tensor, to_input: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``forward(to_input(source))`` for a ``source`` that backward keeps anyway (an activation's
        output): the layer keeps ``source`` instead of its own copy of the input (the gathered
        columns, or the reshaping itself when a block reads every column). Called through the
        module, as every other use of the layer, so that its hooks see it.

        Args:
            source: the tensor the input is a reshaping of.
            to_input: a differentiable reshaping (permute, reshape) of ``source`` to ``(..., in_features)``.
        """
        out: torch.Tensor = self(source, to_input=to_input)
        return out

    def _combine(self, ys: Sequence[torch.Tensor]) -> torch.Tensor:
        """The layer's output from its blocks' products ``ys``: placed in their rows, scaled, biased."""
        if self.tiled:
            out = ys[0] if len(ys) == 1 else torch.cat(list(ys), dim=-1)
        else:
            out = ys[0].new_zeros(*ys[0].shape[:-1], self.out_features)
            for i, y in enumerate(ys):
                rows = getattr(self, f"r{i}")
                out = out + y if rows is None else out.index_add(-1, rows, y)
        scale: torch.Tensor | None = self.scale  # type: ignore[assignment]
        if scale is not None:
            out = out * scale
        bias = self._bias()
        return out if bias is None else out + bias

    def _bias(self) -> torch.Tensor | None:
        """The bias of the layer's (compact) outputs."""
        bias_index: torch.Tensor | None = self.bias_index  # type: ignore[assignment]
        if self.bias is None or bias_index is None:
            return self.bias
        return self.bias.index_select(0, bias_index)


def take_columns(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``x.index_select(-1, cols)``, selected from ``x`` seen as a matrix (one row per leading index).

    On a CPU, ``index_select`` along the last dimension of a 3-D tensor took three times as long as
    along the columns of the same data as a 2-D matrix (batch 16 x 63 frames x 144 features, half
    the columns: 0.073 against 0.025 ms), and its backward is a 2-D ``index_add`` too.
    """
    return x.reshape(-1, x.shape[-1]).index_select(1, cols).view(*x.shape[:-1], cols.numel())


def dense_linear(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight, bias)`` of a layer that computes ``F.linear(x, weight, bias)``: an ``nn.Linear``, or
    a `SlicedLinear` trained as one whole block; None for anything else."""
    if isinstance(layer, nn.Linear):
        return layer.weight, layer.bias
    if isinstance(layer, SlicedLinear) and layer.num_blocks == 1 and layer.tiled and layer.c0 is None:
        if layer.scale is None and layer.bias_index is None:
            return layer.w0, layer.bias
    return None


def linear_weight(layer: nn.Module, in_features: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, bias)`` with ``layer(x) == F.linear(x, weight, bias)`` for an ``(..., in_features)``
    input: an ``nn.Linear``'s own, or a `SlicedLinear`'s blocks placed in a zero ``(out_features,
    in_features)`` matrix (differentiable in the blocks), each row times its scale.

    For a kernel that takes a layer's whole weight (``torch.lstm``); a `SlicedLinear` with compact
    outputs (``bias_index``) has no such weight.

    Raises:
        ValueError: a layer that is neither, a `SlicedLinear` with compact outputs, or an
            ``in_features`` its blocks do not fit.
    """
    if isinstance(layer, nn.Linear):
        if layer.in_features != in_features:
            raise ValueError(f"{layer} reads {layer.in_features} features, not in_features={in_features}")
        return layer.weight, layer.bias
    if not isinstance(layer, SlicedLinear) or layer.bias_index is not None:
        raise ValueError(
            f"{type(layer).__name__} has no (out_features, in_features) weight: linear_weight takes an nn.Linear "
            "or a SlicedLinear with full outputs"
        )
    first: torch.Tensor = layer.w0  # type: ignore[assignment]
    weight = first.new_zeros(layer.out_features, in_features)
    for i in range(layer.num_blocks):
        rows, cols, w = (getattr(layer, f"{k}{i}") for k in "rcw")
        rows = torch.arange(layer.out_features) if rows is None else rows
        cols = torch.arange(in_features) if cols is None else cols
        if w.shape != (rows.numel(), cols.numel()) or bool((cols >= in_features).any()):
            raise ValueError(f"block {i} of shape {tuple(w.shape)} does not fit a ({layer.out_features}, "
                             f"{in_features}) weight: pass the layer's full input width as in_features")
        weight = weight.index_put((rows[:, None], cols[None, :]), w, accumulate=True)
    scale: torch.Tensor | None = layer.scale  # type: ignore[assignment]
    if scale is not None:
        weight = weight * scale[:, None]
    return weight, layer.bias


def read_columns(layer: nn.Module) -> torch.Tensor | None:
    """The input features a layer reads any of (long, sorted): the union of a `SlicedLinear`'s
    blocks' columns; None when a block reads every column, or for a layer that is not sliced."""
    if not isinstance(layer, SlicedLinear):
        return None
    cols = [getattr(layer, f"c{i}") for i in range(layer.num_blocks)]
    if any(c is None for c in cols):
        return None
    return torch.cat(cols).unique()


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class _GatheredLinear(torch.autograd.Function):
    """``y_i = to_input(source)[..., cols_i] @ W_i^T`` for every block i (``cols_i`` None: every
    column), keeping only ``source`` for backward, where the inputs are taken again.

    Used where ``source`` is kept for backward anyway (attention's output, a ReLU's output) or
    where the blocks' gathered copies together outweigh it (q, k and v each reading their own
    columns of one input): the bytes a client's training holds fall, at the cost of a second
    gather in backward.
    """

    @staticmethod
    def forward(
        ctx: Any, source: torch.Tensor, to_input: Callable[[torch.Tensor], torch.Tensor],
        cols: tuple[torch.Tensor, ...], *weights: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        x = to_input(source)
        ctx.to_input, ctx.cols = to_input, cols
        ctx.save_for_backward(source, *weights)
        return tuple(F.linear(x if c is None else take_columns(x, c), w) for c, w in zip(cols, weights, strict=True))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        source, *weights = ctx.saved_tensors
        with torch.enable_grad():
            src = source.detach().requires_grad_(ctx.needs_input_grad[0])
            x = ctx.to_input(src)
        flat = x.detach().reshape(-1, x.shape[-1])
        grad_x = torch.zeros_like(flat) if ctx.needs_input_grad[0] else None
        grad_w: list[torch.Tensor | None] = []
        for c, w, g, needed in zip(ctx.cols, weights, grads, ctx.needs_input_grad[3:], strict=True):
            g2 = g.reshape(-1, g.shape[-1])
            grad_w.append(g2.t() @ (flat if c is None else flat.index_select(-1, c)) if needed else None)
            if grad_x is not None and c is None:
                grad_x.add_(g2 @ w)
            elif grad_x is not None:
                grad_x.index_add_(-1, c, g2 @ w)
        grad_source = None
        if grad_x is not None:
            grad_source = grad_x.view(x.shape)
            if x is not src:  # back through the reshaping
                grad_source = torch.autograd.grad(x, src, grad_source)[0]
        return (grad_source, None, None, *grad_w)


class SlicedMultiheadAttention(nn.Module):
    """`nn.MultiheadAttention` (sequence-first, fused q/k/v) with projections a client can slice.

    `in_proj` is a `SlicedLinear` emitting the stacked (q, k, v), or None with the dense
    `in_proj_weight`; `out_proj` a `SlicedLinear` or the original layer. The attention itself is
    `F.scaled_dot_product_attention`, as `nn.MultiheadAttention` computes it when no weights are
    asked for.
    """

    def __init__(self, attention: nn.MultiheadAttention, in_proj: SlicedLinear | None, out_proj: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.dropout, self.embed_dim = attention.num_heads, attention.dropout, attention.embed_dim
        self.in_proj = in_proj
        self.in_proj_weight = None if in_proj is not None else attention.in_proj_weight
        self.in_proj_bias = attention.in_proj_bias
        self.out_proj = out_proj

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
        attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """Self-attention over (L, N, E) inputs; returns (output, None)."""
        if need_weights or not (query is key is value):
            raise ValueError(
                "a sliced attention computes self-attention without weights: call it with query is key is value "
                "and need_weights=False, as torchaudio's Conformer does"
            )
        length, batch, _ = query.shape
        q, k, v = (y.view(length, batch, self.num_heads, -1).permute(1, 2, 0, 3) for y in self._qkv(query))
        mask = _attention_mask(key_padding_mask, attn_mask, query.dtype)
        out = F.scaled_dot_product_attention(  # (N, H, L, E/H)
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None,
        )
        def merge_heads(heads_out: torch.Tensor) -> torch.Tensor:  # (N, H, L, E/H) -> (L, N, E)
            return heads_out.permute(2, 0, 1, 3).reshape(length, batch, self.embed_dim)

        if isinstance(self.out_proj, SlicedLinear):  # scaled dot-product attention keeps `out` for backward
            return self.out_proj.forward_from(out, merge_heads), None
        return self.out_proj(merge_heads(out)), None

    def _qkv(self, query: torch.Tensor) -> Sequence[torch.Tensor]:
        """q, k and v, each ``(L, N, E)``.

        A column-pruned ``in_proj`` is three blocks of whole rows, one per projection: each comes
        straight from its own product, so that backward hands each block its own gradient instead
        of cutting one assembled from q, k and v (three zero-filled ``(3, N, H, L, E/H)`` tensors,
        one per projection, summed, then split again).
        """
        bias = self.in_proj_bias
        in_proj = self.in_proj
        if in_proj is None:
            assert self.in_proj_weight is not None
            return F.linear(query, self.in_proj_weight, bias).chunk(3, -1)
        blocks = [getattr(in_proj, f"w{i}") for i in range(in_proj.num_blocks)]
        if (in_proj.tiled and len(blocks) == 3 and all(w.shape[0] == self.embed_dim for w in blocks)
                and in_proj.scale is None and in_proj.bias_index is None):
            products = in_proj(query, combine=False)
            return list(products) if bias is None else [y + b for y, b in zip(products, bias.chunk(3), strict=True)]
        qkv = in_proj(query)
        return (qkv if bias is None else qkv + bias).chunk(3, -1)


def _attention_mask(
    key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """One additive mask (N or 1, 1 or H, L, S) from a key padding mask (True: ignore) and an attention mask."""
    mask: torch.Tensor | None = None
    if key_padding_mask is not None:
        kpm = key_padding_mask
        if kpm.dtype == torch.bool:
            kpm = torch.zeros(kpm.shape, dtype=dtype, device=kpm.device).masked_fill(kpm, float("-inf"))
        mask = kpm[:, None, None, :]
    if attn_mask is not None:
        am = attn_mask
        if am.dtype == torch.bool:
            am = torch.zeros(am.shape, dtype=dtype, device=am.device).masked_fill(am, float("-inf"))
        if am.dim() != 2:
            raise ValueError(f"attn_mask of shape {tuple(am.shape)}: a sliced attention takes a 2-D (L, S) mask")
        am = am[None, None]
        mask = am if mask is None else mask + am
    return mask


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
    over the channel dimension of (N, C, L) inputs.

    Its tensors are laid out as ``nn.Conv1d``'s are: the output is contiguous (N, C, L), not the
    (N, L, C) product seen through a transpose, and a contiguous input gets a contiguous gradient.
    Elementwise operations on two tensors of different layouts (an activation's backward taking
    its input in one and its gradient in the other) run several times slower on a CPU: SiLU's
    backward at `small`'s size (16 x 72 x 63) took 0.35 ms against 0.03 ms.
    """

    def forward(
        self, x: torch.Tensor, combine: bool = True, to_input: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> Any:
        """x: (N, in_channels, L) -> (N, out_channels, L), contiguous; with ``combine=False``, each
        block's product over the channels, (N, L, rows of the block).

        Raises:
            ValueError: a ``to_input``: a pointwise convolution takes its (N, C, L) input itself.
        """
        if to_input is not None:
            raise ValueError("a sliced pointwise convolution takes its (N, C, L) input, not a source and to_input")
        if not combine:
            return super().forward(x.transpose(1, 2), combine=False)
        if x.requires_grad and x.is_contiguous():
            x = _ContiguousGrad.apply(x)
        return super().forward(x.transpose(1, 2)).transpose(1, 2).contiguous()


class _ContiguousGrad(torch.autograd.Function):
    """The identity, with its gradient made contiguous."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class ChannelSlicedConv2d(nn.Conv2d):
    """A masked `nn.Conv2d` trained over the input channels its mask keeps any weight of (a column
    pattern prunes whole input channels, see `PrunableSpec.taps`) and the output channels a later
    layer reads (a channel group's live channels, see `fedprune_core.units`): its weight is the
    (live outputs, kept channels, kh, kw) slice, its mask the same slice of the full mask, and it
    reads only those channels of its input and computes only those of its output, so parameters,
    gradients and work shrink with the pruned channels. The bias stays whole: a dead channel's entry
    gets no gradient, as in the masked full model.

    `channels` are the kept input channels (ascending); a layer before it that only feeds it may
    compute just those (`fedprune_core.speech.model.SubsamplingConvs`). `outputs` are the live
    output channels (ascending), or None for all.
    """

    channels: torch.Tensor
    outputs: torch.Tensor | None

    def __init__(self, conv: nn.Conv2d, channels: torch.Tensor, outputs: torch.Tensor | None = None) -> None:
        geometry: dict[str, Any] = {"kernel_size": conv.kernel_size, "stride": conv.stride, "padding": conv.padding,
                                    "dilation": conv.dilation}
        width = conv.out_channels if outputs is None else outputs.numel()
        super().__init__(channels.numel(), width, **geometry, bias=conv.bias is not None,
                         padding_mode=conv.padding_mode, device="meta")
        weight = conv.weight.detach() if outputs is None else conv.weight.detach()[outputs]
        self.weight = nn.Parameter(weight[:, channels].clone())
        self.bias = conv.bias
        self.register_buffer("channels", channels)
        self.register_buffer("outputs", outputs)

    def live_bias(self) -> torch.Tensor | None:
        """The bias of the computed output channels."""
        if self.bias is None or self.outputs is None:
            return self.bias
        return self.bias.index_select(0, self.outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, full input channels, H, W) -> (N, live output channels, H', W')."""
        return self._conv_forward(x.index_select(1, self.channels), self.weight, self.live_bias())


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


def _decode_mask(payload: Payload, name: str, spec: PrunableSpec) -> torch.Tensor:
    if f"{name}{SEP}b" in payload:
        return unpack_bits(payload[f"{name}{SEP}b"], spec.shape)
    return groups_to_mask(payload[f"{name}{SEP}g"], spec)


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


Block = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]
"""(rows, columns, weight) of one dense block of a sliced layer; None rows / columns: all of them."""


def _blocks(payload: Payload, name: str, spec: PrunableSpec) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
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
    for g in find_unit_groups(model, specs) + find_channel_groups(model, specs):
        cols = [c for _, c, _ in _blocks(payload, g.reader, specs[g.reader])]
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
            masks[name] = _decode_mask(payload, name, specs[name])
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
    full = _blocks(payload, name, spec)
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
