"""Where a client's training step goes: the dense and the 50% column-pruned `small` client's step
split into its parts, each timed forward and backward, side by side.

`bench_client.py` times whole training steps; this splits one step of the same two clients
(`bench_client.variants`: uniform column masks of the initial model) on the same batch
(`bench_client.synthetic_batch`, or one client's batch of a rendered corpus with ``--corpus``):

- **features**: log-mel features and SpecAugment of the batch (`SpeechWorkload.collate`);
- **subsampling**: the two Conv2d + ReLU layers and their Linear, forward and backward;
- **conformer**: the Conformer blocks on the subsampling's output;
- **output**: the encoder's output Linear to the joint;
- **predictor**: the prediction network (embedding, LSTM, Linear, norm) on the targets;
- **loss**: the joint network and the transducer loss from the encoder's and the predictor's
  outputs (`SpeechWorkload.loss_fn` with both held fixed);
- **step**: features, forward and backward of the whole model (no optimizer step, no memory meter).

Printed: CPU ms per part (median over interleaved repetitions, the order shuffled with a fixed
seed) and pruned / dense.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_parts.py [--corpus DIR] [--reps 20]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import cast
from unittest import mock

import torch
from bench_client import corpus_batch, synthetic_batch, variants
from bench_layout import interleaved_ms
from torch import nn

from fedprune_core.speech.model import ConformerTransducer
from fedprune_core.speech.utterance import Utterance
from fedprune_core.speech.workload import SpeechWorkload
from fedprune_core.submodel import build_client_model
from fedprune_core.training import reuse_freed_heap

PARTS = ("features", "subsampling", "conformer", "output", "predictor", "loss", "step")


def parts(workload: SpeechWorkload, model: ConformerTransducer, utterances: list[Utterance]
          ) -> dict[str, Callable[[], object]]:
    """Each part of `model`'s training step on `utterances`, as a function that runs it forward and
    backward once."""
    generator = torch.Generator().manual_seed(0)
    batch = workload.collate(utterances, generator=generator)
    blank_first = nn.functional.pad(batch.targets, (1, 0), value=workload.vocabulary.blank)
    encoder = model.transcriber
    with torch.no_grad():
        subsampled, lengths = encoder.subsampling(batch.features, batch.feature_lengths)
        conformed, _ = encoder.conformer(subsampled, lengths)
        encodings, frames = model.transcribe(batch.features, batch.feature_lengths)
        predictions, _, _ = model.predict(blank_first, batch.target_lengths + 1, None)

    def backward(out: torch.Tensor) -> None:
        out.sum().backward()

    def conformer() -> None:
        backward(encoder.conformer(subsampled.clone().requires_grad_(), lengths)[0])

    def loss() -> None:
        held = encodings.clone().requires_grad_(), predictions.clone().requires_grad_()
        with (mock.patch.object(model, "transcribe", lambda *_: (held[0], frames)),
              mock.patch.object(model, "predict", lambda *_: (held[1], None, None))):
            workload.loss_fn(model, batch).backward()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        workload.loss_fn(model, workload.collate(utterances, generator=generator)).backward()

    return {
        "features": lambda: workload.collate(utterances, generator=generator),
        "subsampling": lambda: backward(encoder.subsampling(batch.features, batch.feature_lengths)[0]),
        "conformer": conformer,
        "output": lambda: backward(encoder.output(conformed.clone().requires_grad_())),
        "predictor": lambda: backward(model.predict(blank_first, batch.target_lengths + 1, None)[0]),
        "loss": loss,
        "step": step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, help="one client's batch of this rendered corpus instead of the "
                        "synthetic 2.5 s batch (as bench_client.py --corpus)")
    parser.add_argument("--reps", type=int, default=20, help="interleaved repetitions of every part")
    args = parser.parse_args()
    torch.set_num_threads(1)
    reuse_freed_heap()  # as train_local does
    workload = SpeechWorkload("small")
    utterances = (corpus_batch(args.corpus, 16, seed=0) if args.corpus
                  else synthetic_batch(workload, 16, 2.5, seed=0))
    models = {v.name: cast(ConformerTransducer, build_client_model(workload.build_model(), v.payload, v.specs).module)
              for v in variants("small", 0.5)}
    cases = {f"{name}/{part}": fn for name, model in models.items()
             for part, fn in parts(workload, model, utterances).items()}
    ms = interleaved_ms(cases, args.reps)
    print(f"small, batch 16 ({'a client batch of ' + str(args.corpus) if args.corpus else '2.5 s synthetic'}), "
          f"forward and backward, CPU ms (median of {args.reps} interleaved repetitions)")
    print("| part | dense ms | pruned ms | pruned / dense |\n|---|---|---|---|")
    for part in PARTS:
        dense, pruned = ms[f"dense/{part}"], ms[f"pruned/{part}"]
        print(f"| {part} | {dense:.2f} | {pruned:.2f} | {pruned / dense:.3f} |")


if __name__ == "__main__":
    main()
