"""The 64-round fine-tune of dense FedAvg and FP@0.5 (issue 6's accuracy target), read from MLflow.

The runs (sparsify rounds 1-8, refine 9-16, fine-tune to 64, WER every 8 rounds; configurations in
docs/results/longer-finetune/), one `fedprune run` each, two at a time on 2 cores:

    for seed in 0 1 2 3 4; do for f in dense fp-s50; do
      OMP_NUM_THREADS=1 .venv/bin/fedprune run --preset small --experiment paper2 \\
          --run-id paper2-long64-$f$([ $seed = 0 ] || echo -seed$seed) \\
          --config docs/results/longer-finetune/$f.json --set seed=$seed &
    done; wait; done

The same for other pairs of runs named PREFIX + dense / FP kind (+ -seedN), e.g. the pair at half
the client parameters (docs/results/client-size/):

    .venv/bin/python bench/report_long_finetune.py --experiment paper --prefix paper-ch128- \\
        --fp fp-chgroups --fp-label "FP@0.38, channel groups (half the client parameters)" --seeds 8,5,1 \\
        --out docs/results/client-size/channel_groups_128.png

This script prints each seed's WER at every evaluation, the mean of the last two evaluations (the
sweep's measure) and of the last four, FP@0.5 / dense per seed and over the seeds' means (with a
95% paired bootstrap interval over the seeds: with 5-10 seeds, a rough one), and
writes the WER-over-rounds plot of all seeds to --out (default
FEDPRUNE_HOME/results/<prefix without its trailing ->/wer_over_rounds.png; pass a path under docs/results/
to update a curated plot).

    .venv/bin/python bench/report_long_finetune.py
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from mlflow.tracking import MlflowClient

from infra.results import collect
from infra.settings import Settings

TARGET = 1.10
"""Issue 6: FP@0.5 (column, adaptive, refined) WER within 1.10x of dense."""


BOOTSTRAP_RESAMPLES = 10_000


def bootstrap_interval(dense: list[float], fp: list[float], level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of mean(fp) / mean(dense) over seeds resampled with replacement, pairs kept
    together (a seed's dense and FP runs share their client sampling); seeded, so it reprints the same."""
    rng = random.Random(0)
    n = len(dense)
    ratios = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        picks = [rng.randrange(n) for _ in range(n)]
        ratios.append(sum(fp[i] for i in picks) / sum(dense[i] for i in picks))
    ratios.sort()
    tail = (1 - level) / 2
    return ratios[int(tail * len(ratios))], ratios[int((1 - tail) * len(ratios)) - 1]


def run_id(prefix: str, kind: str, seed: int, seed0_suffix: bool = False) -> str:
    return f"{prefix}{kind}" + ("" if seed == 0 and not seed0_suffix else f"-seed{seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="paper2")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--out", type=Path,
                        help="the plot (default: FEDPRUNE_HOME/results/<prefix without its trailing ->/"
                             "wer_over_rounds.png)")
    parser.add_argument("--prefix", default="paper2-long64-", help="run ids: PREFIX + dense / --fp, + -seedN")
    parser.add_argument("--fp", default="fp-s50", help="the FP run's kind in its run id")
    parser.add_argument("--fp-label", default="FP@0.5 column, adaptive, refined")
    parser.add_argument("--until", type=int, help="read only the evaluations up to this round (the plot shows all)")
    parser.add_argument("--seed0-suffix", action="store_true", help="seed 0's run ids end in -seed0 too")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    fp_kind = args.fp
    runs = [(run_id(args.prefix, k, s, args.seed0_suffix), k, (), s) for s in seeds for k in ("dense", fp_kind)]
    found = {(r.label, r.seed): r for r in collect(MlflowClient(Settings().tracking_uri), args.experiment, runs)}

    means: dict[int, dict[str, list[float]]] = {k: {"dense": [], fp_kind: []} for k in (2, 4)}
    print("| seed | run | WER % at each evaluation | mean of last 2 | mean of last 4 |")
    print("|---|---|---|---|---|")
    for seed in seeds:
        for kind in ("dense", fp_kind):
            wers = [100 * v for r, v in found[kind, seed].history["eval_wer"] if args.until is None or r <= args.until]
            for k in means:
                means[k][kind].append(statistics.fmean(wers[-k:]))
            print(f"| {seed} | {kind} | {', '.join(f'{w:.1f}' for w in wers)} | {means[2][kind][-1]:.2f} | "
                  f"{means[4][kind][-1]:.2f} |")
    for k in means:
        dense, fp = means[k]["dense"], means[k][fp_kind]
        ratios = [f / d for d, f in zip(dense, fp, strict=True)]
        per_seed = ", ".join(f"{r:.3f}" for r in ratios)
        ratio = statistics.fmean(fp) / statistics.fmean(dense)
        interval = ""
        if len(ratios) > 1:
            per_seed += f" (mean {statistics.fmean(ratios):.3f} ± {statistics.stdev(ratios):.3f})"
            low, high = bootstrap_interval(dense, fp)
            interval = f", 95% bootstrap interval over seeds {low:.3f}-{high:.3f}"
        spread = (f" ± {statistics.stdev(dense):.2f}", f" ± {statistics.stdev(fp):.2f}") if len(seeds) > 1 else ("", "")
        print(f"last {k}: dense {statistics.fmean(dense):.2f}{spread[0]}, "
              f"{fp_kind} {statistics.fmean(fp):.2f}{spread[1]}; "
              f"{fp_kind} / dense per seed {per_seed}; over the seeds' means {ratio:.3f}{interval} "
              f"({'met' if ratio <= TARGET else 'missed'}: target <= {TARGET})")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind, color, label in (("dense", "C0", "dense FedAvg"), (fp_kind, "C3", args.fp_label)):
        curves = [found[kind, seed].history["eval_wer"] for seed in seeds]
        for points in curves:
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], "-", color=color, alpha=0.25, lw=0.8)
        rounds = [p[0] for p in curves[0]]
        mean = [statistics.fmean(100 * c[i][1] for c in curves) for i in range(len(rounds))]
        print(f"{kind}, mean over the seeds at rounds {', '.join(map(str, rounds))}: "
              f"{', '.join(f'{m:.1f}' for m in mean)}")
        ax.plot(rounds, mean, "-", marker="o", color=color, lw=2,
                label=f"{label}: mean of {len(seeds)} seeds (thin: each seed)")
    ax.axvspan(0, 8, alpha=0.08, color="k")
    ax.axvspan(8, 16, alpha=0.04, color="k")
    last = found["dense", seeds[0]].history["eval_wer"][-1][0]
    ax.set_title(f"{last} rounds after the warm-up: sparsify 1-8, refine 9-16 (shaded), fine-tune 17-{last}",
                 fontsize=9)
    ax.set_xlabel("round (after the warm-up)")
    ax.set_ylabel("WER % (held-out speakers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out = args.out or Settings().home / "results" / args.prefix.rstrip("-") / "wer_over_rounds.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
