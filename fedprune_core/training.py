"""Local training of one client: K optimiser steps on the client's own data.

This is the client side of a federated round (McMahan et al., AISTATS 2017; Lin et al.,
Interspeech 2022, where clients train the pruned submodel they were sent). It is shared by every
workload: the workload supplies a loss, a collate function and the examples.

Batches are drawn with the caller's generator only: each pass over the data is a
``torch.randperm(generator=...)`` cut into consecutive batches (the last one may be smaller), and
passes repeat until ``steps`` batches have been used.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the call. On CPU, the tensor memory
of training, counted exactly: bytes of parameters + gradients + optimiser state + the largest
total of tensors saved for backward in one step (deduplicated by storage). It is not the process
RSS, which also holds the allocator's caches, the data and the interpreter.

A model's federated state (`model_state`) is its parameters plus the running statistics of its
batch norms (`running_mean`, `running_var`): those statistics are what a batch norm computes with
at evaluation, so clients upload them and the server averages them like weights (as FedAvg
implementations that average the whole ``state_dict`` do). They are never pruned and never take a
server optimizer step.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    # fused: one kernel for every parameter; a sliced client has many small blocks, and the
    # per-tensor loop cost as much for them as for the dense model's (bench/bench_client.py)
    "adam": lambda params, c: torch.optim.Adam(
        params, lr=c.lr, betas=(c.momentum or 0.9, 0.999), weight_decay=c.weight_decay, fused=True
    ),
}


@dataclass(frozen=True)
class LocalTrainingConfig:
    """How a client trains.

    Attributes:
        steps: K, the number of optimiser steps (> 0).
        batch_size: Examples per step (> 0).
        lr: Learning rate (> 0).
        momentum: SGD momentum, or Adam's beta1 (0 means Adam's default 0.9); in [0, 1).
        weight_decay: L2 penalty (>= 0).
        max_grad_norm: Clip the global gradient norm to this (> 0), or ``None`` for no clipping.
        optimizer: A key of :data:`OPTIMIZERS`: ``"sgd"`` or ``"adam"``.
        track_grad_sq: Accumulate per-parameter squared gradients over the steps (PruneFL's
            importance signal, Jiang et al., TNNLS 2022).
    """

    steps: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    optimizer: str = "sgd"
    track_grad_sq: bool = False

    def __post_init__(self) -> None:
        validate_local_training(self)


RUNNING_STATS = ("running_mean", "running_var")


def is_running_stat(name: str) -> bool:
    """Whether a state entry is a batch norm's running statistic (averaged, never optimized)."""
    return name.rpartition(".")[2] in RUNNING_STATS


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached clones of the parameters and of the batch norms' running statistics."""
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    state.update({n: b.detach().clone() for n, b in model.named_buffers() if is_running_stat(n)})
    return state


@dataclass(frozen=True)
class ClientResult:
    """What one client's local training returns.

    Attributes:
        state: Trained parameters and running statistics (`model_state`), detached clones.
        num_examples: Examples the client holds (``len(examples)``), the FedAvg weight.
        mean_loss: Mean of the K step losses.
        wall_time_s: Wall time of the training, seconds.
        peak_memory_bytes: Peak tensor memory of training (see the module docstring).
        grad_sq: Per parameter, the sum over steps of ``grad ** 2``, when ``track_grad_sq``.
    """

    state: dict[str, torch.Tensor]
    num_examples: int
    mean_loss: float
    wall_time_s: float
    peak_memory_bytes: int
    grad_sq: dict[str, torch.Tensor] | None


def validate_local_training(config: LocalTrainingConfig) -> None:
    """Raise ``ValueError`` naming the value, the rule and a fix for an invalid ``config``."""
    c = config
    if c.steps <= 0:
        raise ValueError(f"steps={c.steps} must be > 0: pass the number K of local steps, e.g. 5")
    if c.batch_size <= 0:
        raise ValueError(f"batch_size={c.batch_size} must be > 0: e.g. 16")
    if not (c.lr > 0 and math.isfinite(c.lr)):
        raise ValueError(f"lr={c.lr} must be a finite number > 0: e.g. 0.1 for SGD, 1e-3 for Adam")
    if not 0 <= c.momentum < 1:
        raise ValueError(f"momentum={c.momentum} must be in [0, 1): e.g. 0.9, or 0 for none")
    if not c.weight_decay >= 0:
        raise ValueError(f"weight_decay={c.weight_decay} must be >= 0: pass 0 for none")
    if c.max_grad_norm is not None and not c.max_grad_norm > 0:
        raise ValueError(f"max_grad_norm={c.max_grad_norm} must be > 0 or None: pass None for no clipping")
    if c.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={c.optimizer!r} must be one of {sorted(OPTIMIZERS)}")


