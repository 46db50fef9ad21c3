"""The RNN-T loss (Graves, "Sequence Transduction with Recurrent Neural Networks", 2012), batched.

The same negative log-likelihood as ``torchaudio.functional.rnnt_loss`` (no clamping), computed so
that a client's CPU step does not wait on it: torchaudio's CPU kernel took about a fifth of a
`small` client's pruned training step (16 calls of ~7 ms, one per utterance). Here

1. :func:`lattice_log_probs` keeps, of an utterance's ``(T, U + 1, V)`` joint output, only the
   two log-probabilities the lattice reads at each node, blank and the next target symbol; its
   backward writes the logits' gradient in one pass. :func:`joint_lattice_log_probs` does the
   same from the joint network's inputs, computing its ``(T, U + 1, D)`` activations and
   ``(T, U + 1, V)`` logits again in backward instead of keeping them;
2. :func:`lattice_nll` (:class:`_TransducerNLL`) runs the forward (alpha) and backward (beta)
   recursions for the whole batch, one encoder frame at a time: along the target axis a row of the lattice is a running
   log-sum, so each frame is one ``logcumsumexp`` over ``(B, U + 1)`` instead of U + 1 small steps,
   and the gradient is ``exp(alpha + log p + beta - log P)`` at every edge (no autograd graph).

Each utterance keeps its own ``(T, U + 1)`` lattice: nothing is padded before the joint network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

_NEG = -1e30
"""Log of zero: finite so that ``logcumsumexp`` and its sums never produce inf - inf."""


def rnnt_nll(logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], blank: int) -> torch.Tensor:
    """Negative log-likelihood of each utterance's target under its transducer lattice.

    Args:
        logits: per utterance, ``(T_i, U_i + 1, V)`` joint network outputs (unnormalised).
        targets: per utterance, ``(U_i,)`` symbol indices (no blank).
        blank: index of the blank symbol.

    Returns:
        ``(B,)`` losses in nats: ``torchaudio.functional.rnnt_loss`` of each utterance (no
        clamping), up to float rounding.

    Raises:
        ValueError: no utterances, or logits whose shape does not fit their target.
    """
    if not logits or len(logits) != len(targets):
        raise ValueError(
            f"got {len(logits)} logits and {len(targets)} targets: pass one (T, U + 1, V) logits tensor "
            "and one (U,) target per utterance, at least one"
        )
    return lattice_nll([lattice_log_probs(x, t, blank) for x, t in zip(logits, targets, strict=True)])


def lattice_log_probs(logits: torch.Tensor, target: torch.Tensor, blank: int) -> torch.Tensor:
    """What the lattice reads of one utterance's joint output: at every node (t, u), the
    log-probability of blank and of the next target symbol.

    Args:
        logits: ``(T, U + 1, V)`` joint network output.
        target: ``(U,)`` symbol indices.
        blank: index of the blank symbol.

    Returns:
        ``(T, U + 1, 2)``; on the last row (u = U), where no symbol is left to emit, the second
        entry is blank's again and is never read.

    Raises:
        ValueError: ``logits`` is not ``(T >= 1, U + 1, V)``.
    """
    _check_lattice("logits", logits, target, "V")
    return _SymbolLogProbs.apply(logits, _after(target, blank), blank)


def lattice_nll(log_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(B,)`` negative log-likelihoods of lattices given as :func:`lattice_log_probs` outputs
    ``(T_i, U_i + 1, 2)``."""
    frames = torch.tensor([x.shape[0] for x in log_probs])
    symbols = torch.tensor([x.shape[1] - 1 for x in log_probs])
    t_max, u_max = int(frames.max()), int(symbols.max())
    padded = torch.stack([
        torch.nn.functional.pad(x, (0, 0, 0, u_max - x.shape[1] + 1, 0, t_max - x.shape[0])) for x in log_probs
    ])  # (B, T, U + 1, 2)
    device = padded.device
    frames, symbols = frames.to(device), symbols.to(device)
    return _TransducerNLL.apply(padded[..., 0], padded[..., :-1, 1], frames, symbols)


ACTIVATIONS: tuple[str, ...] = ("relu", "tanh")
"""Joint activations :func:`joint_lattice_log_probs` computes again in backward (torchaudio's two)."""


