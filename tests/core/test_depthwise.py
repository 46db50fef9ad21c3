"""The depthwise convolution summed tap by tap: the same values and gradients as ``F.conv1d``, and
pruned taps left out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedprune_core.depthwise import DepthwiseConv1d, depthwise_conv1d, kept_taps
from fedprune_core.prunable import find_prunable
from fedprune_core.speech.model import build_model
from fedprune_core.submodel import build_client_model, extract


def _grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], seed: int) -> tuple[torch.Tensor, ...]:
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, inputs, upstream)


@pytest.mark.parametrize(("frames", "kernel", "padding", "bias"), [
    (9, 5, 2, True),    # "same" padding, as the Conformer's
    (9, 5, 0, False),   # no padding: fewer output frames
    (4, 7, 3, True),    # fewer frames than taps
    (6, 3, 4, True),    # more padding than the kernel needs
])
def test_equals_conv1d_in_values_and_gradients(frames: int, kernel: int, padding: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, frames, generator=g, requires_grad=True)
    w = torch.randn(4, 1, kernel, generator=g, requires_grad=True)
    b = torch.randn(4, generator=g, requires_grad=True) if bias else None
    inputs = (x, w) if b is None else (x, w, b)
    ours = depthwise_conv1d(x, w, b, padding)
    theirs = F.conv1d(x, w, b, padding=padding, groups=4)
    assert ours.shape == theirs.shape == (3, 4, frames + 2 * padding - kernel + 1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for a, c in zip(_grads(ours, inputs, 1), _grads(theirs, inputs, 1), strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_left_out_taps_count_as_zero_weights_and_get_no_gradient() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, generator=g, requires_grad=True)
    w = torch.randn(3, 1, 5, generator=g, requires_grad=True)
    b = torch.randn(3, generator=g, requires_grad=True)
    taps = torch.tensor([0, 2, 3])
    zeroed = torch.zeros(5)
    zeroed[taps] = 1.0
    ours = depthwise_conv1d(x, w, b, 2, taps)
    theirs = F.conv1d(x, w * zeroed, b, padding=2, groups=3)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    (gx, gw, gb), (tx, tw, tb) = _grads(ours, (x, w, b), 3), _grads(theirs, (x, w, b), 3)
    torch.testing.assert_close(gx, tx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, tb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw[..., taps], tw[..., taps], rtol=1e-5, atol=1e-5)
    assert not gw[..., [1, 4]].any()  # the mask discards these anyway; not computing them saves the work


def test_bad_shapes_are_refused_with_the_rule() -> None:
    with pytest.raises(ValueError, match=r"need \(B, C, T\) and \(C, 1, K\)"):
        depthwise_conv1d(torch.zeros(2, 3, 8), torch.zeros(4, 1, 3), None, 1)
    with pytest.raises(ValueError, match="fewer than the kernel's 5 taps"):
        depthwise_conv1d(torch.zeros(2, 3, 2), torch.zeros(3, 1, 5), None, 0)


def test_from_conv_shares_the_parameters_draws_nothing_and_keeps_the_names() -> None:
    conv = nn.Conv1d(6, 6, 5, padding=2, groups=6)
    state = torch.get_rng_state()
    layer = DepthwiseConv1d.from_conv(conv)
    assert torch.equal(torch.get_rng_state(), state)  # building the model draws the same initial weights
    assert layer.weight is conv.weight and layer.bias is conv.bias
    assert list(layer.state_dict()) == list(conv.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 6, 7)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-6)
    layer.taps = torch.tensor([1, 3])
    assert list(layer.state_dict()) == ["weight", "bias"]  # taps are the client's, never stored


@pytest.mark.parametrize("conv", [
    nn.Conv1d(4, 4, 3, stride=2, groups=4),
    nn.Conv1d(4, 4, 3, dilation=2, groups=4),
    nn.Conv1d(4, 8, 3, groups=4),
    nn.Conv1d(4, 4, 3, padding="same", groups=4),
])
def test_from_conv_refuses_what_it_does_not_compute(conv: nn.Conv1d) -> None:
    with pytest.raises(ValueError, match="keep it as an nn.Conv1d"):
        DepthwiseConv1d.from_conv(conv)


def test_kept_taps_are_the_mask_columns_any_channel_keeps() -> None:
    mask = torch.tensor([[True, False, False, True], [False, False, True, False], [False, False, False, True]])
    mask = mask.unsqueeze(1)  # (C, 1, K)
    assert kept_taps(mask).tolist() == [0, 2, 3]
    assert kept_taps(mask, torch.tensor([1, 2])).tolist() == [2, 3]


def test_a_masked_client_leaves_out_the_taps_its_mask_prunes_for_every_channel() -> None:
    model = build_model("tiny", seed=1)
    specs = find_prunable(model, ("*weight",), "unstructured")
    name = "transcriber.conformer.conformer_layers.0.conv_module.sequential.2.weight"
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(s.shape, generator=g) < 0.5 for n, s in specs.items()}
    masks[name][..., [0, 3]] = False  # two taps pruned for every channel
    masks[name][..., 1] = True
    client = build_client_model(build_model("tiny", seed=2), extract(weights, masks, specs), specs)
    layer = client.module.get_submodule(name.removesuffix(".weight"))
    assert isinstance(layer, DepthwiseConv1d)  # no unit groups under an unstructured pattern: masked dense
    assert layer.taps is not None and 0 not in layer.taps.tolist() and 3 not in layer.taps.tolist()
    assert 1 in layer.taps.tolist()
    x = torch.randn(2, layer.in_channels, 12)
    expected = F.conv1d(x, weights[name] * masks[name], layer.bias, padding=layer.padding, groups=layer.groups)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
