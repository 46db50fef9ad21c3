"""Client-model assembly: masked parameters projected, convolutions trained on their kept and live channels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedprune_core.prunable import ChannelReader, PrunableSpec, find_prunable
from fedprune_core.submodel import (
    ChannelSlicedConv2d,
    SlicedLinear,
    build_client_model,
    client_update,
    expand,
    extract,
)
from fedprune_core.units import find_channel_groups, live_masks
from tests.core.submodel.common import Net, random_masks, seeded


def test_masked_parameters_are_zero_where_pruned_and_projected_after_steps() -> None:
    model = seeded(Net())
    specs = find_prunable(model, ("conv.weight", "attn.*"), "column")
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = random_masks(weights, specs, 0.5, 1)
    client = build_client_model(seeded(Net(), 5), extract(weights, masks, specs), specs)
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
    masks = random_masks(weights, specs, 0.5, 3)
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
    masks = random_masks(weights, specs, 0.5, 4)
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
    masks = random_masks(weights, specs, 0.5, 4)
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