def joint_lattice_log_probs(
    source: torch.Tensor, prediction: torch.Tensor, activation: str, weight: torch.Tensor,
    bias: torch.Tensor | None, target: torch.Tensor, blank: int,
) -> torch.Tensor:
    """:func:`lattice_log_probs` of the joint network
    ``F.linear(activation(source[:, None] + prediction[None]), weight, bias)``, keeping for backward
    only its inputs and one log-normaliser per node: the ``(T, U + 1, D)`` activations and the
    ``(T, U + 1, V)`` logits are computed again in the backward pass. The activations are the
    largest tensor a transducer keeps (a fifth of a `small` client's training memory at batch 16).

    Args:
        source: ``(T, D)`` encoder output projected to the joint; prediction: ``(U + 1, D)``
            predictor output.
        activation: the joint's, one of :data:`ACTIVATIONS`.
        weight: ``(V, D)`` output layer weight; bias: ``(V,)`` or None.
        target: ``(U,)`` symbol indices.
        blank: index of the blank symbol.

    Raises:
        ValueError: an activation not in :data:`ACTIVATIONS`, or shapes that do not fit.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"joint activation {activation!r} is not one of {ACTIVATIONS}: use a ReLU or tanh joint")
    if source.dim() != 2 or prediction.dim() != 2 or source.shape[-1] != prediction.shape[-1]:
        raise ValueError(
            f"source {tuple(source.shape)} and prediction {tuple(prediction.shape)}: need (T, D) and (U + 1, D) "
            "with the same D, one utterance's encoder and predictor outputs"
        )
    _check_lattice("joint activations", source.unsqueeze(1).expand(-1, prediction.shape[0], -1), target, "D")
    return _JointSymbolLogProbs.apply(source, prediction, activation, weight, bias, _after(target, blank), blank)


def _check_lattice(what: str, x: torch.Tensor, target: torch.Tensor, last: str) -> None:
    if x.dim() != 3 or x.shape[0] == 0 or x.shape[1] != target.numel() + 1:
        raise ValueError(
            f"{what} of shape {tuple(x.shape)} for a target of {target.numel()} symbols: need "
            f"(T >= 1, {target.numel() + 1}, {last}), one lattice row per target symbol plus one"
        )


def _after(target: torch.Tensor, blank: int) -> torch.Tensor:
    """``(U + 1,)``: the symbol each lattice row emits next (blank on the last row)."""
    return torch.cat([target.long(), target.new_full((1,), blank).long()])


def _read(log_probs: torch.Tensor, after: torch.Tensor, blank: int) -> torch.Tensor:
    """``(T, U + 1, V)`` log-probabilities -> ``(T, U + 1, 2)`` at blank and at ``after[u]``."""
    index = after.view(1, -1, 1).expand(log_probs.shape[0], -1, 1)
    return torch.cat([log_probs[..., blank : blank + 1], log_probs.gather(-1, index)], -1)


def _logits_grad(log_probs: torch.Tensor, grad: torch.Tensor, after: torch.Tensor, blank: int) -> torch.Tensor:
    """Gradient of :func:`_read` ``(log_softmax(z))`` w.r.t. z; overwrites ``log_probs``."""
    out = log_probs.exp_().mul_(-grad.sum(-1, keepdim=True))  # d log p_k / d z_j = [j = k] - p_j
    out[..., blank] += grad[..., 0]
    index = after.view(1, -1, 1).expand(log_probs.shape[0], -1, 1)
    return out.scatter_add_(-1, index, grad[..., 1:])


class _SymbolLogProbs(torch.autograd.Function):
    """``log_softmax(logits)`` at blank and at ``after[u]`` along each row u: ``(T, U + 1, V) -> (T, U + 1, 2)``."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, after: torch.Tensor, blank: int) -> torch.Tensor:
        log_probs = logits.log_softmax(-1)
        ctx.blank = blank
        ctx.save_for_backward(log_probs, after)
        return _read(log_probs, after, blank)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        log_probs, after = ctx.saved_tensors
        return _logits_grad(log_probs.clone(), grad, after, ctx.blank), None, None


def _joint_hidden(source: torch.Tensor, prediction: torch.Tensor, activation: str) -> torch.Tensor:
    hidden = source.unsqueeze(1) + prediction.unsqueeze(0)
    return hidden.relu_() if activation == "relu" else hidden.tanh_()


class _JointSymbolLogProbs(torch.autograd.Function):
    """:class:`_SymbolLogProbs` of the joint network, recomputing its activations and logits in backward."""

    @staticmethod
    def forward(
        ctx: Any, source: torch.Tensor, prediction: torch.Tensor, activation: str, weight: torch.Tensor,
        bias: torch.Tensor | None, after: torch.Tensor, blank: int,
    ) -> torch.Tensor:
        logits = torch.nn.functional.linear(_joint_hidden(source, prediction, activation), weight, bias)
        normaliser = logits.logsumexp(-1, keepdim=True)  # (T, U + 1, 1)
        ctx.blank, ctx.activation, ctx.has_bias = blank, activation, bias is not None
        ctx.save_for_backward(source, prediction, weight, bias, after, normaliser)
        return _read(logits, after, blank) - normaliser

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        source, prediction, weight, bias, after, normaliser = ctx.saved_tensors
        hidden = _joint_hidden(source, prediction, ctx.activation)
        log_probs = torch.nn.functional.linear(hidden, weight, bias).sub_(normaliser)
        grad_logits = _logits_grad(log_probs, grad, after, ctx.blank)  # (T, U + 1, V)
        flat = grad_logits.reshape(-1, grad_logits.shape[-1])
        grad_weight = flat.t() @ hidden.reshape(-1, hidden.shape[-1]) if ctx.needs_input_grad[3] else None
        grad_bias = flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        grad_source = grad_prediction = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_hidden = grad_logits @ weight
            # through the activation, as autograd's own backward of relu / tanh computes it
            if ctx.activation == "relu":
                grad_sum = torch.ops.aten.threshold_backward(grad_hidden, hidden, 0.0)
            else:
                grad_sum = torch.ops.aten.tanh_backward(grad_hidden, hidden)
            grad_source = grad_sum.sum(1) if ctx.needs_input_grad[0] else None
            grad_prediction = grad_sum.sum(0) if ctx.needs_input_grad[1] else None
        return grad_source, grad_prediction, None, grad_weight, grad_bias, None, None


