"""Word and character error rates, computed by jiwer over a whole test set.

Rates are corpus-level (total edits / total reference words or characters), the convention of
LibriSpeech results such as those of Lin et al. (Interspeech 2022), not a mean of per-utterance rates.
"""

from __future__ import annotations

from collections.abc import Sequence

import jiwer


def _check(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references and {len(hypotheses)} hypotheses must pair up one to one")
    if not references or any(not r.strip() for r in references):
        raise ValueError("references must be a non-empty list of non-empty strings: drop empty transcripts")


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Word edits (substitutions + deletions + insertions) per reference word.

    Args:
        references: True transcripts, non-empty.
        hypotheses: Decoded transcripts, paired with ``references``; may be empty strings.
    """
    _check(references, hypotheses)
    return float(jiwer.wer(list(references), list(hypotheses)))


def char_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Character edits per reference character (spaces count as characters)."""
    _check(references, hypotheses)
    return float(jiwer.cer(list(references), list(hypotheses)))
