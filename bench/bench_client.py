"""Client cost of Federated Pruning: training step time and peak training memory, pruned vs dense.

A client of Federated Pruning (Lin et al., Interspeech 2022) trains the pruned model the server
sends. For the `small` and `paper` Conformer-Transducers this trains, side by side in one process,
the client model of a dense payload (dense FedAvg) and that of a 50% column-pruned payload
(FedPrune one-shot masks, uniform allocation: every weight of rank >= 2 at 50%). Both go through
the real client path: `extract` -> `build_client_model` -> `train_local` with the speech workload's
loss and collate (log-mel + SpecAugment), Adam, `after_step=project`, on the same synthetic batch
(noise audio of a fixed length with a random transcript: cost does not depend on the content;
2.5 s, the `bench` corpus's mean), or with `--corpus` one client's batch of a rendered corpus
(mixed lengths padded to the longest, as a client trains).
Batch: the `small` preset's 16; 2 for `paper` (116M parameters) to keep CPU steps to seconds.
One torch thread by default: on cores shared with other jobs, 2 OpenMP threads waiting on each
other made steps several times slower and erratic.

Reported per variant (repetitions interleaved dense/pruned, the order alternating):
- step s: median wall time and median process CPU time of a training step after the first
  (batch features included; CPU time does not count the time other jobs hold the core), and the
  CPU time without building the batch (log-mel, SpecAugment); after the table, the mean kernel
  time per step (page faults, mostly; `--malloc-defaults` trains with glibc's default malloc
  settings instead of `fedprune_core.training.reuse_freed_heap`'s, to measure that side by side).
  After the table: the CPU ratio of the fastest steps (the step least slowed by other work on
  this shared machine), and of each interleaved pair of trainings (median, quartiles, range).
- peak MB: `train_local`'s peak tensor memory (parameters + gradients + optimiser state + the
  tensors saved for backward in one step); RSS MB: the process's peak resident memory during
  training above its resident memory before it (Linux VmHWM after resetting it).
Then, unless --no-analysis, where the pruned model's cost goes: parameter bytes by kind of layer
(shrunk or kept at full size), bytes saved for backward by kind of layer, the peak if the masked
dense kinds were sliced too, forward FLOPs by kind of layer (`torch.utils.flop_counter`) and CPU
time by kind of operation (`torch.profiler`, median of interleaved profiled steps).

    .venv/bin/python bench/bench_client.py                          # small (batch 16) and paper (batch 2)
    .venv/bin/python bench/bench_client.py --models small --reps 6 --no-analysis
    .venv/bin/python bench/bench_client.py --models small --reps 8 --no-analysis \\
        --run paper/paper-warmup2 --config docs/results/learning-rate/lr1-fp-s50.json   # FP@0.5's own client
    .venv/bin/python bench/bench_client.py --models small --reps 8 --corpus .fedprune/data/synth-4425c1666c5a

Issue 6 target: pruned / dense <= 0.6 for both figures. The table is a printed figure, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import random
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from bench_communication import one_shot_masks
from client_size import load_weights, one_shot_fp_masks
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from fedprune_core import training, units
from fedprune_core.config import ExperimentConfig
from fedprune_core.depthwise import DepthwiseConv1d
from fedprune_core.presets import preset
from fedprune_core.prunable import PrunableSpec, find_prunable, is_sliced
from fedprune_core.speech.model import SubsamplingConvs, build_model
from fedprune_core.speech.synth import SAMPLE_RATE
from fedprune_core.speech.utterance import Utterance
from fedprune_core.speech.workload import SpeechBatch, SpeechWorkload
from fedprune_core.submodel import (
    ClientModel,
    SlicedLinear,
    SlicedMultiheadAttention,
    SlicedPointwiseConv1d,
    build_client_model,
    extract,
)
from fedprune_core.training import LocalTrainingConfig, train_local
from fedprune_core.types import Payload
from fedprune_core.units import LiveBatchNorm1d, LiveDepthwiseConv1d
from infra.speech_data import MANIFEST, read_index, read_manifest

TARGET = 0.6
"""Issue 6: pruned / dense <= 0.6 for step time and peak training memory."""

BATCH = {"tiny": 8, "small": 16, "paper": 2}
CHARS_PER_SECOND = 14
MB = 1e6


@dataclass(frozen=True)
class Run:
    """One local training of one variant.

    Attributes:
        step_s: per timed step, wall seconds.
        cpu_s, model_cpu_s: per timed step, CPU seconds of the process, and the same without
            building the batch (log-mel, SpecAugment).
        sys_s: per timed step, the part of `cpu_s` spent in the kernel (page faults, mostly).
        peak_bytes: `train_local`'s peak tensor memory.
        rss_bytes: peak resident memory during training above the resident memory before it.
    """

    step_s: list[float]
    cpu_s: list[float]
    model_cpu_s: list[float]
    sys_s: list[float]
    peak_bytes: int
    rss_bytes: int


# --- data and payloads ---------------------------------------------------------------------------


def corpus_batch(root: Path, size: int, seed: int) -> list[Utterance]:
    """`size` utterances of one client of a rendered corpus's train split (`fedprune data`), the
    client and the utterances drawn with `seed`: a batch as a client trains it, of mixed lengths
    padded to the longest.

    Raises:
        ValueError: no client of the corpus holds `size` utterances.
    """
    clients = read_index(root)["splits"]["train"]
    large = sorted(speaker for speaker, count in clients.items() if count >= size)
    if not large:
        raise ValueError(f"--corpus {root}: no client holds {size} utterances; pass a smaller --batch")
    draw = random.Random(seed)
    speaker = draw.choice(large)
    return draw.sample(read_manifest(root / "train" / speaker / MANIFEST), size)


def synthetic_batch(workload: SpeechWorkload, size: int, seconds: float, seed: int) -> list[Utterance]:
    """`size` utterances of noise audio with random transcripts of a speaking rate's length."""
    g = torch.Generator().manual_seed(seed)
    symbols = workload.vocabulary.symbols
    chars = int(seconds * CHARS_PER_SECOND)
    out = []
    for i in range(size):
        audio = 0.05 * torch.randn(int(seconds * SAMPLE_RATE), generator=g)
        picks = torch.randint(len(symbols), (chars,), generator=g).tolist()
        text = " ".join("".join(symbols[j] for j in picks).split())  # words separated by single spaces
        out.append(Utterance(f"synthetic-{i:03d}", "synthetic", text or "a", audio))
    return out


