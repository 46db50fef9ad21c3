"""Reading a finished run back: its final weights and their hash."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from fedprune_core.engine import ServerState
from infra.checkpoint import CheckpointStore
from infra.runs import STATE_OBJECT
from infra.storage import Storage, open_storage


def final_state(storage: Storage | Path, run_id: str, experiment: str = "fedprune") -> ServerState:
    """The state of the run's last committed checkpoint (checksums verified)."""
    if isinstance(storage, Path):
        storage = open_storage((storage / "storage").as_uri())
    ckpt = CheckpointStore(storage, experiment, run_id).load()
    return ServerState.from_flat(ckpt.round_num, ckpt.tensors[STATE_OBJECT])


def weights_hash(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over names and raw bytes of the weights, in name order."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].contiguous().numpy().tobytes())
    return h.hexdigest()
