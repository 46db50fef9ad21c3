"""The batched RNN-T loss against torchaudio's kernel and against hand-computed lattices."""

from __future__ import annotations

import pytest
import torch
import torchaudio.functional as AF

from fedprune_core.speech.transducer import (
    joint_lattice_log_probs,
    joint_lattices,
    lattice_log_probs,
    lattice_nll,
    padded_lattice_nll,
    rnnt_nll,
)

BLANK = 4


def _random_lattices(lengths: list[tuple[int, int]], seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    logits = [(3 * torch.randn(t, u + 1, BLANK + 1, generator=g)).requires_grad_() for t, u in lengths]
    targets = [torch.randint(0, BLANK, (u,), generator=g) for _, u in lengths]
    return logits, targets


def _torchaudio(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    one = torch.ones(1, dtype=torch.int32)
    return AF.rnnt_loss(logits[None], target[None].int(), one * logits.shape[0], one * target.numel(), blank=BLANK,
                        reduction="sum")


@pytest.mark.parametrize("lengths", [[(7, 3)], [(9, 4), (5, 6), (1, 2), (6, 0), (8, 8)]])
def test_losses_and_gradients_match_torchaudio(lengths: list[tuple[int, int]]) -> None:
    logits, targets = _random_lattices(lengths, seed=len(lengths))
    weights = torch.rand(len(lengths), generator=torch.Generator().manual_seed(1))  # a different grad per utterance

    ours = rnnt_nll(logits, targets, BLANK)
    (ours * weights).sum().backward()
    our_grads = [x.grad.clone() for x in logits]
    for x in logits:
        x.grad = None
    reference = torch.stack([_torchaudio(x, t) for x, t in zip(logits, targets, strict=True)])
    (reference * weights).sum().backward()

    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)
    for ours_g, x in zip(our_grads, logits, strict=True):
        torch.testing.assert_close(ours_g, x.grad, rtol=1e-4, atol=1e-5)


def test_a_two_node_lattice_by_hand() -> None:
    # T = 1, U = 1: the only path emits the symbol at (0, 0), then blank at (0, 1)
    logits = torch.log(torch.tensor([[[0.2, 0.1, 0.0, 0.0, 0.7], [0.05, 0.05, 0.0, 0.0, 0.9]]]) + 1e-30)
    loss = rnnt_nll([logits], [torch.tensor([1])], BLANK)
    torch.testing.assert_close(loss, -torch.log(torch.tensor([0.1 * 0.9])), rtol=1e-6, atol=1e-6)


def test_no_target_symbols_means_blank_at_every_frame() -> None:
    logits = torch.log_softmax(torch.randn(3, 1, BLANK + 1, generator=torch.Generator().manual_seed(2)), -1)
    loss = rnnt_nll([logits], [torch.zeros(0, dtype=torch.long)], BLANK)
    torch.testing.assert_close(loss, -logits[:, 0, BLANK].sum(0, keepdim=True))


def test_the_lattice_reads_blank_and_the_next_symbol() -> None:
    logits = torch.randn(2, 3, BLANK + 1, generator=torch.Generator().manual_seed(3))
    pairs = lattice_log_probs(logits, torch.tensor([2, 0]), BLANK)
    log_probs = logits.log_softmax(-1)
    assert pairs.shape == (2, 3, 2)
    torch.testing.assert_close(pairs[..., 0], log_probs[..., BLANK])
    torch.testing.assert_close(pairs[:, :2, 1], log_probs[:, [0, 1], [2, 0]])
    torch.testing.assert_close(lattice_nll([pairs]), rnnt_nll([logits], [torch.tensor([2, 0])], BLANK))


def test_bad_shapes_are_named() -> None:
    need = r"logits of shape \(4, 3, 5\) for a target of 3 symbols: need \(T >= 1, 4, V\)"
    with pytest.raises(ValueError, match=need):
        rnnt_nll([torch.zeros(4, 3, 5)], [torch.zeros(3, dtype=torch.long)], BLANK)
    with pytest.raises(ValueError, match="got 1 logits and 2 targets"):
        rnnt_nll([torch.zeros(4, 3, 5)], [torch.zeros(2, dtype=torch.long)] * 2, BLANK)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_the_joint_activations_and_logits_are_recomputed_not_kept(activation: str) -> None:
    g = torch.Generator().manual_seed(4)
    source = torch.randn(6, 8, generator=g, requires_grad=True)
    prediction = torch.randn(4, 8, generator=g, requires_grad=True)
    weight = torch.randn(BLANK + 1, 8, generator=g, requires_grad=True)
    bias = torch.randn(BLANK + 1, generator=g, requires_grad=True)
    target = torch.tensor([1, 3, 0])
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ours = joint_lattice_log_probs(source, prediction, activation, weight, bias, target, BLANK)
    hidden = getattr(torch, activation)(source[:, None] + prediction[None])
    reference = lattice_log_probs(torch.nn.functional.linear(hidden, weight, bias), target, BLANK)
    torch.testing.assert_close(ours, reference)
    inputs = [source, prediction, weight, bias]
    kept = sum(saved.values()) - sum(t.untyped_storage().nbytes() for t in inputs)
    hidden_bytes = 6 * 4 * 8 * 4
    assert all(t.untyped_storage().data_ptr() in saved for t in inputs)
    assert kept < hidden_bytes / 2  # a normaliser per node and indices: no activations, no logits
    grad = torch.randn(ours.shape, generator=g)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(reference, inputs, grad),
                    strict=True):
        torch.testing.assert_close(a, b)


