"""The RNN-T loss (Graves, "Sequence Transduction with Recurrent Neural Networks", 2012), batched.

The same negative log-likelihood as ``torchaudio.functional.rnnt_loss`` (no clamping), computed so
that a client's CPU step does not wait on it: torchaudio's CPU kernel took about a fifth of a
`small` client's pruned training step (16 calls of ~7 ms, one per utterance). Here

1. :func:`lattice_log_probs` keeps, of an utterance's ``(T, U + 1, V)`` joint output, only the
   two log-probabilities the lattice reads at each node, blank and the next target symbol; its
   backward writes the logits' gradient in one pass. :func:`joint_lattices` does the same from
   a batch's joint network inputs, one autograd node for the batch, computing each utterance's
   ``(T, U + 1, D)`` activations and ``(T, U + 1, V)`` logits again in backward instead of
   keeping them, its output layer padded to a multiple of 8 symbols (vector kernels);
2. :func:`padded_lattice_nll` (:class:`_TransducerNLL`) runs the forward (alpha) and backward
   (beta) recursions for the whole batch, one encoder frame at a time: along the target axis a
   row of the lattice is a running log-sum, so each frame is one addition and one
   ``logcumsumexp`` over ``(B, U + 1)`` instead of U + 1 small steps, and the gradient is
   ``exp(alpha + log p + beta - log P)`` at every edge (no autograd graph).

Each utterance is joined at its own ``(T, U + 1)`` size, an utterance at a time (the whole
batch's joint at once would leave the CPU's caches): nothing is padded before the joint network.
"""

from __future__ import annotations

import math
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
    return padded_lattice_nll(padded, frames, symbols)


def padded_lattice_nll(log_probs: torch.Tensor, frames: torch.Tensor, symbols: torch.Tensor) -> torch.Tensor:
    """``(B,)`` negative log-likelihoods of padded lattices.

    Args:
        log_probs: ``(B, T, U + 1, 2)``, utterance b's :func:`lattice_log_probs` in
            ``[b, :frames[b], :symbols[b] + 1]`` (:func:`joint_lattices`' output); the rest is
            ignored.
        frames: ``(B,)`` encoder frames per utterance, each in ``[1, T]``.
        symbols: ``(B,)`` target symbols per utterance, each in ``[0, U]``.
    """
    device = log_probs.device
    frames, symbols = frames.to(device=device, dtype=torch.long), symbols.to(device=device, dtype=torch.long)
    return _TransducerNLL.apply(log_probs[..., 0], log_probs[..., :-1, 1], frames, symbols)


ACTIVATIONS: tuple[str, ...] = ("relu", "tanh")
"""Joint activations :func:`joint_lattice_log_probs` computes again in backward (torchaudio's two)."""


