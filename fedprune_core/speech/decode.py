"""Transducer decoding: batched greedy search, and beam search through torchaudio.

Greedy search follows Graves (2012): at each encoder frame, emit the joiner's argmax and feed
it to the prediction network until it says blank (at most ``max_symbols_per_frame`` times). The
prediction network starts from the blank symbol, as ``torchaudio.models.RNNTBeamSearch`` does.
"""

from __future__ import annotations

import torch
from torchaudio.models import RNNT, RNNTBeamSearch

State = list[list[torch.Tensor]]


def _predict(model: RNNT, tokens: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
    ones = torch.ones(tokens.shape[0], dtype=torch.int32, device=tokens.device)
    out, _, new_state = model.predict(tokens.view(-1, 1), ones, state)
    return out, new_state


def _select(keep_new: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(keep_new.view(-1, *([1] * (new.dim() - 1))), new, old)


@torch.no_grad()
def greedy_decode(
    model: RNNT, features: torch.Tensor, lengths: torch.Tensor, blank: int, max_symbols_per_frame: int = 5
) -> list[list[int]]:
    """Greedy transducer search over a batch.

    Args:
        model: A transducer (e.g. :class:`~fedprune_core.speech.model.ConformerTransducer`).
        features: ``(B, T, F)`` input features.
        lengths: ``(B,)`` valid frames.
        blank: Blank index.
        max_symbols_per_frame: Cap on symbols emitted at one encoder frame.

    Returns:
        Per utterance, the emitted symbol indices (no blanks).
    """
    encodings, enc_lengths = model.transcribe(features, lengths)  # (B, T', D)
    batch = encodings.shape[0]
    tokens = torch.full((batch,), blank, dtype=torch.long, device=features.device)
    pred_out, state = _predict(model, tokens, None)  # (B, 1, D)
    ones = torch.ones(batch, dtype=torch.int32, device=features.device)
    hyps: list[list[int]] = [[] for _ in range(batch)]
    for t in range(encodings.shape[1]):
        active = t < enc_lengths
        for _ in range(max_symbols_per_frame):
            logits, _, _ = model.join(encodings[:, t : t + 1], ones, pred_out, ones)  # (B, 1, 1, V)
            best = logits.view(batch, -1).argmax(-1)
            active = active & (best != blank)
            if not bool(active.any()):
                break
            new_out, new_state = _predict(model, best, state)
            pred_out = _select(active, new_out, pred_out)
            state = [
                [_select(active, n, o) for n, o in zip(ns, os, strict=True)]
                for ns, os in zip(new_state, state, strict=True)
            ]
            for b in active.nonzero().view(-1).tolist():
                hyps[b].append(int(best[b]))
    return hyps


@torch.no_grad()
def beam_decode(
    model: RNNT, features: torch.Tensor, lengths: torch.Tensor, blank: int, beam_width: int = 4
) -> list[list[int]]:
    """Beam search with ``torchaudio.models.RNNTBeamSearch``, one utterance at a time.

    ``RNNTBeamSearch`` reads the blank score as the last output, so ``blank`` must be the last index.

    Args:
        model: A transducer whose blank is its last output class.
        features: ``(B, T, F)`` input features.
        lengths: ``(B,)`` valid frames.
        blank: Blank index.
        beam_width: Hypotheses kept per step.

    Returns:
        Per utterance, the best hypothesis' symbol indices (no blanks).
    """
    search = RNNTBeamSearch(model, blank)
    hyps = []
    for feats, length in zip(features, lengths, strict=True):
        best = search(feats[: int(length)].unsqueeze(0), length.view(1), beam_width)[0]
        hyps.append([t for t in best[0] if t != blank])
    return hyps
