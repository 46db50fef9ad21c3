"""Depthwise 1-D convolution as a sum over kernel taps, skipping the taps a mask prunes.

The Conformer's convolution module (Gulati et al., Interspeech 2020) runs a depthwise
``Conv1d`` with a long kernel (31 taps) over few frames. On a CPU, oneDNN's kernel for it is slow:
at `small`'s batch 16 (144 channels, 63 frames) a forward and backward took 6.0 ms, where the
same sums written as one multiply-add per tap over the whole ``(B, C, T)`` tensor take 2.8 ms.

Written per tap, a pruned kernel also costs less. Viewed as a 2-D ``(C, K)`` matrix (higher ranks
are reshaped to 2-D, Lin et al. 2022), a column of a depthwise weight is a tap; a tap pruned for
every channel contributes nothing, and a client leaves it out (`DepthwiseConv1d.taps`). Its
weight gradient is then zero instead of a value the mask discards.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def depthwise_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, taps: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.conv1d(x, weight, bias, padding=padding, groups=C)`` (stride 1, no dilation), summed
    over the kernel positions ``taps`` only (None: all of them).

    Args:
        x: ``(B, C, T)`` input.
        weight: ``(C, 1, K)`` one filter per channel.
        bias: ``(C,)`` or None.
        padding: zeros added at both ends of the time axis.
        taps: ``(n,)`` long kernel positions to sum over, the others treated as zero weights.

    Returns:
        ``(B, C, T + 2 * padding - K + 1)``.

    Raises:
        ValueError: shapes that do not fit, or an output with no frames.
    """
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"input {tuple(x.shape)} and weight {tuple(weight.shape)}: need (B, C, T) and (C, 1, K), "
            "one filter per input channel"
        )
    if x.shape[-1] + 2 * padding - weight.shape[-1] + 1 <= 0:
        raise ValueError(
            f"{x.shape[-1]} frames with padding {padding} are fewer than the kernel's {weight.shape[-1]} taps: "
            "pad more or pass a longer input"
        )
    kept = tuple(range(weight.shape[-1])) if taps is None else tuple(taps.tolist())
    out: torch.Tensor = _DepthwiseTaps.apply(x, weight, bias, padding, kept)
    return out


class _DepthwiseTaps(torch.autograd.Function):
    """y[b, c, t] = bias[c] + sum over kept k of w[c, k] * x_padded[b, c, t + k]; keeps x, as a
    convolution does, and pads it again in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int,
        taps: tuple[int, ...],
    ) -> torch.Tensor:
        frames = x.shape[-1] + 2 * padding - weight.shape[-1] + 1
        padded = F.pad(x, (padding, padding))
        columns = weight[:, 0].t().contiguous()  # (K, C): tap k's weights, one per channel
        if bias is None:
            out = x.new_zeros(x.shape[0], x.shape[1], frames)
        else:
            out = bias[:, None].expand(x.shape[0], -1, frames).clone()
        for k in taps:
            out.addcmul_(padded[..., k : k + frames], columns[k][:, None])
        ctx.padding, ctx.taps, ctx.has_bias = padding, taps, bias is not None
        ctx.save_for_backward(x, columns)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, columns = ctx.saved_tensors
        padding, frames, width = ctx.padding, grad.shape[-1], columns.shape[0]
        grad_x = grad_columns = grad_bias = None
        if ctx.needs_input_grad[0]:
            # x[j] met tap k at output frame j + padding - k: a correlation of the padded gradient
            # with the flipped kernel, accumulated into a contiguous tensor
            shift = width - 1 - padding
            grad_padded = F.pad(grad, (shift, shift))
            grad_x = torch.zeros_like(x)
            for k in ctx.taps:
                start = width - 1 - k
                grad_x.addcmul_(grad_padded[..., start : start + x.shape[-1]], columns[k][:, None])
        if ctx.needs_input_grad[1]:
            padded = F.pad(x, (padding, padding))
            grad_columns = torch.zeros_like(columns)
            for k in ctx.taps:
                grad_columns[k] = (grad * padded[..., k : k + frames]).sum((0, 2))
            grad_columns = grad_columns.t().unsqueeze(1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2))
        return grad_x, grad_columns, grad_bias, None, None


class DepthwiseConv1d(nn.Conv1d):
    """A depthwise ``nn.Conv1d`` (stride 1, no dilation, zero padding) computed by
    :func:`depthwise_conv1d`; parameters as ``nn.Conv1d``'s.

    Attributes:
        taps: kernel positions summed over, or None for all (a client sets it from its mask).
    """

    taps: torch.Tensor | None

    @classmethod
    def from_conv(cls, conv: nn.Conv1d) -> DepthwiseConv1d:
        """The same layer, sharing ``conv``'s parameters.

        Raises:
            ValueError: ``conv`` is not a depthwise convolution this class computes.
        """
        c = conv.in_channels
        if not (conv.groups == c == conv.out_channels and conv.stride == (1,) and conv.dilation == (1,)
                and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)):
            raise ValueError(
                f"{conv} is not a depthwise Conv1d with stride 1, no dilation and zero padding of a fixed "
                "size: keep it as an nn.Conv1d"
            )
        # built on the meta device: no initialisation drawn from the global RNG, no memory
        layer = cls(c, c, conv.kernel_size, padding=conv.padding, groups=c, bias=conv.bias is not None, device="meta")
        layer.weight, layer.bias = conv.weight, conv.bias
        return layer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("taps", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T)`` -> ``(B, C, T + 2 * padding - K + 1)``."""
        return depthwise_conv1d(x, self.weight, self.bias, int(self.padding[0]), self.taps)


def kept_taps(mask: torch.Tensor, channels: torch.Tensor | None = None) -> torch.Tensor:
    """Kernel positions of a ``(C, 1, K)`` depthwise weight mask that any of ``channels`` (all: None)
    keeps, as long indices."""
    rows = mask.reshape(mask.shape[0], -1)
    if channels is not None:
        rows = rows.index_select(0, channels)
    return rows.any(0).nonzero().flatten()
