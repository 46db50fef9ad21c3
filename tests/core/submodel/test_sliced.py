"""Sliced layers: equal to the masked dense layers, in outputs, gradients, layouts and the bytes kept for backward."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from fedprune_core.masks import make_mask
from fedprune_core.prunable import find_prunable
from fedprune_core.submodel import (
    SlicedLinear,
    SlicedPointwiseConv1d,
    build_client_model,
    client_update,
    expand,
    extract,
    linear_weight,
    read_columns,
)
from tests.core.submodel.common import STRUCTURED, random_masks, seeded


@pytest.mark.parametrize("pattern", STRUCTURED)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layer", ["linear", "pointwise_conv1d"])
def test_sliced_linear_equals_the_masked_dense_linear(pattern: str, bias: bool, layer: str) -> None:
    conv = layer == "pointwise_conv1d"

    def make() -> nn.Module:
        return nn.Sequential(nn.Conv1d(6, 8, 1, bias=bias) if conv else nn.Linear(6, 8, bias=bias))

    dense = seeded(make(), 3)
    specs = find_prunable(dense, ("0.weight",), pattern)
    mask = make_mask(torch.rand(8, 6, generator=torch.Generator().manual_seed(7)), 0.5, pattern)
    mask = mask.unsqueeze(-1) if conv else mask  # a pointwise conv's weight is (out, in, 1)
    weights = {n: p.detach().clone() for n, p in dense.named_parameters()}
    payload = extract(weights, {"0.weight": mask}, specs)
    client = build_client_model(seeded(make(), 4), payload, specs)
    sliced = client.module.get_submodule("0")
    assert isinstance(sliced, SlicedPointwiseConv1d if conv else SlicedLinear)
    weight_params = [p for n, p in sliced.named_parameters() if n != "bias"]
    assert sum(p.numel() for p in weight_params) == int(mask.sum())  # physically smaller

    x = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(8))  # (N, C, L) for the conv
    x = x if conv else x.transpose(1, 2)
    masked_weight = (weights["0.weight"] * mask).requires_grad_()
    op = nn.functional.conv1d if conv else nn.functional.linear
    expected = op(x, masked_weight, weights.get("0.bias"))
    y = sliced(x)
    assert torch.allclose(y, expected, atol=1e-6)

    # gradients flow into the kept blocks and equal the dense gradient at the kept entries
    target = torch.randn(*expected.shape, generator=torch.Generator().manual_seed(9))
    ((y - target) ** 2).sum().backward()
    ((expected - target) ** 2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weight_params)
    grads = {n: p.grad for n, p in client.module.named_parameters() if p.grad is not None}
    shapes = {n: w.shape for n, w in weights.items()}
    values, _ = expand(client_update(client, specs, grads), {"0.weight": mask}, specs, shapes)
    assert masked_weight.grad is not None
    assert torch.allclose(values["0.weight"], masked_weight.grad * mask, atol=1e-5)


@pytest.mark.parametrize("pattern", STRUCTURED)
def test_sliced_attention_equals_the_masked_dense_attention(pattern: str) -> None:
    # column: q, k and v straight from in_proj's three blocks; the other patterns: from its whole output
    def make() -> nn.Module:
        return nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2)})

    dense = seeded(make(), 3)
    specs = find_prunable(dense, ("attn.in_proj_weight", "attn.out_proj.weight"), pattern)
    weights = {n: p.detach().clone() for n, p in dense.named_parameters()}
    masks = random_masks(weights, specs, 0.5, seed=7)
    client = build_client_model(seeded(make(), 4), extract(weights, masks, specs), specs)
    sliced = client.module.get_submodule("attn")
    reference = make()
    reference.load_state_dict({n: w * masks[n] if n in masks else w for n, w in weights.items()})

    x = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(8))  # (L, N, E)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, 3:] = True
    calls: list[str] = []  # in_proj runs through its module call on every path, so its hooks see it
    for name in ("in_proj", "out_proj"):
        sliced.get_submodule(name).register_forward_hook(lambda *_, name=name: calls.append(name))
    outputs = [m.get_submodule("attn")(x, x, x, key_padding_mask=padding, need_weights=False)[0]
               for m in (client.module, reference)]
    assert calls == ["in_proj", "out_proj"]
    torch.testing.assert_close(outputs[0], outputs[1])
    target = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(9))
    for y in outputs:
        ((y - target) ** 2).sum().backward()
    grads = {n: p.grad for n, p in client.module.named_parameters() if p.grad is not None}
    values, held = expand(client_update(client, specs, grads), masks, specs, {n: w.shape for n, w in weights.items()})
    for n, p in reference.named_parameters():
        assert p.grad is not None
        h = held.get(n, torch.ones_like(p, dtype=torch.bool))
        scale = float(p.grad.abs().max())  # float rounding of sums in another order
        torch.testing.assert_close(values[n][h], p.grad[h], rtol=1e-5, atol=1e-6 * scale)
    in_proj = sliced.in_proj
    assert isinstance(in_proj, SlicedLinear) and (in_proj.tiled and in_proj.num_blocks == 3) == (pattern == "column")


@pytest.mark.parametrize("channels_last", [False, True])
def test_sliced_pointwise_conv1d_lays_out_tensors_as_conv1d(channels_last: bool) -> None:
    # contiguous (N, C, L) output, and a contiguous input gets a contiguous gradient, as nn.Conv1d's
    dense = seeded(nn.Sequential(nn.Conv1d(6, 8, 1)), 3)
    specs = find_prunable(dense, ("0.weight",), "column")
    mask = make_mask(torch.rand(8, 6, generator=torch.Generator().manual_seed(7)), 0.5, "column").unsqueeze(-1)
    weights = {n: p.detach().clone() for n, p in dense.named_parameters()}
    sliced = build_client_model(seeded(nn.Sequential(nn.Conv1d(6, 8, 1)), 4),
                                extract(weights, {"0.weight": mask}, specs), specs).module.get_submodule("0")
    source = torch.randn(3, 5, 6) if channels_last else torch.randn(3, 6, 5)
    source.requires_grad_()
    x = source.transpose(1, 2) if channels_last else source * 1  # (N, C, L), seen through a transpose or not
    seen: list[torch.Tensor] = []
    x.register_hook(seen.append)
    y = sliced(x)
    expected = nn.functional.conv1d(x, weights["0.weight"] * mask, weights["0.bias"])
    assert torch.allclose(y, expected, atol=1e-6)
    assert y.is_contiguous() and nn.functional.conv1d(x, weights["0.weight"]).is_contiguous()
    y.backward(torch.randn(y.shape))
    assert seen[0].is_contiguous() == (not channels_last)  # a gradient in the input's own layout
    assert seen[0].transpose(1, 2).is_contiguous() == channels_last


def test_sliced_linear_keeps_working_with_everything_or_nothing_kept() -> None:
    dense = seeded(nn.Sequential(nn.Linear(4, 2)), 1)
    specs = find_prunable(dense, ("0.weight",), "column")
    weights = {n: p.detach().clone() for n, p in dense.named_parameters()}
    x = torch.randn(3, 4)
    for kept in (torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool)):
        payload = extract(weights, {"0.weight": kept}, specs)
        assert ("0.weight|c0" in payload) == (not kept.all())  # indices omitted when all columns are kept
        client = build_client_model(nn.Sequential(nn.Linear(4, 2)), payload, specs)
        expected = nn.functional.linear(x, weights["0.weight"] * kept, weights["0.bias"])
        assert torch.allclose(client.module(x), expected, atol=1e-6)


@pytest.mark.parametrize(("pattern", "rescale"), [(p, False) for p in STRUCTURED] + [("row", True)])  # FD: rescaled
def test_linear_weight_is_the_weight_a_sliced_linear_computes_with(pattern: str, rescale: bool) -> None:
    dense = seeded(nn.Sequential(nn.Linear(6, 8)), 1)
    specs = find_prunable(dense, ("0.weight",), pattern)
    mask = make_mask(torch.rand(8, 6, generator=torch.Generator().manual_seed(2)), 0.5, pattern)
    weights = {n: p.detach().clone() for n, p in dense.named_parameters()}
    client = build_client_model(seeded(nn.Sequential(nn.Linear(6, 8)), 3), extract(weights, {"0.weight": mask}, specs),
                                specs, rescale_kept=rescale)
    sliced = client.module.get_submodule("0")
    assert isinstance(sliced, SlicedLinear)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    weight, bias = linear_weight(sliced, 6)
    assert weight.shape == (8, 6) and torch.equal(weight != 0, mask)  # the blocks where the mask keeps weights
    y = nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(y, sliced(x))
    y.square().sum().backward()  # differentiable in the blocks
    grads = [p.grad for n, p in sliced.named_parameters() if n != "bias"]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    kept = read_columns(sliced)
    if pattern in ("column", "half_column"):
        assert kept is not None and kept.tolist() == mask.any(0).nonzero().flatten().tolist()
    else:
        assert kept is None or kept.tolist() == list(range(6))  # row patterns read every input feature


def test_linear_weight_refuses_layers_without_a_whole_weight() -> None:
    with pytest.raises(ValueError, match="in_features=5"):
        linear_weight(nn.Linear(4, 2), 5)
    bias = nn.Parameter(torch.zeros(3))
    compact = SlicedLinear(2, [(None, None, torch.randn(2, 4))], bias, bias_index=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="full outputs"):
        linear_weight(compact, 4)
    with pytest.raises(ValueError, match="full input width"):
        linear_weight(SlicedLinear(2, [(None, torch.tensor([0, 6]), torch.randn(2, 2))], None), 4)
    assert read_columns(nn.Linear(4, 2)) is None
    nothing = SlicedLinear(3, [(None, torch.zeros(0, dtype=torch.long), torch.zeros(3, 0))], None)  # no column kept
    assert torch.equal(linear_weight(nothing, 4)[0], torch.zeros(3, 4))


def _saved_bytes(fn: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> tuple[torch.Tensor, set[int], int]:
    """Run `fn` recording the distinct float storages saved for backward (minus `exclude`'s; not indices)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip and t.is_floating_point():
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    return y, set(storages), sum(storages.values())


def _three_blocks(in_features: int, kept: int) -> SlicedLinear:
    """q/k/v-like: three blocks of 4 rows, each reading its own `kept` columns."""
    g = torch.Generator().manual_seed(11)
    blocks = [
        (torch.arange(4 * i, 4 * i + 4), torch.randperm(in_features, generator=g)[:kept].sort().values,
         torch.randn(4, kept, generator=g))
        for i in range(3)
    ]
    return SlicedLinear(12, blocks, nn.Parameter(torch.randn(12, generator=g)))  # type: ignore[arg-type]


def _by_gathering(layer: SlicedLinear, x: torch.Tensor) -> torch.Tensor:
    """The reference: each block's product on its own gathered copy of x."""
    cols = [getattr(layer, f"c{i}") for i in range(3)]
    ys = [nn.functional.linear(x if c is None else x.index_select(-1, c), getattr(layer, f"w{i}"))
          for i, c in enumerate(cols)]
    return torch.cat(ys, -1) + layer.bias


def test_blocks_reading_more_columns_than_the_input_has_keep_the_input_once() -> None:
    layer = _three_blocks(in_features=8, kept=5)  # 15 gathered columns > 8
    x = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(12), requires_grad=True)
    params = list(layer.parameters())
    y, storages, nbytes = _saved_bytes(lambda: layer(x), params)
    assert storages == {x.untyped_storage().data_ptr()} and nbytes == x.numel() * 4  # x alone, not 3 copies
    expected = _by_gathering(layer, x)
    torch.testing.assert_close(y, expected)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(13))
    ours = torch.autograd.grad(y, [x, *params], g)
    reference = torch.autograd.grad(expected, [x, *params], g)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b)


