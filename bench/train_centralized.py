"""Does the speech workload learn? Centralized training of the `small` Conformer-Transducer on CPU.

Trains on the union of all training clients of the synthetic benchmark corpus for a budget of
training wall time, evaluates greedy-decoding WER/CER on held-out speakers (unseen voices) as it
goes, and at the end on held-out speakers and held-out sentences. Writes the curve as CSV and PNG
plus a JSON summary into --out (default FEDPRUNE_HOME/results/centralized; `--out docs` updates the
curated files docs/speech.md shows). The training clock stops while the periodic evaluations run
(they measure, they do not train); the CSV has both training time and total wall time.

Batches hold utterances of similar length (pools of 50 batches sorted by length, then batches
shuffled), which cuts the encoder's padding; the federated path (`train_local`) samples uniformly.

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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedprune_core.rng import generator_for
from fedprune_core.speech.corpus import CORPUS_PRESETS
from fedprune_core.speech.model import count_parameters
from fedprune_core.speech.utterance import Utterance
from fedprune_core.speech.workload import SpeechWorkload
from fedprune_core.training import LocalTrainingConfig, make_optimizer, optimizer_step
from infra.settings import Settings
from infra.speech_data import generate_corpus, load_split


@dataclass(frozen=True)
class Point:
    """One evaluation on the learning curve."""

    train_s: float
    wall_s: float
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
    return peak * min(1.0, (step + 1) / warmup) * max(0.05, 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget))))


def _usage(cpu0: float) -> tuple[float, float]:
    """CPU seconds this process used since ``cpu0``, and the machine's 1-minute load average.

    The load average shows how much of the CPU other processes took during the run.
    """
    return time.process_time() - cpu0, os.getloadavg()[0]


def length_bucketed_batches(
    lengths: list[int], batch_size: int, generator: torch.Generator, pool: int = 50
) -> Iterator[list[int]]:
    """Endless batches of indices of similar ``lengths``, all order drawn from ``generator``.

    Each pass shuffles the examples, sorts each pool of ``pool * batch_size`` of them by length,
    cuts the pools into batches and yields the batches in random order.
    """
    while True:
        order = torch.randperm(len(lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), pool * batch_size):
            chunk = sorted(order[start : start + pool * batch_size], key=lambda i: lengths[i])
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        for j in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[j]


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
    minutes = [p.train_s / 60 for p in points]
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


def parse_args() -> argparse.Namespace:
    """Command-line options; the defaults are the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="budget of training wall time")
    parser.add_argument("--corpus", default="bench", choices=sorted(CORPUS_PRESETS))
    parser.add_argument("--cache-dir", default=".fedprune/data", help="corpus cache (shared with the CLI)")
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate")
    parser.add_argument("--warmup", type=int, default=300, help="warm-up steps")
    parser.add_argument("--eval-every", type=float, default=180.0, help="training seconds between evaluations")
    parser.add_argument("--eval-utterances", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (2 was 10x slower on a busy VM)")
    parser.add_argument("--out", type=Path, help="curve and summary (default: FEDPRUNE_HOME/results/centralized)")
    return parser.parse_args()


def load_corpus(args: argparse.Namespace) -> tuple[list[Utterance], list[Utterance], list[Utterance]]:
    """Train, held-out-speaker and held-out-sentence utterances (the corpus is generated on first use)."""
    t0 = time.perf_counter()
    root = generate_corpus(CORPUS_PRESETS[args.corpus], args.cache_dir)
    splits = [flatten(load_split(root, split)) for split in ("train", "test_speakers", "test_sentences")]
    hours = sum(u.duration_s for u in splits[0]) / 3600
    print(
        f"corpus {root}: {len(splits[0])} train utterances ({hours:.2f} h), {len(splits[1])} held-out-"
        f"speaker and {len(splits[2])} held-out-sentence utterances; "
        f"ready in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    return splits[0], splits[1], splits[2]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Settings().home / "results" / "centralized"
    out.mkdir(parents=True, exist_ok=True)
    train, test_speakers, test_sentences = load_corpus(args)
    workload = SpeechWorkload(model=args.model)
    model = workload.build_model(seed=args.seed)
    print(f"model {args.model}: {count_parameters(model):,} parameters", flush=True)
    config = LocalTrainingConfig(steps=1, batch_size=args.batch_size, lr=args.lr, optimizer="adam", max_grad_norm=5.0)
    optimizer = make_optimizer(model, config)
    generator = generator_for(args.seed, 0, -1, "centralized")
    batches = length_bucketed_batches([u.audio.numel() for u in train], args.batch_size, generator)
    budget, points, losses = args.minutes * 60, list[Point](), list[float]()
    step, eval_s, next_eval, start, cpu0 = 0, 0.0, args.eval_every, time.perf_counter(), time.process_time()
    lr = 0.0

    def record(metrics: dict[str, float], wall_now: float) -> None:
        recent = sum(losses[-100:]) / len(losses[-100:])
        cpu, load = _usage(cpu0)
        trained, wall = wall_now - start - eval_s, wall_now - start
        seen = step * args.batch_size
        points.append(
            Point(
                trained,
                wall,
                step,
                seen,
                lr,
                recent,
                metrics["wer"],
                metrics["cer"],
                metrics["loss"],
                cpu,
                load,
            )
        )
        print(
            f"{trained / 60:5.1f} min trained ({wall / 60:5.1f} wall)  step {step:5d}  lr {lr:.2e}  "
            f"train loss {recent:.3f}  held-out speakers: WER {100 * metrics['wer']:.1f}%  "
            f"CER {100 * metrics['cer']:.1f}%  loss {metrics['loss']:.3f}  load {load:.1f}",
            flush=True,
        )

    while (trained := time.perf_counter() - start - eval_s) < budget:
        lr = lr_at(step, trained, budget, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        loss = workload.loss_fn(model, workload.collate([train[i] for i in next(batches)], generator))
        optimizer_step(model, optimizer, loss, config.max_grad_norm)
        losses.append(float(loss.detach()))
        step += 1
        if trained >= next_eval:
            next_eval += args.eval_every
            wall_now = time.perf_counter()
            metrics = evaluate_subset(workload, model, test_speakers, args.eval_utterances)
            record(metrics, wall_now)
            eval_s += time.perf_counter() - wall_now
    wall_now = time.perf_counter()
    final = {
        "test_speakers": workload.evaluate(model, test_speakers, batch_size=32),
        "test_sentences": workload.evaluate(model, test_sentences, batch_size=32),
    }
    record(final["test_speakers"], wall_now)
    write_curve(points, out)
    summary = {
        "args": vars(args),
        "steps": step,
        "train_seconds": points[-1].train_s,
        "wall_seconds_before_final_eval": points[-1].wall_s,
        "final_eval_seconds": time.perf_counter() - wall_now,
        "train_utterances": len(train),
        "train_hours": sum(u.duration_s for u in train) / 3600,
        "parameters": count_parameters(model),
        "final": final,
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