@dataclass(frozen=True)
class Variant:
    """What a client is sent: the payload and the specs it was extracted with."""

    name: str
    specs: dict[str, PrunableSpec]
    payload: Payload


def variants(model_name: str, sparsity: float) -> list[Variant]:
    """The dense client (dense FedAvg: no specs) and the column-pruned one, from the initial model."""
    model = build_model(model_name)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    prunable = ("*weight",)
    specs = find_prunable(model, prunable, "column")
    masks = one_shot_masks(weights, specs, "column", sparsity, prunable)
    return [Variant("dense", {}, extract(weights, {}, {})), Variant("pruned", specs, extract(weights, masks, specs))]


def variants_from_run(config: ExperimentConfig, run: str, sparsity: float) -> list[Variant]:
    """The dense client and the client FedPrune sends at `sparsity` from `run`'s last weights, its
    masks built by `config`'s pruning section (pattern, allocation, score) in one shot."""
    weights = load_weights(run)
    p = config.pruning
    specs = find_prunable(build_model(config.model), p.prunable, p.pattern, p.include_1d)
    masks = one_shot_fp_masks(config, specs, weights, sparsity)
    return [Variant("dense", {}, extract(weights, {}, {})), Variant("pruned", specs, extract(weights, masks, specs))]


# --- one measured training ---------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss() -> int:
    """Return freed heap to the OS, reset VmHWM to the current RSS (Linux) and return it in bytes."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return 1024 * _status_kb("VmRSS")


def _transposed_pointwise(layer: SlicedPointwiseConv1d, x: torch.Tensor) -> torch.Tensor:
    """A sliced pointwise convolution's output and input gradient laid out (N, L, C) seen through a
    transpose, as before `SlicedPointwiseConv1d` laid them out as ``nn.Conv1d``: `bench_layout.py`'s
    side-by-side figure."""
    return SlicedLinear.forward(layer, x.transpose(1, 2)).transpose(1, 2)


def train_once(workload: SpeechWorkload, variant: Variant, utterances: list[Utterance],
               local: LocalTrainingConfig, seed: int) -> Run:
    """Train the client model of `variant` for `local.steps` steps, timing each step."""
    client = build_client_model(workload.build_model(), variant.payload, variant.specs)
    return _train(workload, client, utterances, local, seed)


def _train(workload: SpeechWorkload, client: ClientModel, utterances: list[Utterance],
           local: LocalTrainingConfig, seed: int) -> Run:
    generator = torch.Generator().manual_seed(seed)
    collate_cpu: list[float] = []
    marks: list[tuple[float, float, float]] = []

    def collate(batch: list[Utterance]) -> SpeechBatch:
        start = time.process_time()
        out = workload.collate(batch, generator=generator)
        collate_cpu.append(time.process_time() - start)
        return out

    def after_step() -> None:
        client.project()
        marks.append((time.perf_counter(), time.process_time(), os.times().system))

    rss_before = _reset_peak_rss()
    result = train_local(client.module, utterances, workload.loss_fn, collate, local, generator, after_step)
    rss = 1024 * _status_kb("VmHWM") - rss_before
    step_s = [b[0] - a[0] for a, b in zip(marks, marks[1:], strict=False)]
    cpu_s = [b[1] - a[1] for a, b in zip(marks, marks[1:], strict=False)]
    sys_s = [b[2] - a[2] for a, b in zip(marks, marks[1:], strict=False)]
    model_cpu_s = [s - c for s, c in zip(cpu_s, collate_cpu[1:], strict=True)]
    return Run(step_s, cpu_s, model_cpu_s, sys_s, result.peak_memory_bytes, rss)


def compare(workload: SpeechWorkload, pair: list[Variant], utterances: list[Utterance],
            local: LocalTrainingConfig, reps: int) -> dict[str, list[Run]]:
    """`reps` trainings of each variant, interleaved, the order alternating."""
    runs: dict[str, list[Run]] = {v.name: [] for v in pair}
    for rep in range(reps):
        for v in pair if rep % 2 == 0 else pair[::-1]:
            runs[v.name].append(train_once(workload, v, utterances, local, seed=rep))
    return runs


def summary(runs: list[Run]) -> dict[str, float]:
    """Medians of the step times and RSS, and the peak tensor memory (the same in every run)."""
    steps, cpu = [s for r in runs for s in r.step_s], [s for r in runs for s in r.cpu_s]
    return {
        "step": statistics.median(steps),
        "step_min": min(steps),
        "step_max": max(steps),
        "cpu": statistics.median(cpu),
        "cpu_min": min(cpu),
        "cpu_max": max(cpu),
        "model_cpu": statistics.median(s for r in runs for s in r.model_cpu_s),
        "sys": statistics.mean(s for r in runs for s in r.sys_s),
        "peak": max(r.peak_bytes for r in runs),
        "rss": statistics.median(r.rss_bytes for r in runs),
    }


def summaries(dense: list[Run], pruned: list[Run]) -> tuple[dict[str, float], dict[str, float]]:
    """`summary` of both variants; the pruned one also gets the CPU ratio of each interleaved pair
    of trainings (pruned training's median step over the dense one's trained beside it): its
    median, quartiles and range, a figure that slow drift of the machine's speed does not move."""
    d, p = summary(dense), summary(pruned)
    pairs = sorted(statistics.median(b.cpu_s) / statistics.median(a.cpu_s) for a, b in zip(dense, pruned, strict=True))
    quartiles = statistics.quantiles(pairs, n=4, method="inclusive") if len(pairs) > 1 else [pairs[0]] * 3
    p.update(pairs=len(pairs), pair_median=statistics.median(pairs), pair_q1=quartiles[0], pair_q3=quartiles[2],
             pair_min=pairs[0], pair_max=pairs[-1])
    return d, p


