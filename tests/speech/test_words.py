import string
from collections import defaultdict

from fedprune_core.speech.synth import phonemes
from fedprune_core.speech.words import TOPICS, WORDS


def test_at_least_500_distinct_lowercase_words():
    assert len(WORDS) >= 500
    assert len(set(WORDS)) == len(WORDS)
    assert all(set(w) <= set(string.ascii_lowercase) for w in WORDS)
    assert sum(len(t) for t in TOPICS.values()) == len(WORDS)


def test_no_two_words_share_a_pronunciation():
    by_sound = defaultdict(list)
    for word in WORDS:
        by_sound[phonemes(word)].append(word)
    assert [ws for ws in by_sound.values() if len(ws) > 1] == []
