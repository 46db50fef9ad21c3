"""Models and masks shared by the submodel tests."""

from __future__ import annotations

import torch
from torch import nn

from fedprune_core.masks import PATTERNS, make_mask
from fedprune_core.prunable import PrunableSpec, from_matrices, matrices
from fedprune_core.types import MaskDict

STRUCTURED = [p for p in PATTERNS if p != "unstructured"]


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    """`module` with every parameter drawn from N(0, 1), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in module.parameters():
            nn.init.normal_(p)
    return module


class Net(nn.Module):
    """Linear layers (sliced), a conv (masked) and attention (fused in_proj and out_proj: sliced)."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.conv = nn.Conv1d(1, 2, kernel_size=2)
        self.attn = nn.MultiheadAttention(2 * width, 2)
        self.fc2 = nn.Linear(2 * width, 2)


def random_masks(
    weights: dict[str, torch.Tensor], specs: dict[str, PrunableSpec], sparsity: float, seed: int
) -> MaskDict:
    """Masks of each spec's pattern and taps from seeded random scores."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, spec in specs.items():
        parts = [
            make_mask(torch.rand(m.shape, generator=g), sparsity, spec.pattern, taps=spec.taps)
            for m in matrices(weights[name], spec)
        ]
        masks[name] = from_matrices(parts, spec)
    return masks
