"""A federated synthetic speech corpus: who says what (pure plan) and how it sounds (rendering).

Federated Pruning (Lin et al., Interspeech 2022) trains on LibriSpeech with one speaker per
client. Here each client is one synthetic eSpeak NG speaker, and the plan reproduces the two
kinds of heterogeneity of real federated speech data:

* quantity skew: client sizes follow a Zipf law (``size_skew``), so a few clients hold most data;
* vocabulary skew: each client favours ``topics_per_client`` of the word list's topics, drawing
  a word from them with probability ``topic_focus`` and from the whole list otherwise.

Test sets: ``test_speakers`` are speakers whose (accent, voice variant) pair no training client
uses, saying sentences absent from training; ``test_sentences`` are training speakers saying
sentences absent from training. Every random choice comes from one generator seeded with
``CorpusConfig.seed``, drawn in a fixed order, so a plan is a function of its config.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from fedprune_core.rng import generator_for
from fedprune_core.speech.synth import NOISE_KINDS, Noise, Voice, mix_noise, synthesize
from fedprune_core.speech.utterance import Utterance
from fedprune_core.speech.words import WORD_SETS

ACCENTS: tuple[str, ...] = tuple(
    "en-us en en-gb-scotland en-gb-x-rp en-gb-x-gbclan en-gb-x-gbcwmd en-us-nyc en-029".split()
)
"""eSpeak NG English accents (US, British, Scottish, received pronunciation, Lancaster, West
Midlands, New York City, Caribbean)."""
VARIANTS: tuple[str, ...] = ("",) + tuple(
    "m1 m2 m3 m4 m5 m6 m7 m8 f1 f4 klatt klatt2 klatt3 klatt4 croak Andy Annie david john linda steph "
    "belinda aunty".split()
)
"""eSpeak NG voice variants of the speakers. Variants with a ``breath`` setting (f2, f3, f5, victor,
...) are left out: their breath noise is not reproducible across processes (measured), and the
corpus must be the same bytes for the same seed."""
SPLITS: tuple[str, ...] = ("train", "test_speakers", "test_sentences")


@dataclass(frozen=True)
class CorpusConfig:
    """Size and variety of a synthetic corpus; see the module docstring for the meaning.

    Ranges are closed ``(low, high)`` pairs sampled uniformly per speaker. ``words`` names the
    vocabulary, a key of :data:`~fedprune_core.speech.words.WORD_SETS`; it is left out of the repr
    because the corpus cache is named by the plan's repr (``infra.speech_data.corpus_dir``), where
    every sentence already shows the vocabulary, so corpora made before the field keep their names.
    """

    seed: int = 0
    num_clients: int = 16
    train_utterances: int = 400
    min_client_utterances: int = 2
    size_skew: float = 1.0
    topics_per_client: int = 2
    topic_focus: float = 0.7
    num_test_speakers: int = 4
    test_speaker_utterances: int = 20
    test_sentences: int = 40
    min_words: int = 1
    max_words: int = 12
    pitch_range: tuple[int, int] = (35, 65)
    rate_range: tuple[int, int] = (150, 185)
    snr_db_range: tuple[float, float] = (20.0, 40.0)
    level_dbfs_range: tuple[float, float] = (-30.0, -18.0)
    words: str = field(default="all", repr=False)

    def __post_init__(self) -> None:
        validate_corpus_config(self)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate_corpus_config(c: CorpusConfig) -> None:
    """Raise ``ValueError`` naming the field, the rule and a fix when ``c`` is inconsistent."""
    _check(c.num_clients >= 1, f"num_clients={c.num_clients} must be >= 1")
    _check(
        c.min_client_utterances >= 1,
        f"min_client_utterances={c.min_client_utterances} must be >= 1: a client with no data cannot train",
    )
    _check(
        c.train_utterances >= c.num_clients * c.min_client_utterances,
        f"train_utterances={c.train_utterances} must be >= num_clients * min_client_utterances = "
        f"{c.num_clients * c.min_client_utterances}: raise it or lower min_client_utterances",
    )
    _check(c.size_skew >= 0, f"size_skew={c.size_skew} must be >= 0 (0 gives equal client sizes)")
    _check(c.words in WORD_SETS, f"words={c.words!r} is not a word set: use one of {', '.join(WORD_SETS)}")
    topics = len(WORD_SETS[c.words])
    _check(
        1 <= c.topics_per_client <= topics,
        f"topics_per_client={c.topics_per_client} must be in [1, {topics}] (the topics of words={c.words!r})",
    )
    _check(0 <= c.topic_focus <= 1, f"topic_focus={c.topic_focus} must be in [0, 1] (0 = IID vocabulary)")
    _check(
        min(c.num_test_speakers, c.test_speaker_utterances, c.test_sentences) >= 0,
        "num_test_speakers, test_speaker_utterances and test_sentences must be >= 0",
    )
    _check(
        1 <= c.min_words <= c.max_words,
        f"min_words={c.min_words}, max_words={c.max_words} must satisfy 1 <= min_words <= max_words",
    )
    _check_sentences(c)
    voices = len(ACCENTS) * len(VARIANTS)
    _check(
        c.num_clients + c.num_test_speakers <= voices,
        f"num_clients + num_test_speakers = "
        f"{c.num_clients + c.num_test_speakers} must be <= {voices} distinct (accent, variant) voices",
    )
    for name in ("pitch_range", "rate_range", "snr_db_range", "level_dbfs_range"):
        low, high = getattr(c, name)
        _check(low <= high, f"{name}=({low}, {high}) must have low <= high")
    Voice("en-us", "", c.pitch_range[0], c.rate_range[0])  # range ends must be valid voices
    Voice("en-us", "", c.pitch_range[1], c.rate_range[1])
    _check(c.level_dbfs_range[1] < 0, f"level_dbfs_range={c.level_dbfs_range} must stay below 0 dBFS")


@functools.cache
def vocabulary_words(words: str) -> tuple[str, ...]:
    """Every word of the word set ``words``, topic by topic (for ``"all"``: ``WORDS``, in its order)."""
    return tuple(word for topic in WORD_SETS[words].values() for word in topic)


def _check_sentences(c: CorpusConfig) -> None:
    """Held-out sentences are drawn until unseen ones are found: the vocabulary must hold enough."""
    words = len(vocabulary_words(c.words))
    distinct = sum(words**n for n in range(c.min_words, c.max_words + 1))
    needed = c.train_utterances + c.num_test_speakers * c.test_speaker_utterances + c.test_sentences
    _check(
        distinct >= 2 * needed,
        f"words={c.words!r} ({words} words) with {c.min_words}-{c.max_words} words a sentence gives {distinct} "
        f"distinct sentences, fewer than twice the {needed} utterances planned (held-out sentences must be unseen "
        "in training): raise max_words or plan fewer utterances",
    )


CORPUS_PRESETS: dict[str, CorpusConfig] = {
    # Seconds to render: unit and integration tests.
    "test": CorpusConfig(
        num_clients=4,
        train_utterances=16,
        min_client_utterances=2,
        num_test_speakers=2,
        test_speaker_utterances=3,
        test_sentences=4,
    ),
    # Seconds to render: the spoken digits, 1-5 a sentence (as in TIDIGITS), for the `demo` experiment
    # preset, which learns them in minutes. Held-out speakers say 4 x 25 unseen digit strings.
    "digits": CorpusConfig(
        num_clients=16,
        train_utterances=480,
        min_client_utterances=10,
        topics_per_client=1,
        num_test_speakers=4,
        test_speaker_utterances=25,
        test_sentences=16,
        max_words=5,
        words="digits",
    ),
    # A few minutes to render: the CPU learning benchmark and federated simulations.
    "bench": CorpusConfig(
        num_clients=64,
        train_utterances=12_000,
        min_client_utterances=20,
        num_test_speakers=8,
        test_speaker_utterances=50,
        test_sentences=400,
    ),
}


@dataclass(frozen=True)
class Speaker:
    """A synthetic speaker: how eSpeak NG speaks plus the recording conditions."""

    speaker_id: str
    voice: Voice
    noise: Noise


@dataclass(frozen=True)
class UtterancePlan:
    """What one utterance says and the seed of its background noise."""

    utterance_id: str
    text: str
    noise_seed: int


@dataclass(frozen=True)
class SpeakerPlan:
    """One speaker's utterances: a training client, or a speaker of a test set."""

    speaker: Speaker
    utterances: tuple[UtterancePlan, ...]