def test_blocks_reading_fewer_columns_keep_their_gathered_copies() -> None:
    layer = _three_blocks(in_features=16, kept=5)  # 15 gathered columns < 16: copies are smaller
    x = torch.randn(2, 7, 16, requires_grad=True)
    _, storages, nbytes = _saved_bytes(lambda: layer(x), list(layer.parameters()))
    assert x.untyped_storage().data_ptr() not in storages and len(storages) == 3 and nbytes == 3 * 2 * 7 * 5 * 4


@pytest.mark.parametrize("every_column", [False, True])
def test_forward_from_keeps_the_source_and_equals_forward_of_its_reshaping(every_column: bool) -> None:
    layer = _three_blocks(in_features=12, kept=12 if every_column else 3)
    if every_column:  # blocks that read every column carry no column index (a compact input)
        for i in range(3):
            setattr(layer, f"c{i}", None)
    source = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(14), requires_grad=True)

    def reshape(s: torch.Tensor) -> torch.Tensor:  # (B, C, T, F) -> (B, T, C * F): a copy
        return s.permute(0, 2, 1, 3).flatten(2)

    params = list(layer.parameters())
    y, storages, _ = _saved_bytes(lambda: layer.forward_from(source, reshape), params)
    assert storages == {source.untyped_storage().data_ptr()}
    expected = _by_gathering(layer, reshape(source))
    torch.testing.assert_close(y, expected)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(15))
    for a, b in zip(torch.autograd.grad(y, [source, *params], g), torch.autograd.grad(expected, [source, *params], g),
                    strict=True):
        torch.testing.assert_close(a, b)
