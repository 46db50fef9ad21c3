import pytest
import torch
from torch import nn

from fedprune_core.speech.model import (
    MODEL_PRESETS,
    ModelConfig,
    SubsamplingConvs,
    build_model,
    count_parameters,
    subsampled_length,
)
from fedprune_core.speech.text import CharVocabulary


def test_tiny_forward_shapes_and_backward_reaches_every_parameter():
    model = build_model("tiny")
    feats, lengths = torch.randn(2, 53, 80), torch.tensor([53, 30])
    targets = torch.tensor([[28, 2, 3, 4], [28, 5, 28, 28]])
    logits, frames, target_lengths, _ = model(feats, lengths, targets, torch.tensor([4, 2]))
    assert logits.shape == (2, 14, 4, CharVocabulary().size)  # T' = ceil(53 / 4) = 14
    assert frames.tolist() == [14, 8]
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def _plain_copy(convs: SubsamplingConvs) -> nn.Sequential:
    plain = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
    plain.load_state_dict(convs.state_dict())
    return plain


@pytest.mark.parametrize("input_grad", [False, True])
def test_subsampling_convs_train_as_the_plain_layers_do(input_grad):
    torch.manual_seed(0)
    convs = SubsamplingConvs(8)
    plain = _plain_copy(convs)
    assert list(convs.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    x = torch.randn(3, 1, 37, 20)
    grad = torch.randn(3, 8, 10, 5)
    outs, input_grads = [], []
    for m in (convs, plain):
        xi = x.clone().requires_grad_(input_grad)
        out = m(xi)
        out.backward(grad)
        outs.append(out)
        input_grads.append(xi.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for (name, a), b in zip(convs.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
    if input_grad:
        torch.testing.assert_close(input_grads[0], input_grads[1], rtol=0, atol=0)
    else:
        assert input_grads == [None, None]


def test_subsampling_convs_keep_the_input_and_output_not_the_first_layers_output():
    torch.manual_seed(0)
    convs = SubsamplingConvs(8)
    x = torch.randn(3, 1, 37, 20)
    shapes = {m: [] for m in ("recomputing", "plain")}
    for name, m in (("recomputing", convs), ("plain", _plain_copy(convs))):
        with torch.autograd.graph.saved_tensors_hooks(lambda t, n=name: shapes[n].append(tuple(t.shape)) or t,
                                                      lambda t: t):
            m(x)
    hidden = (3, 8, 19, 10)
    assert hidden in shapes["plain"]
    assert hidden not in shapes["recomputing"]
    assert {(3, 1, 37, 20), (3, 8, 10, 5)} <= set(shapes["recomputing"])


def test_subsampling_convs_without_gradients_run_their_layers():
    convs = SubsamplingConvs(8)
    calls = []
    convs[0].register_forward_hook(lambda *_: calls.append("conv"))
    x = torch.randn(1, 1, 9, 9)
    with torch.no_grad():
        out = convs(x)
        torch.testing.assert_close(out, _plain_copy(convs)(x), rtol=0, atol=0)
    assert calls == ["conv"]
    convs(x)  # with gradients: one autograd function, not the layers
    assert calls == ["conv"]


def test_subsampled_length_is_ceil_of_a_quarter():
    t = torch.arange(1, 40)
    assert subsampled_length(t).tolist() == [-(-int(x) // 4) for x in t]


def test_sizes_of_the_presets():
    assert 40_000 < count_parameters(build_model("tiny")) < 100_000
    assert 1_000_000 <= count_parameters(build_model("small")) <= 5_000_000


def test_paper_configuration_is_conformer_l_sized():
    config = MODEL_PRESETS["paper"]
    assert (config.num_blocks, config.d_model, config.pred_hidden_dim, config.joint_dim) == (
        17,
        512,
        640,
        2048,
    )
    assert 110e6 < count_parameters(build_model("paper")) < 125e6


def test_linear_layers_are_plain_modules_the_submodels_can_swap():
    model = build_model("tiny")
    names = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert {
        "transcriber.subsampling.linear",
        "transcriber.output",
        "joiner.linear",
        "predictor.linear",
        "predictor.lstm_layers.0.x2g",
        "transcriber.conformer.conformer_layers.0.ffn1.sequential.1",
    } <= names


def test_build_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = build_model("tiny", seed=1), build_model("tiny", seed=1), build_model("tiny", seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_encoder_is_not_streaming():
    with pytest.raises(NotImplementedError, match="full-context"):
        build_model("tiny").transcriber.infer(torch.zeros(1, 4, 80), torch.tensor([4]), None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_heads": 5}, "must divide"),
        ({"conv_kernel": 4}, "odd"),
        ({"d_model": 0}, "> 0"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_config_validation(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**change)


def test_unknown_preset():
    with pytest.raises(ValueError, match="not a preset"):
        build_model("huge")
