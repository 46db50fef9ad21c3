import subprocess
import sys

import pytest
import torch
from torch import nn

from fedprune_core.training import (
    ClientResult,
    LocalTrainingConfig,
    batch_indices,
    tensor_bytes,
    train_local,
)


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def _data(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(3, generator=g), torch.randn(1, generator=g)) for _ in range(n)]


def _linear() -> nn.Linear:
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
        model.bias.fill_(0.25)
    return model


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 0}, r"steps=0 must be > 0"),
        ({"batch_size": -1}, r"batch_size=-1 must be > 0"),
        ({"lr": 0.0}, r"lr=0.0 must be a finite number > 0"),
        ({"lr": float("nan")}, r"lr=nan must be a finite number > 0"),
        ({"momentum": 1.0}, r"momentum=1.0 must be in \[0, 1\)"),
        ({"weight_decay": -0.1}, r"weight_decay=-0.1 must be >= 0"),
        ({"max_grad_norm": 0.0}, r"max_grad_norm=0.0 must be > 0 or None"),
        ({"optimizer": "lamb"}, r"optimizer='lamb' must be one of \['adam', 'sgd'\]"),
    ],
)
def test_config_validation_names_value_and_rule(change, message):
    with pytest.raises(ValueError, match=message):
        LocalTrainingConfig(**{"steps": 1, "batch_size": 1, "lr": 0.1, **change})


def test_batches_cover_each_pass_once_and_reshuffle_from_the_generator():
    config = LocalTrainingConfig(steps=5, batch_size=2, lr=0.1)
    batches = list(batch_indices(5, config, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [2, 2, 1, 2, 2]
    assert sorted(i for b in batches[:3] for i in b) == [0, 1, 2, 3, 4]
    assert batches == list(batch_indices(5, config, torch.Generator().manual_seed(0)))


def test_one_full_batch_sgd_step_matches_the_hand_computed_update():
    data = _data(4)
    model = _linear()
    x, y = _collate(data)
    expected_loss = float(_mse(model, (x, y)).detach())
    residual = x @ torch.tensor([0.5, -1.0, 2.0]) + 0.25 - y[:, 0]  # (4,)
    grad_w = 2 * (residual[:, None] * x).mean(0)
    config = LocalTrainingConfig(steps=1, batch_size=4, lr=0.1, track_grad_sq=True)
    result = train_local(model, data, _mse, _collate, config, torch.Generator().manual_seed(0))
    assert isinstance(result, ClientResult)
    assert result.num_examples == 4
    assert result.mean_loss == pytest.approx(expected_loss, rel=1e-6)
    torch.testing.assert_close(result.state["weight"][0], torch.tensor([0.5, -1.0, 2.0]) - 0.1 * grad_w)
    torch.testing.assert_close(result.grad_sq["weight"][0], grad_w**2)


def test_training_is_reproducible_and_state_is_detached():
    config = LocalTrainingConfig(steps=7, batch_size=4, lr=0.05, momentum=0.9, max_grad_norm=1.0)
    a = train_local(_linear(), _data(), _mse, _collate, config, torch.Generator().manual_seed(3))
    b = train_local(_linear(), _data(), _mse, _collate, config, torch.Generator().manual_seed(3))
    assert a.mean_loss == b.mean_loss
    assert all(torch.equal(a.state[k], b.state[k]) and not a.state[k].requires_grad for k in a.state)
    c = train_local(_linear(), _data(), _mse, _collate, config, torch.Generator().manual_seed(4))
    assert not torch.equal(a.state["weight"], c.state["weight"])


def test_after_step_runs_after_every_step_and_can_reapply_a_mask():
    model = _linear()
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    calls = []

    def reapply() -> None:
        calls.append(1)
        with torch.no_grad():
            model.weight.mul_(mask)

    config = LocalTrainingConfig(steps=4, batch_size=2, lr=0.1, optimizer="adam")
    result = train_local(model, _data(), _mse, _collate, config, torch.Generator(), after_step=reapply)
    assert len(calls) == 4
    assert result.state["weight"][0, 1] == 0


def test_grad_sq_sums_over_steps():
    config = LocalTrainingConfig(steps=3, batch_size=6, lr=1e-9, track_grad_sq=True)  # lr ~ 0: same grad each step
    result = train_local(_linear(), _data(), _mse, _collate, config, torch.Generator())
    single = train_local(
        _linear(),
        _data(),
        _mse,
        _collate,
        LocalTrainingConfig(steps=1, batch_size=6, lr=1e-9, track_grad_sq=True),
        torch.Generator(),
    )
    torch.testing.assert_close(result.grad_sq["weight"], 3 * single.grad_sq["weight"])
    assert result.grad_sq.keys() == result.state.keys()


def test_peak_memory_counts_parameters_gradients_optimizer_state_and_saved_tensors():
    model = nn.Sequential(nn.Linear(100, 200), nn.ReLU(), nn.Linear(200, 1))
    params = sum(p.numel() * 4 for p in model.parameters())
    data = [(torch.randn(100), torch.randn(1)) for _ in range(8)]
    sgd = train_local(
        model, data, _mse, _collate, LocalTrainingConfig(steps=1, batch_size=8, lr=0.1), torch.Generator()
    )
    # params + grads, plus saved activations: input (8, 100), hidden (8, 200) twice at most
    assert 2 * params + 8 * 100 * 4 <= sgd.peak_memory_bytes <= 2 * params + 8 * (100 + 400 + 2) * 4 + 64
    adam = train_local(
        model,
        data,
        _mse,
        _collate,
        LocalTrainingConfig(steps=1, batch_size=8, lr=0.1, optimizer="adam"),
        torch.Generator(),
    )
    assert adam.peak_memory_bytes >= sgd.peak_memory_bytes + 2 * params  # exp_avg and exp_avg_sq


def test_tensor_bytes_dedupes_shared_storage():
    t = torch.zeros(10)
    assert tensor_bytes([t, t[:5], t.view(2, 5)]) == 40


def test_empty_client_is_an_error_and_mode_is_restored():
    model = _linear().eval()
    with pytest.raises(ValueError, match="examples is empty"):
        train_local(model, [], _mse, _collate, LocalTrainingConfig(steps=1, batch_size=1, lr=0.1), torch.Generator())
    train_local(model, _data(), _mse, _collate, LocalTrainingConfig(steps=1, batch_size=1, lr=0.1), torch.Generator())
    assert not model.training


_FAULTS_OF_A_REUSED_BLOCK = """
import resource, sys, torch
from fedprune_core.training import reuse_freed_heap
if sys.argv[1] == "reuse":
    assert reuse_freed_heap()
faults = []
for _ in range(12):  # a 48 MB block, above glibc's largest dynamic mmap threshold, allocated and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(48 << 18).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# glibc reuses the freed memory once aligned allocations' leftovers coalesce (a few rounds); the
# kernel may reclaim idle freed memory now and then: the fewest faults of the eleven
print(min(faults[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_reuse_freed_heap_stops_page_faults_on_a_block_freed_and_allocated_again():
    faults = {}
    for mode in ("default", "reuse"):
        out = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_REUSED_BLOCK, mode], capture_output=True, text=True,
                             check=True)
        faults[mode] = int(out.stdout.split()[-1])
    pages = (48 << 20) // 4096
    assert faults["default"] > pages // 2, faults  # mapped again each time, every page faulted in
    assert faults["reuse"] < pages // 20, faults  # the same heap memory, still resident
