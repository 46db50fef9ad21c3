"""A small synthetic workload: an MLP classifier on seeded Gaussian-cluster data.

Used by fast tests, the orchestration benchmark's no-op baseline, and anyone checking the engine
on something lighter than speech. Each client draws from its own class mix (non-IID).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedprune_core.rng import generator_for
from fedprune_core.training import ClientResult, LocalTrainingConfig, train_local

Example = tuple[torch.Tensor, int]


@dataclass(frozen=True)
class ToyWorkload:
    """MLP of `depth` hidden Linear layers of `width` on `in_dim`-dim inputs, `classes` outputs."""

    in_dim: int = 16
    width: int = 32
    depth: int = 2
    classes: int = 4
    center_seed: int = 0

    def build_model(self) -> nn.Module:
        layers: list[nn.Module] = []
        dim = self.in_dim
        for _ in range(self.depth):
            layers += [nn.Linear(dim, self.width), nn.ReLU()]
            dim = self.width
        return nn.Sequential(*layers, nn.Linear(dim, self.classes))

    @staticmethod
    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    @staticmethod
    def collate(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([x for x, _ in examples]), torch.tensor([y for _, y in examples])

    def train_client(
        self,
        model: nn.Module,
        examples: Sequence[Example],
        config: LocalTrainingConfig,
        generator: torch.Generator,
        after_step: Callable[[], None] | None = None,
    ) -> ClientResult:
        return train_local(model, examples, self.loss_fn, self.collate, config, generator, after_step)

    def evaluate(self, model: nn.Module, examples: Sequence[Example]) -> dict[str, float]:
        x, y = self.collate(list(examples))
        logits = model(x)
        return {"loss": float(F.cross_entropy(logits, y)), "accuracy": float((logits.argmax(1) == y).float().mean())}

    def make_clients(self, num_clients: int, per_client: int, seed: int) -> list[list[Example]]:
        """Seeded non-IID client datasets (client c favours classes c and c + 1); the class centers
        depend on `center_seed` only, so sets drawn with other seeds share one task."""
        g_centers = generator_for(self.center_seed, 0, -1, "toy-centers")
        centers = torch.randn(self.classes, self.in_dim, generator=g_centers) * 2
        clients = []
        for c in range(num_clients):
            g = generator_for(seed, 0, c, "toy-data")
            probs = torch.full((self.classes,), 0.5)
            probs[c % self.classes] += 2.0
            probs[(c + 1) % self.classes] += 1.0
            labels = torch.multinomial(probs, per_client, replacement=True, generator=g)
            xs = centers[labels] + torch.randn(per_client, self.in_dim, generator=g)
            clients.append([(xs[i], int(labels[i])) for i in range(per_client)])
        return clients


@dataclass(frozen=True)
class NoopWorkload(ToyWorkload):
    """The toy model with clients that train nothing: isolates orchestration cost in benchmarks."""

    def train_client(
        self,
        model: nn.Module,
        examples: Sequence[Example],
        config: LocalTrainingConfig,
        generator: torch.Generator,
        after_step: Callable[[], None] | None = None,
    ) -> ClientResult:
        state = {n: p.detach().clone() for n, p in model.named_parameters()}
        return ClientResult(state, len(examples), 0.0, 0.0, 0, None)
