"""Which parameters are pruned, and how each is viewed as 2-D matrices.

Prunable parameters are chosen by glob patterns over parameter names (`fnmatch`). Tensors of
rank > 2 are reshaped to (dim 0, rest); the weight of a convolution with several input channels
per group, (out, in, *kernel), is pruned by whole input channels under the column patterns
(`PrunableSpec.taps`: its kernel's taps travel together, as channel pruning does; a depthwise or
one-input convolution keeps a column per tap), and so is a Linear that reads a convolution's
output flattened channel by channel (`ChannelReader`: a column is one channel's features); a fused
attention input projection (`nn.MultiheadAttention.in_proj_weight`, q, k and v stacked on dim 0) is
three matrices; 1-D tensors (biases, norms) are pruned only when `include_1d` is set, and then
entry by entry.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from fedprune_core.masks import PATTERNS, check_shape
from fedprune_core.spec import ChannelReader as ChannelReader
from fedprune_core.spec import PrunableSpec, channel_readers
from fedprune_core.spec import is_sliced as is_sliced
from fedprune_core.units import link_units


def is_pointwise_conv(m: nn.Module) -> bool:
    """A Conv1d that is a Linear over channels: kernel 1, one group, stride 1, no padding or dilation."""
    return (
        type(m) is nn.Conv1d and m.kernel_size == (1,) and m.groups == 1 and m.stride == (1,)
        and m.padding in ((0,), "valid") and m.dilation == (1,) and m.padding_mode == "zeros"
    )


def is_plain_attention(m: nn.Module) -> bool:
    """An `nn.MultiheadAttention` a client can run from sliced projections: fused q/k/v of one width,
    no extra key/value biases or zero attention, sequence-first."""
    return (
        type(m) is nn.MultiheadAttention and m._qkv_same_embed_dim and m.bias_k is None
        and not m.add_zero_attn and not m.batch_first
    )


def channel_taps(model: nn.Module) -> dict[str, int]:
    """Columns per group under the column patterns (see `PrunableSpec.taps`), by weight name: the
    kernel taps per input channel of each convolution with several input channels per group and a
    kernel of several taps, and the features per channel of each `ChannelReader`'s Linear."""
    taps: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and m.in_channels // m.groups > 1:
            k = math.prod(m.kernel_size)
            if k > 1:
                taps[f"{name}.weight" if name else "weight"] = k
    taps.update({r.linear: r.taps for r in channel_readers(model) if r.taps > 1})
    return taps


def _sliceable_linears(model: nn.Module) -> set[str]:
    """Names of the weights a client can slice: Linear layers run through `Linear.forward`, pointwise
    Conv1d layers, and the projections of plain attention (other attention reads them raw)."""
    names: set[str] = set()
    raw_users: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            prefix = f"{name}." if name else ""
            if is_plain_attention(m):
                names |= {f"{prefix}in_proj_weight", f"{prefix}out_proj.weight"}
            else:
                raw_users.add(f"{prefix}out_proj")
    return names | {
        f"{name}.weight"
        for name, m in model.named_modules()
        if (type(m) is nn.Linear and name not in raw_users) or is_pointwise_conv(m)
    }


def find_prunable(
    model: nn.Module, patterns: tuple[str, ...], pattern: str, include_1d: bool = False
) -> dict[str, PrunableSpec]:
    """Specs of the parameters whose names match any glob in `patterns`.

    Raises:
        ValueError: a glob matches no parameter, or a matched shape does not fit `pattern`.
    """
    params = dict(model.named_parameters())
    for glob in patterns:
        if not any(fnmatch.fnmatchcase(n, glob) for n in params):
            sample = ", ".join(list(params)[:5])
            raise ValueError(
                f"prunable pattern {glob!r} matches no parameter of the model: use globs over parameter "
                f"names such as {sample}"
            )
    linears, taps = _sliceable_linears(model), channel_taps(model)
    specs: dict[str, PrunableSpec] = {}
    for name, p in params.items():
        if not any(fnmatch.fnmatchcase(name, g) for g in patterns) or (p.dim() < 2 and not include_1d):
            continue
        splits = 3 if name.endswith("in_proj_weight") else 1
        spec = PrunableSpec(name, tuple(p.shape), splits, name in linears, pattern if p.dim() >= 2 else "unstructured",
                            taps=taps.get(name, 1))
        check_shape(spec.matrix_shape, spec.pattern, name)
        specs[name] = spec
    return link_units(model, specs)


def matrices(t: torch.Tensor, spec: PrunableSpec) -> list[torch.Tensor]:
    """The `spec.splits` 2-D views of a full-shape tensor (views, no copy)."""
    return list(t.reshape(t.shape[0], -1).chunk(spec.splits, dim=0))


def from_matrices(parts: list[torch.Tensor], spec: PrunableSpec) -> torch.Tensor:
    """Inverse of `matrices`: stack the 2-D parts and restore the full shape."""
    return torch.cat(parts, dim=0).reshape(spec.shape)


def every_pattern_weights(model: nn.Module) -> tuple[str, ...]:
    """Names of the weights of rank >= 2 whose 2-D views fit all patterns."""
    specs = find_prunable(model, ("*weight",), "unstructured")
    names = []
    for name, spec in specs.items():
        try:
            for pattern in PATTERNS:
                check_shape(spec.matrix_shape, pattern, name)
        except ValueError:
            continue
        names.append(name)
    return tuple(names)
