"""Character vocabulary of the speech workload: encode, decode and validate transcripts.

The Conformer-Transducer of Federated Pruning (Lin et al., Interspeech 2022) predicts word
pieces; here a character vocabulary stands in (the issue asks for one), which keeps the
output layer tiny and the transducer loss cheap on CPU.

The blank symbol is the *last* index. ``torchaudio.models.RNNTBeamSearch`` assumes this
(it reads the blank score as ``probs[:, -1]``), so greedy and beam decoding share one layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

DEFAULT_SYMBOLS: str = " 'abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class CharVocabulary:
    """An ordered character set plus a trailing blank symbol.

    Attributes:
        symbols: The characters, in index order; each appears once. Index ``len(symbols)``
            is the transducer blank.
    """

    symbols: str = DEFAULT_SYMBOLS
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(set(self.symbols)) != len(self.symbols) or not self.symbols:
            raise ValueError(
                f"symbols={self.symbols!r} must be non-empty with no repeated character: list each character once"
            )
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.symbols)})

    @property
    def blank(self) -> int:
        """Index of the transducer blank (the last index)."""
        return len(self.symbols)

    @property
    def size(self) -> int:
        """Number of output classes, blank included."""
        return len(self.symbols) + 1

    def find_invalid(self, text: str) -> list[str]:
        """Characters of ``text`` outside the vocabulary, in order of first appearance."""
        return list(dict.fromkeys(c for c in text if c not in self._index))

    def validate(self, text: str, where: str = "text") -> None:
        """Raise if ``text`` cannot be encoded.

        Args:
            text: The transcript.
            where: Where the text came from (e.g. ``"manifest.jsonl:12"``), named in the error.

        Raises:
            ValueError: ``text`` is empty, has leading/trailing/double spaces, or holds characters
                outside the vocabulary.
        """
        bad = self.find_invalid(text)
        if bad:
            raise ValueError(
                f"{where}: text {text!r} has characters {bad!r} outside the vocabulary {self.symbols!r}: "
                "normalise the transcript (lowercase, drop punctuation) or extend the vocabulary"
            )
        if not text.strip() or text != " ".join(text.split()):
            raise ValueError(
                f"{where}: text {text!r} must be non-empty words separated by single spaces: "
                "normalise whitespace with ' '.join(text.split())"
            )

    def encode(self, text: str, where: str = "text") -> torch.Tensor:
        """Map a transcript to indices.

        Args:
            text: A transcript that passes :meth:`validate` (else ``ValueError`` naming ``where``).
            where: Where the text came from, for the error message.

        Returns:
            ``(U,)`` int32 tensor of symbol indices, ``U = len(text)``.
        """
        self.validate(text, where)
        return torch.tensor([self._index[c] for c in text], dtype=torch.int32)

    def decode(self, indices: Sequence[int] | torch.Tensor) -> str:
        """Map indices back to text, dropping blanks.

        Args:
            indices: ``(U,)`` symbol indices.

        Raises:
            ValueError: An index is outside ``[0, size)``.
        """
        values = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        out = []
        for i in values:
            if not 0 <= i < self.size:
                raise ValueError(f"index {i} must be in [0, {self.size}): decode only model outputs")
            if i != self.blank:
                out.append(self.symbols[i])
        return "".join(out)


def normalize_transcript(text: str) -> str:
    """Lowercase and collapse whitespace (what the LibriSpeech reader applies to its uppercase text)."""
    return " ".join(text.lower().split())
