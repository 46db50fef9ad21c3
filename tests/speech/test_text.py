import pytest
import torch

from fedprune_core.speech.text import CharVocabulary, normalize_transcript


def test_blank_is_the_last_index_and_size_counts_it():
    vocab = CharVocabulary()
    assert vocab.blank == len(vocab.symbols) == 28
    assert vocab.size == 29


def test_encode_decode_round_trip_with_hand_indices():
    vocab = CharVocabulary()
    ids = vocab.encode("a b'z")
    assert ids.dtype == torch.int32
    assert ids.tolist() == [2, 0, 3, 1, 27]
    assert vocab.decode(ids) == "a b'z"


def test_decode_drops_blanks_and_rejects_out_of_range():
    vocab = CharVocabulary()
    assert vocab.decode([vocab.blank, 2, vocab.blank, 3]) == "ab"
    with pytest.raises(ValueError, match=r"index 29 must be in \[0, 29\)"):
        vocab.decode([29])


def test_out_of_vocabulary_error_names_the_place_and_characters():
    with pytest.raises(ValueError, match=r"manifest.jsonl:7: text 'Hello, world' has characters \['H', ','\]"):
        CharVocabulary().validate("Hello, world", where="manifest.jsonl:7")


@pytest.mark.parametrize("text", ["", " a", "a ", "a  b"])
def test_whitespace_must_be_normalised(text):
    with pytest.raises(ValueError, match="single spaces"):
        CharVocabulary().validate(text)


def test_repeated_symbols_are_rejected():
    with pytest.raises(ValueError, match="no repeated character"):
        CharVocabulary("abca")


def test_normalize_transcript_lowercases_and_collapses_spaces():
    assert normalize_transcript("  HELLO   WORLD's ") == "hello world's"
