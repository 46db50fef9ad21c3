"""Submodels: what a client downloads, trains and uploads, and how it is scattered back."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedprune_core.masks import PATTERNS, make_mask
from fedprune_core.prunable import ChannelReader, PrunableSpec, find_prunable, from_matrices, matrices
from fedprune_core.submodel import (
    ChannelSlicedConv2d,
    SlicedLinear,
    SlicedPointwiseConv1d,
    build_client_model,
    client_update,
    expand,
    extract,
    groups_to_mask,
    linear_weight,
    mask_to_groups,
    pack_bits,
    payload_nbytes,
    read_columns,
    unpack_bits,
)
from fedprune_core.types import MaskDict
from fedprune_core.units import find_channel_groups, live_masks

STRUCTURED = [p for p in PATTERNS if p != "unstructured"]


def _seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in module.parameters():
            nn.init.normal_(p)
    return module


class Net(nn.Module):
    """Linear layers (sliced), a conv (masked) and attention (fused in_proj and out_proj: sliced)."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.conv = nn.Conv1d(1, 2, kernel_size=2)
        self.attn = nn.MultiheadAttention(2 * width, 2)
        self.fc2 = nn.Linear(2 * width, 2)


def _masks(
    weights: dict[str, torch.Tensor], specs: dict[str, PrunableSpec], sparsity: float, seed: int
) -> MaskDict:
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, spec in specs.items():
        parts = [
            make_mask(torch.rand(m.shape, generator=g), sparsity, spec.pattern, taps=spec.taps)
            for m in matrices(weights[name], spec)
        ]
        masks[name] = from_matrices(parts, spec)
    return masks


# --- exact payload bytes -----------------------------------------------------------------------


def test_payload_bytes_of_a_sliced_linear_by_hand() -> None:
    fc = nn.Sequential(nn.Linear(4, 6))
    specs = find_prunable(fc, ("0.weight",), "column")
    weights = {n: p.detach() for n, p in fc.named_parameters()}
    mask = torch.tensor([True, False, True, False])[None, :].expand(6, 4)
    payload = extract(weights, {"0.weight": mask}, specs)
    shapes = {k: tuple(v.shape) for k, v in payload.items()}
    assert shapes == {"0.weight|w0": (6, 2), "0.weight|c0": (2,), "0.bias": (6,)}
    assert payload["0.weight|c0"].dtype == torch.int32 and payload["0.weight|c0"].tolist() == [0, 2]
    # down: kept block 6 x 2 float32 (48) + 2 int32 column ids (8) + dense bias 6 float32 (24)
    assert payload_nbytes(payload) == 48 + 8 + 24
    client = build_client_model(nn.Sequential(nn.Linear(4, 6)), payload, specs)
    assert payload_nbytes(client_update(client, specs)) == 48 + 24  # up: values only
    assert payload_nbytes(weights) == 96 + 24  # dense


def test_payload_bytes_of_half_row_and_of_row_by_hand() -> None:
    fc = nn.Sequential(nn.Linear(4, 6))
    specs = find_prunable(fc, ("0.weight",), "half_row")
    weights = {n: p.detach() for n, p in fc.named_parameters()}
    keep = torch.tensor(
        [[True, False], [True, True], [False, False], [False, True], [True, False], [False, False]]
    )
    mask = keep[:, :, None].expand(6, 2, 2).reshape(6, 4)
    payload = extract(weights, {"0.weight": mask}, specs)
    # left half: rows 0, 1, 4 x columns 0-1; right half: rows 1, 3 x columns 2-3 (each block spans
    # its half's columns, so no column indices travel)
    assert payload["0.weight|w0"].shape == (3, 2) and payload["0.weight|r0"].tolist() == [0, 1, 4]
    assert payload["0.weight|w1"].shape == (2, 2) and payload["0.weight|r1"].tolist() == [1, 3]
    assert "0.weight|c0" not in payload and "0.weight|c1" not in payload
    assert payload_nbytes(payload) == (6 + 4) * 4 + (3 + 2) * 4 + 24
    row_specs = find_prunable(fc, ("0.weight",), "row")
    row_payload = extract(weights, {"0.weight": keep[:, :1].expand(6, 4)}, row_specs)
    assert payload_nbytes(row_payload) == 3 * 4 * 4 + 3 * 4 + 24  # rows 0, 1, 4