class _TransducerNLL(torch.autograd.Function):
    """``-log P(target)`` of each padded lattice from its blank and emit log-probabilities.

    Inputs: ``blank (B, T, U + 1)``, ``emit (B, T, U)`` and the lengths ``frames (B,)``,
    ``symbols (B,)``; values beyond them are ignored.
    """

    @staticmethod
    def forward(
        ctx: Any, blank: torch.Tensor, emit: torch.Tensor, frames: torch.Tensor, symbols: torch.Tensor
    ) -> torch.Tensor:
        blank, emit = blank.detach(), emit.detach()
        rows = torch.arange(blank.shape[0], device=blank.device)
        alpha = _alpha(blank, _cumulative(emit))
        log_p = alpha[rows, frames - 1, symbols] + blank[rows, frames - 1, symbols]
        ctx.save_for_backward(blank, emit, frames, symbols, alpha, log_p)
        return -log_p

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        blank, emit, frames, symbols, alpha, log_p = ctx.saved_tensors
        t_axis = torch.arange(blank.shape[1], device=blank.device)[None, :, None]
        u_axis = torch.arange(blank.shape[2], device=blank.device)[None, None, :]
        valid = (t_axis < frames[:, None, None]) & (u_axis <= symbols[:, None, None])
        beta_next, beta = _betas(blank, _cumulative(emit), frames, symbols)
        scale = -grad[:, None, None]
        through_blank = (alpha + blank + beta_next - log_p[:, None, None]).exp()
        grad_blank = torch.where(valid, through_blank, 0.0) * scale
        emit_valid = valid[..., :-1] & (u_axis[..., :-1] < symbols[:, None, None])
        through_emit = (alpha[..., :-1] + emit + beta[..., 1:] - log_p[:, None, None]).exp()
        grad_emit = torch.where(emit_valid, through_emit, 0.0) * scale
        return grad_blank, grad_emit, None, None


def _cumulative(emit: torch.Tensor) -> torch.Tensor:
    """``(B, T, U + 1)``: C[t, u], the sum of the emits 0..u - 1 of row t (C[t, 0] = 0)."""
    return torch.nn.functional.pad(emit.cumsum(-1), (1, 0))


def _alpha(blank: torch.Tensor, cum: torch.Tensor) -> torch.Tensor:
    """Forward variables ``(B, T, U + 1)``: alpha[t, u] = log-sum of the paths into node (t, u).

    Along a row, alpha[t, u] = log-sum over k <= u of (alpha[t - 1, k] + blank[t - 1, k] + the
    emits k..u - 1), i.e. ``C[u] + logcumsumexp(a - C)`` with C the row's cumulative emits.
    """
    batch, frames, width = blank.shape
    entry = blank.new_full((batch, width), _NEG)
    entry[:, 0] = 0.0
    out: list[torch.Tensor] = []
    for t in range(frames):
        if t:
            entry = out[-1] + blank[:, t - 1]
        out.append(torch.logcumsumexp(entry - cum[:, t], -1) + cum[:, t])
    return torch.stack(out, 1)


def _betas(
    blank: torch.Tensor, cum: torch.Tensor, frames: torch.Tensor, symbols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward variables, each ``(B, T, U + 1)``: beta of node (t + 1, u), the node a blank from
    (t, u) leads to, and beta of node (t, u).

    Beyond the last frame of utterance b sits a virtual row, 0 at its last symbol and log 0
    elsewhere, so the final blank closes the lattice; rows after it are never read.
    """
    width = blank.shape[2]
    final = torch.where(torch.arange(width, device=blank.device) == symbols[:, None], 0.0, _NEG)
    nxt = final.clone()
    nexts: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    for t in range(blank.shape[1] - 1, -1, -1):
        nxt = torch.where((frames - 1 == t)[:, None], final, nxt)
        nexts.append(nxt)
        # beta[t, u] = log-sum over k >= u of (nxt[k] + blank[t, k] + the emits u..k - 1)
        x = nxt + blank[:, t] + cum[:, t]
        nxt = torch.logcumsumexp(x.flip(-1), -1).flip(-1) - cum[:, t]
        betas.append(nxt)
    return torch.stack(nexts[::-1], 1), torch.stack(betas[::-1], 1)