def test_the_joint_lattice_names_a_bad_activation_or_shape() -> None:
    source, prediction = torch.zeros(6, 8), torch.zeros(4, 8)
    weight, target = torch.zeros(BLANK + 1, 8), torch.tensor([1, 3, 0])
    with pytest.raises(ValueError, match="joint activation 'gelu' is not one of"):
        joint_lattice_log_probs(source, prediction, "gelu", weight, None, target, BLANK)
    with pytest.raises(ValueError, match=r"source \(6, 8\) and prediction \(4, 7\)"):
        joint_lattice_log_probs(source, torch.zeros(4, 7), "relu", weight, None, target, BLANK)
    with pytest.raises(ValueError, match=r"for a target of 2 symbols: need \(T >= 1, 3, D\)"):
        joint_lattice_log_probs(source, prediction, "relu", weight, None, target[:2], BLANK)


@pytest.mark.parametrize("symbols", [BLANK + 1, 8])  # an output layer padded to 8 symbols, and one not padded
def test_a_batch_of_joints_equals_each_utterance_joined_alone(symbols: int) -> None:
    g = torch.Generator().manual_seed(5)
    lengths = [(6, 3), (2, 0), (4, 5)]
    source = torch.randn(3, 7, 8, generator=g, requires_grad=True)  # padding beyond each length: never read
    prediction = torch.randn(3, 6, 8, generator=g, requires_grad=True)
    weight = torch.randn(symbols, 8, generator=g, requires_grad=True)
    bias = torch.randn(symbols, generator=g, requires_grad=True)
    targets = torch.randint(0, symbols, (3, 5), generator=g)
    targets[targets == BLANK] = 0

    ours = joint_lattices(source, prediction, lengths, targets, "relu", weight, bias, BLANK)
    assert ours.shape == (3, 6, 6, 2)
    references = [
        lattice_log_probs(torch.nn.functional.linear(torch.relu(source[b, :t, None] + prediction[b, None, : u + 1]),
                                                     weight, bias), targets[b, :u], BLANK)
        for b, (t, u) in enumerate(lengths)
    ]
    grads = [torch.randn(x.shape, generator=g) for x in references]
    padded_grad = torch.randn(ours.shape, generator=g)  # the padding's gradient is ignored
    for b, ((t, u), reference) in enumerate(zip(lengths, references, strict=True)):
        torch.testing.assert_close(ours[b, :t, : u + 1], reference)
        padded_grad[b, :t, : u + 1] = grads[b]
    assert ours.detach().count_nonzero() == sum(x.numel() for x in references)  # zeros elsewhere

    inputs = [source, prediction, weight, bias]
    expected = torch.autograd.grad(references, inputs, grads)
    masked = padded_grad.clone()
    for b, (t, u) in enumerate(lengths):
        masked[b] = 0
        masked[b, :t, : u + 1] = grads[b]
    for ours_g, reference_g in zip(torch.autograd.grad(ours, inputs, masked), expected, strict=True):
        torch.testing.assert_close(ours_g, reference_g)
    # and the losses through the padded lattices equal those of the lattices one by one
    frames, counts = torch.tensor([t for t, _ in lengths]), torch.tensor([u for _, u in lengths])
    torch.testing.assert_close(padded_lattice_nll(ours, frames, counts), lattice_nll(references))


def test_a_batch_of_joints_names_lengths_that_do_not_fit() -> None:
    source, prediction, weight = torch.zeros(2, 5, 8), torch.zeros(2, 4, 8), torch.zeros(BLANK + 1, 8)
    targets = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"utterance 1: 6 frames and 2 symbols do not fit"):
        joint_lattices(source, prediction, [(5, 3), (6, 2)], targets, "relu", weight, None, BLANK)
    with pytest.raises(ValueError, match=r"utterance 0: 0 frames"):
        joint_lattices(source, prediction, [(0, 3), (5, 2)], targets, "relu", weight, None, BLANK)
    with pytest.raises(ValueError, match=r"and 1 lengths: need \(B, T, D\)"):
        joint_lattices(source, prediction, [(5, 3)], targets, "relu", weight, None, BLANK)