def joint_lattice_log_probs(
    source: torch.Tensor, prediction: torch.Tensor, activation: str, weight: torch.Tensor,
    bias: torch.Tensor | None, target: torch.Tensor, blank: int,
) -> torch.Tensor:
    """:func:`lattice_log_probs` of the joint network
    ``F.linear(activation(source[:, None] + prediction[None]), weight, bias)`` of one utterance:
    :func:`joint_lattices` of a batch of one.

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
    if source.dim() != 2 or prediction.dim() != 2 or source.shape[-1] != prediction.shape[-1]:
        raise ValueError(
            f"source {tuple(source.shape)} and prediction {tuple(prediction.shape)}: need (T, D) and (U + 1, D) "
            "with the same D, one utterance's encoder and predictor outputs"
        )
    _check_lattice("joint activations", source.unsqueeze(1).expand(-1, prediction.shape[0], -1), target, "D")
    lengths = [(source.shape[0], target.numel())]
    return joint_lattices(source[None], prediction[None], lengths, target[None], activation, weight, bias, blank)[0]


def joint_lattices(
    source: torch.Tensor, prediction: torch.Tensor, lengths: Sequence[tuple[int, int]], targets: torch.Tensor,
    activation: str, weight: torch.Tensor, bias: torch.Tensor | None, blank: int,
) -> torch.Tensor:
    """The padded lattices (:func:`padded_lattice_nll`'s input) of a batch's joint network
    ``F.linear(activation(source[b, :T_b, None] + prediction[b, None, :U_b + 1]), weight, bias)``,
    each utterance joined at its own ``(T_b, U_b + 1)`` size, one autograd node for the batch.

    Backward keeps only the inputs and one log-normaliser per node: the ``(T_b, U_b + 1, D)``
    activations and ``(T_b, U_b + 1, V)`` logits are computed again, an utterance at a time, in
    the backward pass. The activations are the largest tensor a transducer keeps (a fifth of a
    `small` client's training memory at batch 16).

    Args:
        source: ``(B, T, D)`` encoder outputs projected to the joint, padded.
        prediction: ``(B, U + 1, D)`` predictor outputs, padded.
        lengths: per utterance, ``(T_b, U_b)``: its encoder frames (``1 <= T_b <= T``) and target
            symbols (``U_b <= U``).
        targets: ``(B, U)`` symbol indices, padded.
        activation: the joint's, one of :data:`ACTIVATIONS`.
        weight: ``(V, D)`` output layer weight; bias: ``(V,)`` or None.
        blank: index of the blank symbol.

    Returns:
        ``(B, max T_b, max U_b + 1, 2)``: utterance b's :func:`lattice_log_probs` in
        ``[b, :T_b, :U_b + 1]``, zeros elsewhere.

    Raises:
        ValueError: an activation not in :data:`ACTIVATIONS`, or shapes or lengths that do not fit.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"joint activation {activation!r} is not one of {ACTIVATIONS}: use a ReLU or tanh joint")
    batch = source.shape[0] if source.dim() == 3 else -1
    if (source.dim() != 3 or prediction.dim() != 3 or prediction.shape[0] != batch or targets.dim() != 2
            or targets.shape[0] != batch or len(lengths) != batch or source.shape[-1] != prediction.shape[-1]):
        raise ValueError(
            f"source {tuple(source.shape)}, prediction {tuple(prediction.shape)}, targets {tuple(targets.shape)} "
            f"and {len(lengths)} lengths: need (B, T, D), (B, U + 1, D), (B, U) and B (frames, symbols) pairs"
        )
    for b, (t, u) in enumerate(lengths):
        if not 1 <= t <= source.shape[1] or not 0 <= u < prediction.shape[1] or u > targets.shape[1]:
            raise ValueError(
                f"utterance {b}: {t} frames and {u} symbols do not fit source {tuple(source.shape)}, prediction "
                f"{tuple(prediction.shape)} and targets {tuple(targets.shape)}: need 1 <= frames <= T and "
                "symbols <= U, the lengths the padded tensors hold"
            )
    after = torch.nn.functional.pad(targets.long(), (0, 1), value=blank)  # (B, U + 1)
    symbols = torch.tensor([[u] for _, u in lengths], device=after.device)
    after.scatter_(1, symbols, blank)  # the last row of each lattice emits no symbol
    return _JointLattices.apply(source, prediction, activation, weight, bias, after, tuple(lengths), blank)


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


_OUTPUT_ALIGNMENT = 8
"""The joint's output layer is computed :data:`_OUTPUT_ALIGNMENT` symbols at a time: a CPU's vector
kernels run a row of 32 outputs much faster than one of 29 (a `small` client's joint output layer
on one utterance's 2,268 nodes: 0.21 against 0.35 ms; the log-normaliser 0.09 against 0.18 ms)."""


def _padded_output_layer(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint's output layer with its ``V`` outputs padded to a multiple of :data:`_OUTPUT_ALIGNMENT`:
    zero weights and a bias of -inf, so padded logits take no probability and get no gradient (-inf,
    not a finite log 0 such as ``_NEG``: ``exp`` of a huge negative number takes a CPU's slow path,
    0.15 against 0.06 ms for one utterance's log-probabilities)."""
    symbols = weight.shape[0]
    pad = -symbols % _OUTPUT_ALIGNMENT
    bias = weight.new_zeros(symbols) if bias is None else bias
    if pad == 0:
        return weight, bias
    return (torch.nn.functional.pad(weight, (0, 0, 0, pad)),
            torch.nn.functional.pad(bias, (0, pad), value=-math.inf))


def _joint_hidden(source: torch.Tensor, prediction: torch.Tensor, activation: str) -> torch.Tensor:
    hidden = source.unsqueeze(1) + prediction.unsqueeze(0)
    return hidden.relu_() if activation == "relu" else hidden.tanh_()


class _JointLattices(torch.autograd.Function):
    """:func:`joint_lattices`: per utterance, :class:`_SymbolLogProbs` of the joint network, its
    activations and logits computed again in backward."""

    @staticmethod
    def forward(
        ctx: Any, source: torch.Tensor, prediction: torch.Tensor, activation: str, weight: torch.Tensor,
        bias: torch.Tensor | None, after: torch.Tensor, lengths: tuple[tuple[int, int], ...], blank: int,
    ) -> torch.Tensor:
        t_max, width = max(t for t, _ in lengths), max(u for _, u in lengths) + 1
        out = source.new_zeros(len(lengths), t_max, width, 2)
        normalisers = source.new_zeros(len(lengths), t_max, width, 1)
        padded_weight, padded_bias = _padded_output_layer(weight, bias)
        for b, (t, u) in enumerate(lengths):
            logits = torch.nn.functional.linear(
                _joint_hidden(source[b, :t], prediction[b, : u + 1], activation), padded_weight, padded_bias)
            normaliser = normalisers[b, :t, : u + 1]
            torch.logsumexp(logits, -1, keepdim=True, out=normaliser)
            out[b, :t, : u + 1] = _read(logits, after[b, : u + 1], blank).sub_(normaliser)
        ctx.blank, ctx.activation, ctx.lengths, ctx.has_bias = blank, activation, lengths, bias is not None
        ctx.save_for_backward(source, prediction, weight, bias, after, normalisers)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        source, prediction, weight, bias, after, normalisers = ctx.saved_tensors
        need_source, need_prediction, _, need_weight, need_bias = ctx.needs_input_grad[:5]
        grad_source = torch.zeros_like(source) if need_source else None
        grad_prediction = torch.zeros_like(prediction) if need_prediction else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if ctx.has_bias and need_bias else None
        padded_weight, padded_bias = _padded_output_layer(weight, bias)
        symbols = weight.shape[0]
        for b, (t, u) in enumerate(ctx.lengths):
            hidden = _joint_hidden(source[b, :t], prediction[b, : u + 1], ctx.activation)  # (T, U + 1, D)
            log_probs = torch.nn.functional.linear(hidden, padded_weight, padded_bias)
            log_probs.sub_(normalisers[b, :t, : u + 1])
            # the padding's log-probabilities are log 0: its gradient is 0, and is left out
            grad_logits = _logits_grad(log_probs, grad[b, :t, : u + 1], after[b, : u + 1], ctx.blank)[..., :symbols]
            flat = grad_logits.reshape(-1, symbols)
            if grad_weight is not None:
                grad_weight.addmm_(flat.t(), hidden.view(-1, hidden.shape[-1]))
            if grad_bias is not None:
                grad_bias.add_(flat.sum(0))
            if grad_source is None and grad_prediction is None:
                continue
            grad_hidden = grad_logits @ weight
            # through the activation, as autograd's own backward of relu / tanh computes it
            if ctx.activation == "relu":
                grad_sum = torch.ops.aten.threshold_backward(grad_hidden, hidden, 0.0)
            else:
                grad_sum = torch.ops.aten.tanh_backward(grad_hidden, hidden)
            if grad_source is not None:
                torch.sum(grad_sum, 1, out=grad_source[b, :t])
            if grad_prediction is not None:
                torch.sum(grad_sum, 0, out=grad_prediction[b, : u + 1])
        return grad_source, grad_prediction, None, grad_weight, grad_bias, None, None, None


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
    emits k..u - 1), i.e. ``C[u] + logcumsumexp(a - C)`` with C the row's cumulative emits. The
    recursion runs on ``A[t] = alpha[t] - C[t]``: ``A[t] = logcumsumexp(A[t - 1] + D[t])`` with
    ``D[t] = C[t - 1] + blank[t - 1] - C[t]`` taken for every frame at once, so that a frame is
    one addition and one ``logcumsumexp``.
    """
    entry = blank.new_full((blank.shape[0], blank.shape[2]), _NEG)
    entry[:, 0] = 0.0
    step = cum[:, :-1] + blank[:, :-1] - cum[:, 1:]  # (B, T - 1, U + 1): D[1..T - 1]
    out = [torch.logcumsumexp(entry - cum[:, 0], -1)]
    for t in range(1, blank.shape[1]):
        out.append(torch.logcumsumexp(out[-1] + step[:, t - 1], -1))
    return torch.stack(out, 1).add_(cum)


def _betas(
    blank: torch.Tensor, cum: torch.Tensor, frames: torch.Tensor, symbols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward variables, each ``(B, T, U + 1)``: beta of node (t + 1, u), the node a blank from
    (t, u) leads to, and beta of node (t, u).

    Beyond the last frame of utterance b sits a virtual row, 0 at its last symbol and log 0
    elsewhere, so the final blank closes the lattice; rows after it are never read.

    beta[t, u] = log-sum over k >= u of (beta[t + 1, k] + blank[t, k] + the emits u..k - 1). The
    recursion runs on ``S[t] = beta[t] + C[t]`` with the symbol axis reversed, where the log-sum
    is a ``logcumsumexp``: ``S[t] = revlogcumsumexp(S[t + 1] + E[t])`` with
    ``E[t] = blank[t] + C[t] - C[t + 1]`` taken for every frame at once, and
    ``S[t] = revlogcumsumexp(final + blank[t] + C[t])`` at an utterance's last frame.
    """
    frames_count = blank.shape[1]
    width = blank.shape[2]
    final = torch.where(torch.arange(width, device=blank.device) == symbols[:, None], 0.0, _NEG)  # (B, U + 1)
    closing = (final[:, None] + blank + cum).flip(-1)  # (B, T, U + 1), reversed symbols
    step = (blank[:, :-1] + cum[:, :-1] - cum[:, 1:]).flip(-1)  # E[0..T - 2], reversed symbols
    last = frames - 1
    closes = {int(t): (last == t)[:, None] for t in last.unique().tolist()}
    out: list[torch.Tensor] = [torch.logcumsumexp(closing[:, -1], -1)]
    for t in range(frames_count - 2, -1, -1):
        x = out[-1] + step[:, t]
        if t in closes:
            x = torch.where(closes[t], closing[:, t], x)
        out.append(torch.logcumsumexp(x, -1))
    beta = torch.stack(out[::-1], 1).flip(-1).sub_(cum)
    after = torch.cat([beta[:, 1:], final[:, None]], 1)  # beta[t + 1], the virtual row after the last frame
    beta_next = torch.where((torch.arange(frames_count, device=blank.device) == last[:, None])[..., None],
                            final[:, None], after)
    return beta_next, beta
