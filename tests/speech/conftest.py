import pytest
import torch

from fedprune_core.speech.utterance import Utterance


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Speech tests run small ops; on a busy 2-core machine two intra-op threads made them 10x slower
    (measured), so each test runs single-threaded and the setting is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def noise_utterances() -> list[Utterance]:
    """Three utterances of noise audio with short transcripts: for tests of arithmetic, not content."""
    g = torch.Generator().manual_seed(0)
    texts = ["a cat", "the dog sat", "one"]
    return [Utterance(f"u{i}", "spk", texts[i], 0.05 * torch.randn(8000 + 1600 * i, generator=g)) for i in range(3)]