# --- analysis: where the pruned model's cost goes -------------------------------------------------

SLICED = "other Linear (sliced when pruned)"
ATTENTION = "MHA fused in_proj + out_proj (sliced when pruned)"
DEPTHWISE = "Conv1d depthwise (masked; live channels only when pruned)"
JOINER = "joint output Linear (sliced when pruned)"
POINTWISE = "Conv1d pointwise (sliced when pruned)"
OTHER = "other (joint sum, loss, reshapes)"
SUBSAMPLING = "Conv2d subsampling (kept input channels of the second when pruned)"


def kind_of(path: str, module: nn.Module, sliced: set[str]) -> str:
    """The kind of layer of the module at `path`, the same in the dense and the pruned model."""
    if "self_attn" in path:
        return ATTENTION
    if path == "joiner.linear":
        return JOINER
    if path in sliced:
        return POINTWISE if isinstance(module, nn.Conv1d | SlicedPointwiseConv1d) else SLICED
    kinds: list[tuple[type | tuple[type, ...], str]] = [
        (nn.Conv2d, SUBSAMPLING),
        (nn.Embedding, "embedding (masked dense)"),
        ((nn.LayerNorm, nn.BatchNorm1d, LiveBatchNorm1d), "norms (not pruned)"),
        ((nn.SiLU, nn.ReLU, nn.GLU, nn.Tanh), "activation functions"),
        (nn.Linear, "Linear, not sliced"),
    ]
    if isinstance(module, SubsamplingConvs):
        return SUBSAMPLING
    if isinstance(module, LiveDepthwiseConv1d):
        return DEPTHWISE
    if isinstance(module, nn.Conv1d):
        return "Conv1d pointwise (masked dense)" if module.kernel_size == (1,) else DEPTHWISE
    return next((label for cls, label in kinds if isinstance(module, cls)), OTHER)


