"""The layers a client trains in place of pruned ones, as physically smaller dense blocks.

A sliced Linear is trained by `SlicedLinear` (a pointwise conv by `SlicedPointwiseConv1d`,
attention by `SlicedMultiheadAttention`) as the dense blocks its mask keeps, so the client's
parameters, gradients, optimizer state and matmul work shrink with sparsity; a layer whose inputs
or outputs are live units only (see `fedprune_core.units`) reads or emits them compact. A masked
`nn.Conv2d` whose mask prunes whole input channels is trained by `ChannelSlicedConv2d` over the
kept channels only. Two autograd functions keep their backward small: `_GatheredLinear` keeps one
source instead of each block's gathered input, and `_ContiguousGrad` gives a pointwise
convolution's input the gradient layout `nn.Conv1d` gives it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Block = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]
"""(rows, columns, weight) of one dense block of a sliced layer; None rows / columns: all of them."""


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
        blocks: list[Block],
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

    An `in_proj` with compact outputs (``bias_index``: the kept heads of Federated Dropout, see
    `fedprune_core.units.find_head_groups`) emits the kept heads' q, k and v only; the attention
    then runs those heads (same head_dim, ``num_heads`` the kept ones), adds their entries of the
    in-projection bias, and hands their outputs to an `out_proj` that reads them compact.
    """

    def __init__(self, attention: nn.MultiheadAttention, in_proj: SlicedLinear | None, out_proj: nn.Module) -> None:
        super().__init__()
        self.dropout, self.head_dim = attention.dropout, attention.head_dim
        self.embed_dim = attention.embed_dim if in_proj is None else in_proj.out_features // 3  # of the kept heads
        self.num_heads = self.embed_dim // self.head_dim
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
        """q, k and v, each ``(L, N, E)`` (E: the kept heads' dimensions, `embed_dim`).

        A column-pruned ``in_proj`` is three blocks of whole rows, one per projection: each comes
        straight from its own product, so that backward hands each block its own gradient instead
        of cutting one assembled from q, k and v (three zero-filled ``(3, N, H, L, E/H)`` tensors,
        one per projection, summed, then split again).
        """
        in_proj = self.in_proj
        if in_proj is None:
            assert self.in_proj_weight is not None
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, -1)
        bias_index: torch.Tensor | None = in_proj.bias_index  # type: ignore[assignment]
        bias: torch.Tensor | None = self.in_proj_bias
        if bias is not None and bias_index is not None:  # the kept heads' entries
            bias = bias.index_select(0, bias_index)
        blocks = [getattr(in_proj, f"w{i}") for i in range(in_proj.num_blocks)]
        if (in_proj.tiled and len(blocks) == 3 and all(w.shape[0] == self.embed_dim for w in blocks)
                and in_proj.scale is None):
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
