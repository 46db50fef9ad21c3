import pytest

from fedprune_core.speech.metrics import char_error_rate, word_error_rate


def test_wer_counts_substitution_deletion_insertion_over_reference_words():
    # "the cat sat" -> "the bat": 1 substitution + 1 deletion over 3 words
    assert word_error_rate(["the cat sat"], ["the bat"]) == pytest.approx(2 / 3)
    # one insertion over 2 words
    assert word_error_rate(["red fox"], ["red big fox"]) == pytest.approx(1 / 2)


def test_wer_is_corpus_level_not_mean_of_utterances():
    # 1 error in a 1-word reference, 0 errors in a 3-word one: 1 / 4, not mean(1, 0) = 0.5
    assert word_error_rate(["dog", "a b c"], ["cat", "a b c"]) == pytest.approx(0.25)


def test_cer_counts_characters_including_spaces():
    # "ab cd" (5 chars) -> "ab ce": 1 substitution
    assert char_error_rate(["ab cd"], ["ab ce"]) == pytest.approx(1 / 5)
    # empty hypothesis deletes everything
    assert char_error_rate(["abc"], [""]) == pytest.approx(1.0)
    assert word_error_rate(["a b"], [""]) == pytest.approx(1.0)


def test_perfect_hypotheses_score_zero():
    refs = ["one two", "three"]
    assert word_error_rate(refs, refs) == 0.0
    assert char_error_rate(refs, refs) == 0.0


def test_mismatched_or_empty_inputs_are_rejected():
    with pytest.raises(ValueError, match="pair up"):
        word_error_rate(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="non-empty"):
        char_error_rate([""], ["a"])