def test_payload_bytes_of_masked_parameters_by_hand() -> None:
    conv = nn.Conv1d(1, 4, kernel_size=3, bias=False)  # (4, 1, 3) viewed as (4, 3)
    weights = {"weight": conv.weight.detach()}
    unstructured = find_prunable(conv, ("weight",), "unstructured")
    mask = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 0], [0, 1, 0]], dtype=torch.bool).reshape(4, 1, 3)
    payload = extract(weights, {"weight": mask}, unstructured)
    # 6 kept float32 values (24) + 12 bits packed into 2 bytes
    assert payload["weight|b"].tolist() == [0b00111101, 0b00000100] and payload_nbytes(payload) == 24 + 2
    column = find_prunable(conv, ("weight",), "column")
    mask = torch.tensor([True, False, True])[None, :].expand(4, 3).reshape(4, 1, 3)
    payload = extract(weights, {"weight": mask}, column)
    assert payload["weight|g"].tolist() == [0, 2] and payload_nbytes(payload) == 8 * 4 + 2 * 4


def test_a_convolutions_kept_input_channels_travel_as_one_group_id_each() -> None:
    conv = nn.Conv2d(3, 2, kernel_size=2, bias=False)  # (2, 3, 2, 2): 4 taps per input channel
    specs = find_prunable(conv, ("weight",), "column")
    mask = torch.tensor([True, False, True])[None, :, None, None].expand(2, 3, 2, 2)
    payload = extract({"weight": conv.weight.detach()}, {"weight": mask}, specs)
    # 16 kept float32 values (two channels x two filters x four taps) + two int32 channel ids
    assert payload["weight|g"].tolist() == [0, 2] and payload_nbytes(payload) == 16 * 4 + 2 * 4
    assert torch.equal(groups_to_mask(payload["weight|g"], specs["weight"]), mask)
    one_tap = mask.clone()
    one_tap[:, 0, 0, 0] = False  # part of channel 0 only
    with pytest.raises(ValueError, match=r"the mask of weight keeps part of a column group \(taps=4\)"):
        extract({"weight": conv.weight.detach()}, {"weight": one_tap}, specs)


# --- extract -> train nothing -> expand --------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(PATTERNS), st.floats(0.0, 0.9), st.integers(0, 2**16), st.sampled_from([2, 4]))
def test_extract_then_expand_without_training_is_the_identity(
    pattern: str, sparsity: float, seed: int, width: int
) -> None:
    model = _seeded(Net(width), seed)
    specs = find_prunable(model, ("*weight",), pattern)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = _masks(weights, specs, sparsity, seed)
    payload = extract(weights, masks, specs)
    client = build_client_model(_seeded(Net(width), seed + 1), payload, specs)
    update = client_update(client, specs)
    values, held = expand(update, masks, specs, {n: w.shape for n, w in weights.items()})
    assert set(held) == set(masks)
    for name, w in weights.items():
        if name in masks:
            assert torch.equal(held[name], masks[name])
            assert torch.equal(values[name], w * masks[name])
        else:
            assert torch.equal(values[name], w)
    sliced = [n for n, s in specs.items() if s.linear]
    assert (pattern != "unstructured") == all(
        isinstance(client.module.get_submodule(n.removesuffix(".weight").replace("in_proj_weight", "in_proj")),
                   SlicedLinear)
        for n in sliced
    )


def test_masked_parameters_are_zero_where_pruned_and_projected_after_steps() -> None:
    model = _seeded(Net())
    specs = find_prunable(model, ("conv.weight", "attn.*"), "column")
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = _masks(weights, specs, 0.5, 1)
    client = build_client_model(_seeded(Net(), 5), extract(weights, masks, specs), specs)
    params = dict(client.module.named_parameters())
    assert torch.equal(params["conv.weight"], weights["conv.weight"] * masks["conv.weight"])
    with torch.no_grad():
        params["conv.weight"].add_(1.0)
    client.project()
    assert not params["conv.weight"][~masks["conv.weight"]].any()