@dataclass(frozen=True)
class CorpusPlan:
    """Everything a corpus holds except the audio, grouped by split (see :data:`SPLITS`)."""

    config: CorpusConfig
    splits: dict[str, tuple[SpeakerPlan, ...]]

    @property
    def train(self) -> tuple[SpeakerPlan, ...]:
        """The training clients, one speaker each."""
        return self.splits["train"]


def client_sizes(total: int, num_clients: int, minimum: int, skew: float) -> list[int]:
    """Long-tailed client sizes: ``minimum`` each plus the rest split by Zipf weights ``(i+1)^-skew``.

    Largest remainders round the shares, so the sizes sum to ``total`` exactly and are
    non-increasing.

    Returns:
        ``num_clients`` sizes, largest first.
    """
    weights = torch.arange(1, num_clients + 1, dtype=torch.float64).pow(-skew)
    shares = (total - minimum * num_clients) * weights / weights.sum()
    sizes = shares.floor()
    leftover = int(round(float(shares.sum() - sizes.sum())))
    sizes[torch.argsort(shares - sizes, descending=True, stable=True)[:leftover]] += 1
    return [minimum + int(s) for s in sizes]


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _choice(n: int, generator: torch.Generator) -> int:
    return int(torch.randint(n, (), generator=generator))


