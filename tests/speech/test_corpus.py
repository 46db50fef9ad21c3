from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedprune_core.speech.corpus import (
    CORPUS_PRESETS,
    CorpusConfig,
    client_sizes,
    plan_corpus,
    render_utterance,
    vocabulary_words,
)
from fedprune_core.speech.words import DIGITS, TOPICS, WORDS

CONFIG = CorpusConfig(
    num_clients=12,
    train_utterances=600,
    min_client_utterances=5,
    num_test_speakers=3,
    test_speaker_utterances=10,
    test_sentences=30,
)


def test_same_config_same_plan_other_seed_other_plan():
    assert plan_corpus(CONFIG) == plan_corpus(CONFIG)
    other = plan_corpus(CorpusConfig(**{**CONFIG.__dict__, "seed": 1}))
    assert other != plan_corpus(CONFIG)


def test_rendering_is_deterministic():
    plan = plan_corpus(CORPUS_PRESETS["test"])
    speaker_plan = plan.train[0]
    a = render_utterance(speaker_plan.utterances[0], speaker_plan.speaker)
    b = render_utterance(speaker_plan.utterances[0], speaker_plan.speaker)
    assert a.audio.equal(b.audio)
    assert a.text == speaker_plan.utterances[0].text
    assert a.speaker_id == speaker_plan.speaker.speaker_id


def test_client_sizes_hand_example():
    # 10 left over after the minimum 1 each; Zipf weights 1, 1/2, 1/3 -> shares 5.45, 2.73, 1.82
    assert client_sizes(13, 3, 1, 1.0) == [1 + 5, 1 + 3, 1 + 2]
    assert client_sizes(12, 4, 3, 0.0) == [3, 3, 3, 3]


@given(
    total_extra=st.integers(0, 5000),
    clients=st.integers(1, 60),
    minimum=st.integers(1, 20),
    skew=st.floats(0, 3),
)
def test_client_sizes_sum_exactly_are_long_tailed_and_respect_the_minimum(total_extra, clients, minimum, skew):
    sizes = client_sizes(clients * minimum + total_extra, clients, minimum, skew)
    assert sum(sizes) == clients * minimum + total_extra
    assert min(sizes) >= minimum
    assert sizes == sorted(sizes, reverse=True)


def test_partition_properties():
    plan = plan_corpus(CONFIG)
    train = plan.train
    assert len(train) == CONFIG.num_clients
    sizes = [len(p.utterances) for p in train]
    assert sum(sizes) == CONFIG.train_utterances and min(sizes) >= CONFIG.min_client_utterances
    assert sizes[0] > 4 * sizes[-1]  # long tail
    ids = [u.utterance_id for plans in plan.splits.values() for p in plans for u in p.utterances]
    assert len(ids) == len(set(ids))
    words = set(WORDS)
    for plans in plan.splits.values():
        for p in plans:
            for u in p.utterances:
                n = len(u.text.split())
                assert CONFIG.min_words <= n <= CONFIG.max_words
                assert set(u.text.split()) <= words


def test_test_speakers_are_unseen_voices_and_test_sentences_unseen_texts():
    plan = plan_corpus(CONFIG)
    train_voices = {(p.speaker.voice.accent, p.speaker.voice.variant) for p in plan.train}
    test_voices = {(p.speaker.voice.accent, p.speaker.voice.variant) for p in plan.splits["test_speakers"]}
    assert len(test_voices) == CONFIG.num_test_speakers and not test_voices & train_voices
    train_texts = {u.text for p in plan.train for u in p.utterances}
    for split in ("test_speakers", "test_sentences"):
        assert not {u.text for p in plan.splits[split] for u in p.utterances} & train_texts
    sentences = [u for p in plan.splits["test_sentences"] for u in p.utterances]
    assert len(sentences) == CONFIG.test_sentences
    train_ids = {p.speaker.speaker_id for p in plan.train}
    assert {p.speaker.speaker_id for p in plan.splits["test_sentences"]} <= train_ids
    assert len({p.speaker for p in plan.train}) == CONFIG.num_clients


def test_vocabulary_is_non_iid_across_clients():
    plan = plan_corpus(CONFIG)
    topic_of = {w: t for t, ws in TOPICS.items() for w in ws}
    top_topics = []
    for p in plan.train[:6]:
        counts = Counter(topic_of[w] for u in p.utterances for w in u.text.split())
        share = sum(c for _, c in counts.most_common(CONFIG.topics_per_client)) / sum(counts.values())
        assert share > 0.6  # IID would give about 2/11 of the words to any two topics
        top_topics.append(frozenset(t for t, _ in counts.most_common(CONFIG.topics_per_client)))
    assert len(set(top_topics)) > 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"min_client_utterances": 0}, "a client with no data"),
        ({"train_utterances": 10}, "must be >= num_clients"),
        ({"min_words": 0}, "1 <= min_words"),
        ({"max_words": 0}, "1 <= min_words"),
        ({"topic_focus": 1.5}, r"\[0, 1\]"),
        ({"pitch_range": (60, 40)}, "low <= high"),
        ({"num_clients": 190, "min_client_utterances": 1}, "distinct"),
        ({"words": "colours"}, "words='colours' is not a word set"),
        ({"words": "digits"}, r"topics_per_client=2 must be in \[1, 1\]"),
        # 10 + 100 distinct digit strings of 1-2 words; 660 planned utterances need more to leave some unseen
        ({"words": "digits", "topics_per_client": 1, "max_words": 2}, "110 distinct sentences"),
    ],
)
def test_invalid_configs_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        CorpusConfig(**{**CONFIG.__dict__, **change})


def test_presets_are_valid_and_meet_the_issue_minimums():
    for config in CORPUS_PRESETS.values():
        if config.words == "all":  # the sentence corpora; `digits` says digit strings
            assert config.min_words == 1 and config.max_words == 12
    assert len(WORDS) >= 500


def test_the_all_word_set_is_the_word_list_and_leaves_older_cache_names_alone():
    assert vocabulary_words("all") == WORDS
    assert vocabulary_words("digits") == DIGITS
    assert ", words=" not in repr(CONFIG)  # the cache is named by the plan's repr (infra.speech_data.corpus_dir)


def test_the_digits_corpus_says_every_digit_and_its_held_out_speakers_say_unseen_strings():
    config = CORPUS_PRESETS["digits"]
    plan = plan_corpus(config)
    said = [u.text.split() for plans in plan.splits.values() for p in plans for u in p.utterances]
    assert {w for words in said for w in words} == set(DIGITS)
    assert {len(words) for words in said} == set(range(1, config.max_words + 1))
    held_out = [u.text for p in plan.splits["test_speakers"] for u in p.utterances]
    assert len(held_out) == config.num_test_speakers * config.test_speaker_utterances
    assert not set(held_out) & {u.text for p in plan.train for u in p.utterances}