@pytest.mark.parametrize("pattern", ["column", "half_column", "unstructured"])
def test_a_conv2d_pruned_by_input_channels_trains_only_the_kept_ones(pattern: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 2, 3, stride=2))
    specs = find_prunable(model, ("2.weight",), pattern)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = _masks(weights, specs, 0.5, 3)
    if pattern == "unstructured":  # prune channel 1 whole, so that even this mask drops it
        masks["2.weight"][:, 1] = False
    client = build_client_model(copy.deepcopy(model), extract(weights, masks, specs), specs)
    conv = client.module.get_submodule("2")
    channels = masks["2.weight"].any(dim=(0, 2, 3)).nonzero().flatten()
    assert isinstance(conv, ChannelSlicedConv2d) and conv.channels.tolist() == channels.tolist()
    assert channels.numel() < 6
    assert conv.weight.shape == (2, channels.numel(), 3, 3)
    if pattern == "column":
        assert channels.numel() == 3 and bool(client.masks["2.weight"].all())  # a column is a channel
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference[2].weight.mul_(masks["2.weight"])
    x = torch.randn(2, 4, 9, 9)
    out, expected = client.module(x), reference(x)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    grad = reference[2].weight.grad * masks["2.weight"]  # the masked full model's, where the client holds it
    torch.testing.assert_close(conv.weight.grad * client.masks["2.weight"], grad[:, channels])
    torch.testing.assert_close(client.module[0].weight.grad, reference[0].weight.grad)
    with torch.no_grad():
        conv.weight.add_(1.0)
    client.project()  # pruned entries of kept channels (half_column, unstructured) stay zero
    update = client_update(client, specs)
    values, held = expand(update, masks, specs, {n: w.shape for n, w in weights.items()})
    assert torch.equal(held["2.weight"], masks["2.weight"])
    assert torch.equal(values["2.weight"][:, channels], conv.weight.detach())
    assert not values["2.weight"][~masks["2.weight"]].any()


