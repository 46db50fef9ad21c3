"""Communication of Federated Pruning: bytes down and up per client and round, against dense.

For the speech Conformer-Transducer (Lin et al., Interspeech 2022; `build_model("small")` by
default, `tiny` for a quick run) and each pattern x sparsity, builds one-shot uniform masks with
`FedPrune` (weight scores, L2) on the initial weights, then measures the real payloads with
`payload_nbytes`: down = `extract(weights, masks, specs)`, up = `client_update` of the client
model `build_client_model` sets up from that payload (untrained: training changes values, not
sizes). Dense reference: the whole model's payload, every parameter as a float32 tensor.

Limits (issue 6), over the pruned parameters' bytes P (float32, 4 bytes an entry):
- structured patterns, down and up: (1 - s) P; target: within 2% of it.
- unstructured, down: (1 - s) P plus one bit per pruned-parameter entry (the mask); up: (1 - s) P,
  since a client uploads values only (the server knows the mask it sent).
"model" columns add the unpruned parameters' bytes U to both sides: bytes / (limit + U).

Prunable: every weight of rank >= 2 that all five patterns can prune (half patterns need an even
number of rows or columns), so every row prunes the same parameters; the run prints which are
left out and the pruned fraction of the model.

    .venv/bin/python bench/bench_communication.py                  # small, all patterns, s 0.3 0.5 0.7
    .venv/bin/python bench/bench_communication.py --model tiny

Pure computation, no training; the table is a printed figure, not a test.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass

from fedprune_core.budgets import one_shot_masks as fp_one_shot_masks
from fedprune_core.config import PruningConfig
from fedprune_core.masks import PATTERNS
from fedprune_core.prunable import PrunableSpec, every_pattern_weights, find_prunable
from fedprune_core.speech.model import build_model
from fedprune_core.submodel import SEP, build_client_model, client_update, extract, payload_nbytes
from fedprune_core.types import MaskDict, Payload, StateDict

TOLERANCE = 0.02
"""Issue 6: structured payloads within 2% of (1 - s) of dense."""


@dataclass(frozen=True)
class Row:
    """Bytes of one pattern at one sparsity.

    Attributes:
        down, up: whole payloads.
        down_pruned, up_pruned: the pruned parameters' part of them (values, indices, bit masks).
        down_index: the indices and bit masks in `down_pruned` (the rest are kept values).
        limit_down, limit_up: the limits over the pruned parameters (see the module docstring).
        realized: fraction of pruned-parameter entries the masks prune.
    """

    pattern: str
    sparsity: float
    realized: float
    down: int
    up: int
    down_pruned: int
    up_pruned: int
    down_index: int
    limit_down: float
    limit_up: float


def one_shot_masks(weights: StateDict, specs: dict[str, PrunableSpec], pattern: str, sparsity: float,
                   prunable: tuple[str, ...]) -> MaskDict:
    """Masks at `sparsity` in every prunable layer, from weight-magnitude scores."""
    pruning = PruningConfig(sparsity=sparsity, pattern=pattern, allocation="uniform", prunable=prunable)
    return fp_one_shot_masks(pruning, specs, weights)


def pruned_nbytes(payload: Payload, index_only: bool = False) -> int:
    """Bytes of the compact entries (`name|...`) of a payload; only the non-float ones (indices,
    bit masks) with `index_only`."""
    return payload_nbytes(
        {k: t for k, t in payload.items() if SEP in k and not (index_only and t.is_floating_point())}
    )


def measure(
    model_name: str, weights: StateDict, prunable: tuple[str, ...], pattern: str, sparsity: float
) -> Row:
    specs = find_prunable(build_model(model_name), prunable, pattern)
    masks = one_shot_masks(weights, specs, pattern, sparsity, prunable)
    down = extract(weights, masks, specs)
    up = client_update(build_client_model(build_model(model_name), down, specs), specs)
    numel = sum(s.numel for s in specs.values())
    dense_pruned = sum(weights[n].numel() * weights[n].element_size() for n in specs)
    kept_values = (1 - sparsity) * dense_pruned
    mask_bits = sum((s.numel + 7) // 8 for s in specs.values()) if pattern == "unstructured" else 0
    realized = sum(int((~m).sum()) for m in masks.values()) / numel
    return Row(pattern, sparsity, realized, payload_nbytes(down), payload_nbytes(up), pruned_nbytes(down),
               pruned_nbytes(up), pruned_nbytes(down, index_only=True), kept_values + mask_bits, kept_values)


def print_table(rows: list[Row], dense: int, unpruned: int) -> None:
    print("| pattern | s | realized s | down MB | up MB | down / dense | up / dense | down / limit (pruned) "
          "| of which indices or bit mask | up / limit (pruned) | down / limit (model) | up / limit (model) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.pattern} | {r.sparsity} | {r.realized:.4f} | {r.down / 1e6:.3f} | {r.up / 1e6:.3f} "
              f"| {r.down / dense:.4f} | {r.up / dense:.4f} | {r.down_pruned / r.limit_down:.4f} "
              f"| {r.down_index / r.limit_down:.4f} | {r.up_pruned / r.limit_up:.4f} "
              f"| {r.down / (r.limit_down + unpruned):.4f} "
              f"| {r.up / (r.limit_up + unpruned):.4f} |", flush=True)


def verdicts(rows: list[Row]) -> list[str]:
    """Per pattern, the worst payload / limit over the pruned parameters and whether it is in target."""
    lines = []
    for pattern in dict.fromkeys(r.pattern for r in rows):
        mine = [r for r in rows if r.pattern == pattern]
        worst = max(max(r.down_pruned / r.limit_down, r.up_pruned / r.limit_up) for r in mine)
        met = "met" if worst <= 1 + TOLERANCE else "missed"
        lines.append(f"{pattern}: worst payload / limit {worst:.4f} ({met}: target <= {1 + TOLERANCE})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="small", choices=["tiny", "small", "paper"])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    args = parser.parse_args()

    model = build_model(args.model)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    prunable = every_pattern_weights(model)
    dense = payload_nbytes(extract(weights, {}, {}))
    pruned_bytes = sum(weights[n].numel() * weights[n].element_size() for n in prunable)
    # one entry per layer kind: block indices collapsed, with a count
    left_out = Counter(re.sub(r"_layers\.\d+\.", "_layers.*.", f"{n} {tuple(w.shape)}")
                       for n, w in weights.items() if w.dim() >= 2 and n not in prunable)
    numel = sum(w.numel() for w in weights.values())
    print(f"model: Conformer-Transducer {args.model!r}, {numel:,} parameters, "
          f"dense payload {dense:,} bytes (float32)")
    print(f"pruned: {len(prunable)} weight tensors, {pruned_bytes:,} bytes = {pruned_bytes / dense:.2%} "
          f"of the model; not pruned: biases, norms and the weights some half pattern cannot prune: "
          f"{', '.join(f'{k} x{c}' if c > 1 else k for k, c in left_out.items()) or 'none'}")
    print("masks: FedPrune one-shot, uniform allocation, weight scores (L2)\n")
    rows = [measure(args.model, weights, prunable, p, s) for p in args.patterns for s in args.sparsities]
    print_table(rows, dense, dense - pruned_bytes)
    print("", *verdicts(rows), sep="\n")


if __name__ == "__main__":
    main()
