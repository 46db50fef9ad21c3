"""Seeded generators: every random choice is drawn from (experiment seed, round, client).

Nothing in FedPrune reads torch's global RNG for a decision; a resumed run reproduces an
uninterrupted one bit for bit because each generator is derived from these three numbers alone.
"""

from __future__ import annotations

import hashlib

import torch

SERVER = -1
"""`client_id` used for the server's own random choices (client sampling, initial pruning)."""


def derive_seed(seed: int, round_num: int, client_id: int = SERVER, stream: str = "") -> int:
    """A 63-bit seed that depends only on its arguments (stable across runs and platforms)."""
    digest = hashlib.sha256(f"{seed}:{round_num}:{client_id}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator_for(seed: int, round_num: int, client_id: int = SERVER, stream: str = "") -> torch.Generator:
    """A CPU `torch.Generator` seeded from (seed, round, client, stream)."""
    return torch.Generator().manual_seed(derive_seed(seed, round_num, client_id, stream))


def sample_clients(num_clients: int, clients_per_round: int, seed: int, round_num: int) -> list[int]:
    """Sorted ids of the clients sampled for `round_num`, without replacement."""
    if not 0 < clients_per_round <= num_clients:
        raise ValueError(
            f"clients_per_round={clients_per_round} must be in [1, num_clients={num_clients}]: "
            "lower clients_per_round or add clients"
        )
    perm = torch.randperm(num_clients, generator=generator_for(seed, round_num, SERVER, "sample"))
    return sorted(perm[:clients_per_round].tolist())