def _speaker(speaker_id: str, accent: str, variant: str, c: CorpusConfig, g: torch.Generator) -> Speaker:
    pitch = int(torch.randint(c.pitch_range[0], c.pitch_range[1] + 1, (), generator=g))
    rate = int(torch.randint(c.rate_range[0], c.rate_range[1] + 1, (), generator=g))
    noise = Noise(
        kind=sorted(NOISE_KINDS)[_choice(len(NOISE_KINDS), g)],
        snr_db=round(_uniform(*c.snr_db_range, g), 2),
        level_dbfs=round(_uniform(*c.level_dbfs_range, g), 2),
    )
    return Speaker(speaker_id, Voice(accent, variant, pitch, rate), noise)


def _speakers(c: CorpusConfig, g: torch.Generator) -> list[Speaker]:
    pairs = [(a, v) for a in ACCENTS for v in VARIANTS]
    order = torch.randperm(len(pairs), generator=g)[: c.num_clients + c.num_test_speakers].tolist()
    return [_speaker(f"spk{i:03d}", pairs[j][0], pairs[j][1], c, g) for i, j in enumerate(order)]


def sample_sentence(topic_words: list[tuple[str, ...]], c: CorpusConfig, g: torch.Generator) -> str:
    """A sentence of ``min_words..max_words`` words, each from ``topic_words`` w.p. ``topic_focus``.

    Args:
        topic_words: Word lists of the speaker's favoured topics (empty for an IID sentence).
        c: The corpus configuration.
        g: Random source.
    """
    length = int(torch.randint(c.min_words, c.max_words + 1, (), generator=g))
    words = []
    for _ in range(length):
        focused = bool(topic_words) and float(torch.rand((), generator=g)) < c.topic_focus
        pool = topic_words[_choice(len(topic_words), g)] if focused else vocabulary_words(c.words)
        words.append(pool[_choice(len(pool), g)])
    return " ".join(words)


def _utterances(speaker_id: str, sentences: list[str], g: torch.Generator) -> tuple[UtterancePlan, ...]:
    return tuple(
        UtterancePlan(f"{speaker_id}-{i:05d}", text, int(torch.randint(2**62, (), generator=g)))
        for i, text in enumerate(sentences)
    )


def _unseen_sentences(count: int, seen: set[str], c: CorpusConfig, g: torch.Generator) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        text = sample_sentence([], c, g)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def plan_corpus(c: CorpusConfig) -> CorpusPlan:
    """Decide every speaker, client size and sentence of the corpus described by ``c``.

    Returns:
        The plan; :func:`render_utterance` turns an entry into audio.
    """
    g = generator_for(c.seed, 0, stream="speech-corpus")
    speakers = _speakers(c, g)
    train_speakers, test_speakers = speakers[: c.num_clients], speakers[c.num_clients :]
    sizes = client_sizes(c.train_utterances, c.num_clients, c.min_client_utterances, c.size_skew)
    topics = list(WORD_SETS[c.words].values())
    train = []
    for speaker, size in zip(train_speakers, sizes, strict=True):
        favoured = [topics[i] for i in torch.randperm(len(topics), generator=g)[: c.topics_per_client]]
        sentences = [sample_sentence(favoured, c, g) for _ in range(size)]
        train.append(SpeakerPlan(speaker, _utterances(speaker.speaker_id, sentences, g)))
    seen = {u.text for plan in train for u in plan.utterances}
    by_speakers = [
        SpeakerPlan(s, _utterances(s.speaker_id, _unseen_sentences(c.test_speaker_utterances, seen, c, g), g))
        for s in test_speakers
    ]
    held_out = _unseen_sentences(c.test_sentences, seen, c, g)
    by_sentences = [
        SpeakerPlan(s, _utterances(f"{s.speaker_id}-ts", held_out[i :: len(train_speakers)], g))
        for i, s in enumerate(train_speakers)
        if held_out[i :: len(train_speakers)]
    ]
    splits = {
        "train": tuple(train),
        "test_speakers": tuple(by_speakers),
        "test_sentences": tuple(by_sentences),
    }
    return CorpusPlan(c, splits)


def render_utterance(utterance: UtterancePlan, speaker: Speaker) -> Utterance:
    """Synthesise one planned utterance and mix in its speaker's noise.

    Returns:
        The utterance with ``(N,)`` float32 audio at 16 kHz.
    """
    clean = synthesize(utterance.text, speaker.voice)
    noisy = mix_noise(clean, speaker.noise, torch.Generator().manual_seed(utterance.noise_seed))
    return Utterance(utterance.utterance_id, speaker.speaker_id, utterance.text, noisy)