class ConvThenLinear(nn.Module):
    """A Conv2d whose (N, C, H, W) output a Linear reads as (N, H, C * W): W features per channel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.linear = nn.Linear(6 * 3, 4)

    def channel_readers(self) -> tuple[ChannelReader, ...]:
        return (ChannelReader("conv.weight", "linear.weight", 3),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))  # (N, C, H, W = 3)
        return self.linear(y.permute(0, 2, 1, 3).flatten(2))


@pytest.mark.parametrize("pattern", ["column", "half_column"])
def test_a_linear_reading_a_conv_channel_by_channel_leaves_its_unread_channels_uncomputed(pattern: str) -> None:
    torch.manual_seed(0)
    model = ConvThenLinear()
    specs = find_prunable(model, ("*weight",), pattern)
    assert specs["linear.weight"].taps == 3 and specs["conv.weight"].feeds == "linear.weight"
    assert [(g.reader, g.producers, g.width, g.taps) for g in find_channel_groups(model, specs)] == [
        ("linear.weight", ("conv.weight",), 6, 3)
    ]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = _masks(weights, specs, 0.5, 4)
    read = masks["linear.weight"].any(0).view(6, 3)  # the Linear keeps or prunes a channel's 3 features together
    assert torch.equal(read.all(1), read.any(1))
    live = read.any(1).nonzero().flatten()
    assert 0 < live.numel() < 6
    payload = extract(weights, masks, specs)
    # the convolution's live mask (kept input channels x read output channels) travels as bits
    conv_live = live_masks(masks, specs)["conv.weight"]
    assert torch.equal(conv_live.any(dim=(1, 2, 3)), read.any(1))
    assert "conv.weight|b" in payload and payload["conv.weight|v"].numel() == int(conv_live.sum())

    client = build_client_model(copy.deepcopy(model), payload, specs)
    conv, linear = client.module.get_submodule("conv"), client.module.get_submodule("linear")
    assert isinstance(conv, ChannelSlicedConv2d) and conv.outputs is not None
    assert conv.outputs.tolist() == live.tolist() and conv.weight.shape[0] == live.numel()
    assert isinstance(linear, SlicedLinear) and all(
        getattr(linear, f"c{i}") is None or getattr(linear, f"c{i}").max() < 3 * live.numel()
        for i in range(linear.num_blocks)
    )  # its input is the live channels' features only
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    x = torch.randn(2, 2, 4, 3)
    out, expected = client.module(x), reference(x)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    ref_grad = reference.conv.weight.grad * masks["conv.weight"]
    assert not ref_grad[~conv_live].any()  # an unread channel's weights get no gradient: nothing is lost
    torch.testing.assert_close(conv.weight.grad * client.masks["conv.weight"], ref_grad[live][:, conv.channels])
    torch.testing.assert_close(client.module.conv.bias.grad, reference.conv.bias.grad)
    with torch.no_grad():
        conv.weight.add_(1.0)
    client.project()
    values, held = expand(client_update(client, specs), masks, specs, {n: w.shape for n, w in weights.items()})
    assert torch.equal(held["conv.weight"], conv_live)
    assert torch.equal(values["conv.weight"][live][:, conv.channels], conv.weight.detach())


def test_a_channel_readers_mask_that_reads_part_of_a_channel_is_refused() -> None:
    model = ConvThenLinear()
    specs = find_prunable(model, ("*weight",), "column")
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = _masks(weights, specs, 0.5, 4)
    partial = masks["linear.weight"].clone()
    channel = int(partial.any(0).nonzero()[0]) // 3
    partial[:, 3 * channel] = False  # one of a kept channel's three features
    payload = extract(weights, {**masks, "linear.weight": partial}, specs)
    with pytest.raises(ValueError, match=r"the payload of linear.weight reads part of a channel's 3 features"):
        build_client_model(ConvThenLinear(), payload, specs)
    # a payload whose convolution mask keeps channels the Linear does not read
    unlinked = {n: PrunableSpec(**{**s.__dict__, "feeds": ""}) for n, s in specs.items()}
    payload = extract(weights, masks, unlinked)
    with pytest.raises(ValueError, match=r"the mask of conv.weight keeps weights of output channels no later"):
        build_client_model(ConvThenLinear(), payload, specs)


def test_group_ids_and_bits_round_trip() -> None:
    spec = PrunableSpec("attn.in_proj_weight", (6, 4), 3, False, "column")
    mask = torch.tensor([[1, 0, 1, 0]] * 2 + [[0, 0, 0, 1]] * 2 + [[1, 1, 0, 0]] * 2, dtype=torch.bool)
    ids = mask_to_groups(mask, spec)
    assert ids.dtype == torch.int32 and ids.tolist() == [0, 2, 7, 8, 9]  # 4 columns per block
    assert torch.equal(groups_to_mask(ids, spec), mask)
    bits = torch.rand(3, 5, 7) < 0.5
    assert torch.equal(unpack_bits(pack_bits(bits), (3, 5, 7)), bits)
    assert pack_bits(bits).numel() == (105 + 7) // 8


# --- SlicedLinear ------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", STRUCTURED)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layer", ["linear", "pointwise_conv1d"])
def test_sliced_linear_equals_the_masked_dense_linear(pattern: str, bias: bool, layer: str) -> None:
    conv = layer == "pointwise_conv1d"

    def make() -> nn.Module:
        return nn.Sequential(nn.Conv1d(6, 8, 1, bias=bias) if conv else nn.Linear(6, 8, bias=bias))

    dense = _seeded(make(), 3)
    specs = find_prunable(dense, ("0.weight",), pattern)
    mask = make_mask(torch.rand(8, 6, generator=torch.Generator().manual_seed(7)), 0.5, pattern)
    mask = mask.unsqueeze(-1) if conv else mask  # a pointwise conv's weight is (out, in, 1)
    weights = {n: p.detach().clone() for n, p in dense.named_parameters()}
    payload = extract(weights, {"0.weight": mask}, specs)
    client = build_client_model(_seeded(make(), 4), payload, specs)
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

    dense = _seeded(make(), 3)
    specs = find_prunable(dense, ("attn.in_proj_weight", "attn.out_proj.weight"), pattern)
    weights = {n: p.detach().clone() for n, p in dense.named_parameters()}
    masks = _masks(weights, specs, 0.5, seed=7)
    client = build_client_model(_seeded(make(), 4), extract(weights, masks, specs), specs)
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
    dense = _seeded(nn.Sequential(nn.Conv1d(6, 8, 1)), 3)
    specs = find_prunable(dense, ("0.weight",), "column")
    mask = make_mask(torch.rand(8, 6, generator=torch.Generator().manual_seed(7)), 0.5, "column").unsqueeze(-1)
    weights = {n: p.detach().clone() for n, p in dense.named_parameters()}
    sliced = build_client_model(_seeded(nn.Sequential(nn.Conv1d(6, 8, 1)), 4),
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
    dense = _seeded(nn.Sequential(nn.Linear(4, 2)), 1)
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
    dense = _seeded(nn.Sequential(nn.Linear(6, 8)), 1)
    specs = find_prunable(dense, ("0.weight",), pattern)
    mask = make_mask(torch.rand(8, 6, generator=torch.Generator().manual_seed(2)), 0.5, pattern)
    weights = {n: p.detach().clone() for n, p in dense.named_parameters()}
    client = build_client_model(_seeded(nn.Sequential(nn.Linear(6, 8)), 3), extract(weights, {"0.weight": mask}, specs),
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
