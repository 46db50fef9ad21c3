"""Does the speech workload learn? Centralized training of the `small` Conformer-Transducer on CPU.

Trains on the union of all training clients of the synthetic benchmark corpus for a wall-clock
budget, evaluates greedy-decoding WER/CER on held-out speakers (unseen voices) as it goes, and at
the end on held-out speakers and held-out sentences. Writes the curve as CSV and PNG plus a JSON
summary. The budget covers training and the periodic evaluations; the final evaluation comes after.

    .venv/bin/python bench/train_centralized.py --minutes 30

Issue 3 target: WER <= 15% on held-out speakers within 30 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedprune_core.rng import generator_for
from fedprune_core.speech.corpus import CORPUS_PRESETS
from fedprune_core.speech.model import count_parameters
from fedprune_core.speech.utterance import Utterance
from fedprune_core.speech.workload import SpeechWorkload
from fedprune_core.training import LocalTrainingConfig, batch_indices, make_optimizer, optimizer_step
from infra.speech_data import generate_corpus, load_split


@dataclass(frozen=True)
class Point:
    """One evaluation on the learning curve."""

    elapsed_s: float
    step: int
    utterances_seen: int
    lr: float
    train_loss: float
    wer: float
    cer: float
    test_loss: float
    cpu_s: float
    load_1m: float


def lr_at(step: int, elapsed: float, budget: float, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay over the time budget (floor 5% of peak)."""
    return (
        peak
        * min(1.0, (step + 1) / warmup)
        * max(0.05, 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget))))
    )


def _usage(cpu0: float) -> tuple[float, float]:
    """CPU seconds this process used since ``cpu0``, and the machine's 1-minute load average.

    The load average shows how much of the CPU other processes took during the run.
    """
    return time.process_time() - cpu0, os.getloadavg()[0]


def flatten(clients: dict[str, list[Utterance]]) -> list[Utterance]:
    """All utterances of all clients, in client order."""
    return [u for utterances in clients.values() for u in utterances]


def evaluate_subset(
    workload: SpeechWorkload, model: torch.nn.Module, test: list[Utterance], n: int
) -> dict[str, float]:
    """WER/CER/loss on an evenly spaced subset of ``n`` test utterances (every speaker represented)."""
    stride = max(1, len(test) // n)
    return workload.evaluate(model, test[::stride][:n], batch_size=32)


def write_curve(points: list[Point], out: Path) -> None:
    """The curve as ``speech_learning_curve.csv`` and ``.png`` in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "speech_learning_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(points[0])))
        writer.writeheader()
        writer.writerows(asdict(p) for p in points)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    minutes = [p.elapsed_s / 60 for p in points]
    ax1.plot(minutes, [100 * p.wer for p in points], "o-", label="WER")
    ax1.plot(minutes, [100 * p.cer for p in points], "s-", label="CER")
    ax1.axhline(15, color="grey", linestyle="--", label="15% target")
    ax1.set(
        xlabel="training wall time (min)",
        ylabel="% on held-out speakers",
        ylim=(0, 100),
        title="Greedy decoding",
    )
    ax1.legend()
    ax2.plot(minutes, [p.train_loss for p in points], label="train (SpecAugment)")
    ax2.plot(minutes, [p.test_loss for p in points], label="held-out speakers")
    ax2.set(xlabel="training wall time (min)", ylabel="RNN-T loss (nats / char)", yscale="log", title="Loss")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out / "speech_learning_curve.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--minutes", type=float, default=30.0, help="wall-clock budget of training + periodic evals"
    )
    parser.add_argument("--corpus", default="bench", choices=sorted(CORPUS_PRESETS))
    parser.add_argument("--cache-dir", default=".fedprune/speech")
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate")
    parser.add_argument("--warmup", type=int, default=300, help="warm-up steps")
    parser.add_argument("--eval-every", type=float, default=120.0, help="seconds between evaluations")
    parser.add_argument("--eval-utterances", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    root = generate_corpus(CORPUS_PRESETS[args.corpus], args.cache_dir)
    train = flatten(load_split(root, "train"))
    test_speakers = flatten(load_split(root, "test_speakers"))
    test_sentences = flatten(load_split(root, "test_sentences"))
    hours = sum(u.duration_s for u in train) / 3600
    print(
        f"corpus {root}: {len(train)} train utterances ({hours:.2f} h), {len(test_speakers)} held-out-"
        f"speaker and {len(test_sentences)} held-out-sentence utterances; "
        f"ready in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )

    workload = SpeechWorkload(model=args.model)
    model = workload.build_model(seed=args.seed)
    print(f"model {args.model}: {count_parameters(model):,} parameters", flush=True)
    config = LocalTrainingConfig(
        steps=10**9, batch_size=args.batch_size, lr=args.lr, optimizer="adam", max_grad_norm=5.0
    )
    optimizer = make_optimizer(model, config)
    generator = generator_for(args.seed, 0, -1, "centralized")
    budget = args.minutes * 60
    points: list[Point] = []
    losses: list[float] = []
    step, next_eval, start, cpu0 = 0, args.eval_every, time.perf_counter(), time.process_time()
    for indices in batch_indices(len(train), config, generator):
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            break
        lr = lr_at(step, elapsed, budget, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        loss = workload.loss_fn(model, workload.collate([train[i] for i in indices], generator))
        optimizer_step(model, optimizer, loss, config.max_grad_norm)
        losses.append(float(loss.detach()))
        step += 1
        if elapsed >= next_eval:
            next_eval += args.eval_every
            m = evaluate_subset(workload, model, test_speakers, args.eval_utterances)
            recent = sum(losses[-100:]) / len(losses[-100:])
            cpu, load = _usage(cpu0)
            seen = step * args.batch_size
            points.append(Point(elapsed, step, seen, lr, recent, m["wer"], m["cer"], m["loss"], cpu, load))
            print(
                f"{elapsed / 60:5.1f} min  step {step:5d}  lr {lr:.2e}  train loss {recent:.3f}  "
                f"held-out speakers: WER {100 * m['wer']:.1f}%  CER {100 * m['cer']:.1f}%  "
                f"loss {m['loss']:.3f}",
                flush=True,
            )
    elapsed = time.perf_counter() - start
    cpu, load = _usage(cpu0)
    final = {
        "test_speakers": workload.evaluate(model, test_speakers, batch_size=32),
        "test_sentences": workload.evaluate(model, test_sentences, batch_size=32),
    }
    recent = sum(losses[-100:]) / len(losses[-100:])
    ts = final["test_speakers"]
    seen = step * args.batch_size
    points.append(Point(elapsed, step, seen, lr, recent, ts["wer"], ts["cer"], ts["loss"], cpu, load))
    write_curve(points, out)
    summary = {
        "args": vars(args),
        "steps": step,
        "train_seconds": elapsed,
        "train_utterances": len(train),
        "train_hours": hours,
        "parameters": count_parameters(model),
        "final": final,
        "final_eval_seconds": time.perf_counter() - start - elapsed,
    }
    (out / "speech_learning_summary.json").write_text(json.dumps(summary, indent=1))
    torch.save(model.state_dict(), Path(args.cache_dir) / f"{args.model}-centralized.pt")
    for name, m in final.items():
        print(
            f"final {name}: WER {100 * m['wer']:.2f}%  CER {100 * m['cer']:.2f}%  loss {m['loss']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