def sliced_paths(pair: list[Variant]) -> set[str]:
    """Paths of the Linear modules the pruned client trains as `SlicedLinear`."""
    return {n.removesuffix(".weight") for v in pair for n, s in v.specs.items() if is_sliced(s)}


def is_unit(module: nn.Module) -> bool:
    """Whether costs are attributed to `module` as a whole (leaves, attention with its out_proj, the
    subsampling's convolutions, which save for backward as one)."""
    return not list(module.children()) or isinstance(
        module, nn.MultiheadAttention | SlicedMultiheadAttention | SubsamplingConvs)


def parameter_bytes(model: nn.Module, sliced: set[str]) -> dict[str, int]:
    """Bytes of parameters by kind of layer; biases and other 1-D parameters apart."""
    modules = dict(model.named_modules())
    out: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        path = name.rpartition(".")[0]
        label = kind_of(path, modules[path], sliced) if p.dim() >= 2 else "biases, norms (not pruned)"
        out[label] += p.numel() * p.element_size()
    return dict(out)


def saved_bytes(
    workload: SpeechWorkload, model: nn.Module, batch: SpeechBatch, sliced: set[str]
) -> dict[str, int]:
    """Bytes saved for backward in one forward, by the kind of the innermost module saving them.

    Distinct storages, parameters excluded: what `train_local`'s meter counts.
    """
    stack: list[str] = [OTHER]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (stack[-1], t.untyped_storage().nbytes())
        return t

    def enter(label: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            stack.append(label)

        return hook

    def leave(*_: Any) -> None:
        stack.pop()

    hooks = []
    for path, m in model.named_modules():
        if is_unit(m):
            hooks.append(m.register_forward_pre_hook(enter(kind_of(path, m, sliced))))
            hooks.append(m.register_forward_hook(leave))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        workload.loss_fn(model, batch)
    for h in hooks:
        h.remove()
    out: dict[str, int] = defaultdict(int)
    for label, nbytes in seen.values():
        out[label] += nbytes
    return dict(out)


def forward_flops(
    workload: SpeechWorkload, model: nn.Module, batch: SpeechBatch, sliced: set[str]
) -> dict[str, int]:
    """FLOPs of one forward (matmuls and convolutions, `torch.utils.flop_counter`) by kind of layer.

    Forward only: the counter's attribution of backward FLOPs to modules is unreliable. The
    backward of a matmul or convolution costs about twice its forward, dense or sliced alike.
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        workload.loss_fn(model, batch)
    # the counter names a module by the class of the top-level module called, then its path
    modules = {}
    for child_name, child in model.named_children():
        for sub, m in child.named_modules():
            key = f"{type(child).__name__}.{sub}" if sub else type(child).__name__
            modules[key] = (f"{child_name}.{sub}" if sub else child_name, m)
    counts = counter.get_flop_counts()
    # without gradients SubsamplingConvs runs its layers, which count their own FLOPs
    units = {path for path, m in modules.values() if is_unit(m) and not isinstance(m, SubsamplingConvs)}
    out: dict[str, int] = defaultdict(int)
    for key, ops in counts.items():
        if key not in modules or modules[key][0] not in units:
            continue
        path = modules[key][0]
        if any(".".join(path.split(".")[:i]) in units for i in range(1, path.count(".") + 1)):
            continue  # inside a unit (an attention's projections): counted with it
        out[kind_of(*modules[key], sliced)] += sum(ops.values())
    out[OTHER] += sum(counts["Global"].values()) - sum(out.values())
    return dict(out)


SCOPES: dict[str, str] = {
    "Optimizer.step": "optimizer step (Adam)",
    "Optimizer.zero_grad": "optimizer step (Adam)",
    "project": "mask projection (after_step)",
    "collate": "batch features (log-mel, SpecAugment)",
    "_JointLattices": "transducer loss (joint output layer, log-softmax, lattice)",
    "_SymbolLogProbs": "transducer loss (joint output layer, log-softmax, lattice)",
    "_TransducerNLL": "transducer loss (joint output layer, log-softmax, lattice)",
}
"""Profiler scopes (name prefixes) whose operations count as one kind, whatever they are."""

OP_KINDS: list[tuple[str, tuple[str, ...]]] = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("convolution", ("conv",)),
    ("scaled dot-product attention", ("scaled_dot_product",)),
    ("gather / scatter of sliced Linear inputs", ("index", "scatter")),
    ("transducer loss (joint output layer, log-softmax, lattice)", ("rnnt", "logcumsumexp")),
    ("fill / copy / zero", ("aten::fill_", "aten::copy_", "aten::zero_", "aten::zeros", "aten::empty")),
]


def event_kind(event: Any) -> str:
    """The kind of a profiler event: its enclosing scope's (`SCOPES`), else by its name (`OP_KINDS`:
    exact aten:: names or substrings)."""
    parent = event
    while parent is not None:
        scope = next((label for prefix, label in SCOPES.items() if parent.name.startswith(prefix)), None)
        if scope is not None:
            return scope
        parent = parent.cpu_parent
    for label, keys in OP_KINDS:
        if any(event.name == k if k.startswith("aten::") else k in event.name.lower() for k in keys):
            return label
    return "other (elementwise, norms, activations, autograd)"


def op_seconds(workload: SpeechWorkload, pair: list[Variant], utterances: list[Utterance],
               local: LocalTrainingConfig, reps: int) -> dict[str, dict[str, float]]:
    """Per variant, self CPU seconds of a profiled training step by kind of operation.

    Each variant trains one warm-up step, then `reps` profiled steps interleaved with the other
    variant's; per kind, the median over the profiled steps.
    """
    warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
    one = dataclasses.replace(local, steps=1)
    clients, steps = {}, {v.name: [] for v in pair}
    for v in pair:
        clients[v.name] = build_client_model(workload.build_model(), v.payload, v.specs)
        _profiled_step(workload, clients[v.name], utterances, one)
    for rep in range(reps):
        for v in pair if rep % 2 == 0 else pair[::-1]:
            steps[v.name].append(_profiled_step(workload, clients[v.name], utterances, one))
    return {name: {k: statistics.median(s.get(k, 0.0) for s in runs) for k in {k for s in runs for k in s}}
            for name, runs in steps.items()}


def _profiled_step(workload: SpeechWorkload, client: ClientModel, utterances: list[Utterance],
                   one: LocalTrainingConfig) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)

    def collate(batch: list[Utterance]) -> SpeechBatch:
        with record_function("collate"):
            return workload.collate(batch, generator=generator)

    def project() -> None:
        with record_function("project"):
            client.project()

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_local(client.module, utterances, workload.loss_fn, collate, one, generator, project)
    out: dict[str, float] = defaultdict(float)
    for event in prof.events():
        out[event_kind(event)] += event.self_cpu_time_total / 1e6
    return dict(out)


def print_breakdown(
    title: str, unit: str, scale: float, dense: dict[str, float], pruned: dict[str, float]
) -> None:
    """A Markdown table of two breakdowns side by side."""
    total_d, total_p = sum(dense.values()), sum(pruned.values())
    print(f"\n{title}\n\n| kind | dense {unit} | pruned {unit} | pruned / dense | share of dense "
          f"| share of pruned | saving, share of dense |\n|---|---|---|---|---|---|---|")
    for label in sorted(set(dense) | set(pruned), key=lambda k: -dense.get(k, 0)):
        d, p = dense.get(label, 0), pruned.get(label, 0)
        ratio = f"{p / d:.2f}" if d else "-"
        print(f"| {label} | {d / scale:.1f} | {p / scale:.1f} | {ratio} | {d / total_d:.1%} "
              f"| {p / total_p:.1%} "
              f"| {(d - p) / total_d:+.1%} |")
    print(f"| total | {total_d / scale:.1f} | {total_p / scale:.1f} | {total_p / total_d:.2f} | | | "
          f"{(total_d - total_p) / total_d:+.1%} |", flush=True)


MASKED_DENSE = (SUBSAMPLING,)


def print_what_if(params: dict[str, dict[str, int]], saved: dict[str, dict[str, int]], copies: int,
                  sparsity: float) -> None:
    """Peak ratios of two changes, estimated from the measured parts.

    Masked dense kinds sliced like Linear: their parameter copies shrink by `sparsity`, activations
    as measured (column pruning keeps every layer's output width). Joint output Linear not pruned:
    its parameters dense again and no gathered copy of the joint activations saved.
    """
    peak = {k: copies * sum(params[k].values()) + sum(saved[k].values()) for k in params}
    print("\nPeak memory pruned / dense, estimated for changes to the pruned model:")
    cumulative = 0.0
    for label in MASKED_DENSE:
        alone = copies * sparsity * params["pruned"].get(label, 0)
        cumulative += alone
        print(f"- {label} sliced: {(peak['pruned'] - alone) / peak['dense']:.2f} alone, "
              f"{(peak['pruned'] - cumulative) / peak['dense']:.2f} with the ones above")
    joint = saved["pruned"].get(JOINER, 0) - saved["dense"].get(JOINER, 0) - copies * (
        params["dense"].get(JOINER, 0) - params["pruned"].get(JOINER, 0))
    print(f"- joint output Linear not pruned: {(peak['pruned'] - joint) / peak['dense']:.2f} alone, "
          f"{(peak['pruned'] - cumulative - joint) / peak['dense']:.2f} with the ones above")


def analyse(workload: SpeechWorkload, pair: list[Variant], utterances: list[Utterance],
            local: LocalTrainingConfig, reps: int, sparsity: float) -> None:
    """Print where each variant's memory, FLOPs and time go."""
    sliced = sliced_paths(pair)
    models = {v.name: build_client_model(workload.build_model(), v.payload, v.specs).module for v in pair}
    batch = workload.collate(utterances, generator=torch.Generator().manual_seed(0))
    copies = 4 if local.optimizer == "adam" else 2 + (local.momentum > 0)
    params = {k: parameter_bytes(m, sliced) for k, m in models.items()}
    print_breakdown(f"Parameter bytes by kind of layer (one copy; training holds {copies}: parameters, "
                    "gradients, optimiser state)", "MB", MB, params["dense"], params["pruned"])
    saved = {k: saved_bytes(workload, m, batch, sliced) for k, m in models.items()}
    print_breakdown("Bytes saved for backward in one step, by kind of layer saving them", "MB", MB,
                    saved["dense"], saved["pruned"])
    for k in models:
        state, acts = copies * sum(params[k].values()), sum(saved[k].values())
        print(f"{k}: {copies} x parameters {state / MB:.1f} MB + saved {acts / MB:.1f} MB = "
              f"{(state + acts) / MB:.1f} MB (activations {acts / (state + acts):.0%})")
    print_what_if(params, saved, copies, sparsity)
    fl = {k: forward_flops(workload, m, batch, sliced) for k, m in models.items()}
    print_breakdown("Forward FLOPs of one step by kind of layer", "GFLOP", 1e9, fl["dense"], fl["pruned"])
    del models
    gc.collect()
    secs = op_seconds(workload, pair, utterances, local, reps)
    print_breakdown("Self CPU time of one profiled training step by kind of operation", "ms", 1e-3,
                    secs["dense"], secs["pruned"])


# --- main ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def onednn_depthwise() -> Iterator[None]:
    """Inside, `DepthwiseConv1d` and `LiveDepthwiseConv1d` call ``F.conv1d`` (oneDNN; every tap,
    masked ones as zeros), as clients did before `fedprune_core.depthwise`."""

    def every_tap(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int,
                  taps: torch.Tensor | None = None) -> torch.Tensor:
        return F.conv1d(x, weight, bias, padding=padding, groups=weight.shape[0])

    with (mock.patch.object(DepthwiseConv1d, "forward", nn.Conv1d.forward),
          mock.patch.object(units, "depthwise_conv1d", every_tap)):
        yield


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["small", "paper"], choices=list(BATCH))
    parser.add_argument("--batch", type=int, nargs="+", help=f"batch size per model (default: {BATCH})")
    parser.add_argument("--seconds", type=float, default=2.5, help="audio per utterance")
    parser.add_argument("--corpus", type=Path,
                        help="instead of synthetic utterances of --seconds each, a batch of one client of this "
                             "rendered corpus (e.g. .fedprune/data/synth-4425c1666c5a, the `small` preset's), "
                             "drawn with seed 0: mixed lengths, padded to the longest")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per training, after a warm-up step")
    parser.add_argument("--reps", type=int, default=4, help="trainings per variant, interleaved")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on shared cores, OpenMP threads that wait for each other "
                             "make 2-thread timings mostly contention)")
    parser.add_argument("--no-analysis", action="store_true")
    parser.add_argument("--onednn-depthwise", action="store_true",
                        help="compute the depthwise convolutions with F.conv1d (oneDNN), as clients did before "
                             "fedprune_core.depthwise (for a side-by-side measurement)")
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="train with glibc's default malloc settings, as clients did before "
                             "fedprune_core.training.reuse_freed_heap (for a side-by-side measurement)")
    parser.add_argument("--run", help="EXPERIMENT/RUN_ID: instead of uniform column masks of the initial model, "
                        "the client FedPrune sends from this run's last weights, masks by --config's pruning "
                        "section at --sparsity (both variants start from the run's weights)")
    parser.add_argument("--config", type=Path, help="with --run: JSON overrides of the preset named by --models")
    args = parser.parse_args()
    config = None
    if (args.run is None) != (args.config is None) or (args.run and len(args.models) != 1):
        parser.error(f"--run {args.run} --config {args.config} --models {' '.join(args.models)}: --run and "
                     "--config go together, with the one model the run trained: pass all three, e.g. "
                     "--run paper/paper-warmup2 --config docs/results/learning-rate/lr1-fp-s50.json --models small")
    if args.config is not None:
        config = preset(args.models[0], json.loads(args.config.read_text()))
    torch.set_num_threads(args.threads)
    if args.onednn_depthwise:
        contextlib.ExitStack().enter_context(onednn_depthwise())  # for the whole process
    if args.malloc_defaults:
        training.reuse_freed_heap = lambda: False  # type: ignore[assignment]

    masks = (f"{config.pruning.pattern} pattern, {config.pruning.allocation}, score {config.pruning.score_source} "
             f"{config.pruning.score_norm}, from {args.run}'s weights" if config else
             "column pattern, uniform, from the initial model")
    data = f"a client's batch from {args.corpus}" if args.corpus else f"{args.seconds} s synthetic utterances"
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {masks}, sparsity "
          f"{args.sparsity}; Adam; {data}; {args.reps} interleaved "
          f"trainings x {args.steps} timed steps per variant (medians)")
    rows = []
    for i, model_name in enumerate(args.models):
        batch = args.batch[i] if args.batch else BATCH[model_name]
        workload = SpeechWorkload(model_name)
        pair = variants_from_run(config, args.run, args.sparsity) if config else variants(model_name, args.sparsity)
        if args.corpus is None:
            utterances = synthetic_batch(workload, batch, args.seconds, seed=0)
        else:
            utterances = corpus_batch(args.corpus, batch, seed=0)
            seconds = sorted(u.audio.numel() / SAMPLE_RATE for u in utterances)
            print(f"{model_name}: {batch} utterances of {utterances[0].speaker_id} from {args.corpus}, "
                  f"{seconds[0]:.2f}-{seconds[-1]:.2f} s (mean {statistics.mean(seconds):.2f} s), "
                  f"{statistics.mean(len(u.text) for u in utterances):.0f} characters on average")
        local = LocalTrainingConfig(steps=1 + args.steps, batch_size=batch, lr=1e-3, optimizer="adam")
        runs = compare(workload, pair, utterances, local, args.reps)
        rows.append((model_name, batch, *summaries(runs["dense"], runs["pruned"])))
        if not args.no_analysis:
            print(f"\n## {model_name}, batch {batch}")
            analyse(workload, pair, utterances, local, args.reps, args.sparsity)
    print("\n| model | batch | step wall s dense / pruned | wall ratio | step CPU s dense / pruned | CPU ratio "
          "| CPU ratio without features | peak MB dense / pruned | peak ratio | RSS MB dense / pruned "
          "| RSS ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model_name, batch, d, p in rows:
        print(f"| {model_name} | {batch} | {d['step']:.3f} / {p['step']:.3f} | {p['step'] / d['step']:.2f} "
              f"| {d['cpu']:.3f} / {p['cpu']:.3f} | {p['cpu'] / d['cpu']:.2f} "
              f"| {p['model_cpu'] / d['model_cpu']:.2f} | {d['peak'] / MB:.1f} / {p['peak'] / MB:.1f} "
              f"| {p['peak'] / d['peak']:.2f} | {d['rss'] / MB:.1f} / {p['rss'] / MB:.1f} "
              f"| {p['rss'] / d['rss']:.2f} |")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    for model_name, _, d, p in rows:
        print(f"{model_name} step s, min-max: wall dense {d['step_min']:.3f}-{d['step_max']:.3f}, pruned "
              f"{p['step_min']:.3f}-{p['step_max']:.3f}; CPU dense {d['cpu_min']:.3f}-{d['cpu_max']:.3f}, "
              f"pruned {p['cpu_min']:.3f}-{p['cpu_max']:.3f}; of the CPU time in the kernel (mean): dense "
              f"{d['sys']:.3f}, pruned {p['sys']:.3f}")
        for figure in ("step", "cpu", "peak"):
            ratio = p[figure] / d[figure]
            met = "met" if ratio <= TARGET else "missed"
            print(f"{model_name} {figure}: pruned / dense {ratio:.2f} ({met}: target <= {TARGET})")
        print(f"{model_name} cpu, fastest steps: pruned / dense {p['cpu_min'] / d['cpu_min']:.2f} (the step least "
              "slowed by other work on the machine, timeit's convention)")
        print(f"{model_name} CPU ratio of each of the {p['pairs']:.0f} interleaved pairs of trainings: median "
              f"{p['pair_median']:.3f}, quartiles {p['pair_q1']:.3f}-{p['pair_q3']:.3f}, range "
              f"{p['pair_min']:.3f}-{p['pair_max']:.3f}")


if __name__ == "__main__":
    main()
