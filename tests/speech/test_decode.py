import torch

from fedprune_core.speech.decode import beam_decode, greedy_decode
from fedprune_core.speech.model import build_model

BLANK = 28


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    features = torch.randn(3, 40, 80, generator=torch.Generator().manual_seed(0))
    return features, torch.tensor([40, 25, 33])


def test_batched_greedy_equals_one_utterance_at_a_time():
    # Equal lengths: the encoder's convolutions see padding differently in a batch, and this test
    # is about the search, whose utterances emit different numbers of symbols at each frame.
    model = build_model("tiny", seed=3).eval()
    features, lengths = _inputs()[0], torch.tensor([40, 40, 40])
    batched = greedy_decode(model, features, lengths, BLANK)
    single = [
        greedy_decode(model, features[i : i + 1, : int(n)], lengths[i : i + 1], BLANK)[0] for i, n in enumerate(lengths)
    ]
    assert batched == single
    assert all(BLANK not in hyp for hyp in batched)


def test_greedy_emits_at_most_the_cap_per_frame():
    model = build_model("tiny", seed=3).eval()
    with torch.no_grad():  # make every symbol but blank win: the cap is what stops emission
        model.joiner.linear.bias.fill_(0.0)
        model.joiner.linear.bias[BLANK] = -100.0
        model.joiner.linear.bias[5] = 100.0
    features, lengths = _inputs()
    hyps = greedy_decode(model, features, lengths, BLANK, max_symbols_per_frame=2)
    frames = ((lengths + 1) // 2 + 1) // 2
    assert [len(h) for h in hyps] == (2 * frames).tolist()
    assert all(set(h) == {5} for h in hyps)


def test_beam_search_returns_symbol_lists_without_blank():
    model = build_model("tiny", seed=3).eval()
    features, lengths = _inputs()
    hyps = beam_decode(model, features[:2], lengths[:2], BLANK, beam_width=2)
    assert len(hyps) == 2
    assert all(isinstance(t, int) and 0 <= t < BLANK for h in hyps for t in h)