def make_optimizer(model: nn.Module, config: LocalTrainingConfig) -> torch.optim.Optimizer:
    """The optimiser named by ``config.optimizer`` over the trainable parameters of ``model``."""
    return OPTIMIZERS[config.optimizer]([p for p in model.parameters() if p.requires_grad], config)


def batch_indices(num_examples: int, config: LocalTrainingConfig, generator: torch.Generator) -> Iterator[list[int]]:
    """Yield ``config.steps`` batches of example indices, reshuffling with ``generator`` each pass."""
    produced = 0
    while True:
        order = torch.randperm(num_examples, generator=generator).tolist()
        for start in range(0, num_examples, config.batch_size):
            if produced == config.steps:
                return
            produced += 1
            yield order[start : start + config.batch_size]


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, max_grad_norm: float | None
) -> None:
    """Backpropagate ``loss``, clip the gradient norm if asked, and step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_grad_norm)
    optimizer.step()


def tensor_bytes(tensors: Iterator[torch.Tensor] | Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for p in model.parameters():
        yield p
        if p.grad is not None:
            yield p.grad
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


class _SavedTensorMeter:
    """Counts the bytes of distinct storages saved for backward inside ``with meter.step():``.

    Storages in ``exclude`` (the parameters, already counted) are skipped.
    """

    def __init__(self, exclude: set[int]) -> None:
        self.peak = 0
        self._exclude = exclude
        self._storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._exclude:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return t

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        self._storages = {}
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield
        self.peak = max(self.peak, sum(self._storages.values()))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
HEAP_REUSE_BYTES = 1 << 30


@functools.cache
def reuse_freed_heap() -> bool:
    """Let glibc's malloc keep freed memory for the next allocation instead of returning it.

    By default glibc serves a block above its mmap threshold (which grows with use, up to 32 MB)
    with its own mapping and gives freed memory at the top of the heap back to the kernel. A
    training step frees and allocates the same tens of MB of activations every step, so each step
    faults every 4 KB page of them in again: about 55 ms of system time per `small` dense step at
    batch 16 (the joint's 37 MB tensors are above 32 MB), 8% of the step (`bench/bench_client.py`).
    Blocks up to `HEAP_REUSE_BYTES` now come from the heap and freed memory stays mapped, so a
    process's resident memory stays at its high-water mark, as with torch's GPU caching allocator.

    Process-wide and idempotent; returns whether glibc took the settings (False elsewhere).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_REUSE_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, HEAP_REUSE_BYTES))


def train_local(
    model: nn.Module,
    examples: Sequence[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    collate: Callable[[list[Any]], Any],
    config: LocalTrainingConfig,
    generator: torch.Generator,
    after_step: Callable[[], None] | None = None,
) -> ClientResult:
    """Train ``model`` in place for ``config.steps`` steps on ``examples`` and report the result.

    Args:
        model: The (sub)model to train; left in the mode it came in.
        examples: The client's data; ``len(examples)`` is reported as ``num_examples``.
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss.
        collate: Turns a list of examples into the batch ``loss_fn`` takes.
        config: Steps, batch size and optimiser.
        generator: The only source of randomness of batch sampling (seed it from (seed, round, client)).
        after_step: Called after every optimiser step, e.g. to re-apply pruning masks.

    Returns:
        The trained parameters and the measurements of this training.

    Raises:
        ValueError: ``examples`` is empty.
    """
    if len(examples) == 0:
        raise ValueError("examples is empty: a client needs at least one example to train; skip empty clients")
    reuse_freed_heap()
    device = next(model.parameters()).device
    was_training = model.training
    model.train()
    optimizer = make_optimizer(model, config)
    meter = _SavedTensorMeter({p.untyped_storage().data_ptr() for p in model.parameters()})
    grad_sq = {n: torch.zeros_like(p) for n, p in model.named_parameters()} if config.track_grad_sq else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    start = time.perf_counter()
    for indices in batch_indices(len(examples), config, generator):
        with meter.step():
            loss = loss_fn(model, collate([examples[i] for i in indices]))
        optimizer_step(model, optimizer, loss, config.max_grad_norm)
        if grad_sq is not None:
            _add_grad_sq(grad_sq, model)
        if after_step is not None:
            after_step()
        losses.append(float(loss.detach()))
    wall = time.perf_counter() - start
    model.train(was_training)
    state = model_state(model)
    peak = _peak_memory(device, model, optimizer, meter)
    return ClientResult(state, len(examples), sum(losses) / len(losses), wall, peak, grad_sq)


def _add_grad_sq(grad_sq: dict[str, torch.Tensor], model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.grad is not None:
            grad_sq[name] += p.grad.detach() ** 2


def _peak_memory(
    device: torch.device, model: nn.Module, optimizer: torch.optim.Optimizer, meter: _SavedTensorMeter
) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return tensor_bytes(list(_state_tensors(model, optimizer))) + meter.peak
