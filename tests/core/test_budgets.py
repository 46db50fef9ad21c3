"""Each method's knob meets a client download budget, and the comparison's runs pair their seeds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedprune_core.budgets import (
    Knobs,
    fp_share,
    fp_sparsity_for_share,
    knobs_for,
    prunefl_density_for_share,
    seeded_model,
)
from fedprune_core.config import ExperimentConfig
from fedprune_core.presets import preset
from fedprune_core.speech.model import build_model
from fedprune_core.strategies.fed_dropout import client_share
from fedprune_core.strategies.prunefl import PruneFL
from fedprune_core.submodel import extract, float_entries
from fedprune_core.sweep import compare_sweep

CONFIG = preset("tiny")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return seeded_model(lambda: build_model(CONFIG.model))


def test_a_seeded_model_is_the_same_and_leaves_the_callers_rng_alone(model: nn.Module) -> None:
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    again = seeded_model(lambda: build_model(CONFIG.model))
    assert torch.rand(1) == before
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


def test_fp_sparsity_meets_the_share_and_the_share_falls_with_sparsity(model: nn.Module) -> None:
    weights = {n: p.detach() for n, p in model.state_dict().items()}
    shares = [fp_share(CONFIG, model, weights, s) for s in (0.0, 0.3, 0.6)]
    assert shares[0] == pytest.approx(1.0) and shares[0] > shares[1] > shares[2]
    s = fp_sparsity_for_share(CONFIG, model, weights, 0.5)
    assert fp_share(CONFIG, model, weights, s) == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="share=0.01 is below"):
        fp_sparsity_for_share(CONFIG, model, weights, 0.01)


def test_prunefl_density_gives_a_client_exactly_the_share(model: nn.Module) -> None:
    config = CONFIG.replace({"strategy": "prunefl"})
    density = prunefl_density_for_share(config, model, 0.6)
    strategy = PruneFL.build(config, model)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    # keep the first `density` of every prunable weight's entries: the client holds the rest whole
    masks = {}
    for name in strategy.specs:
        flat = weights[name].flatten()
        keep = round(density * flat.numel())
        masks[name] = (torch.arange(flat.numel()) < keep).reshape(weights[name].shape)
    share = float_entries(extract(weights, masks, strategy.specs)) / float_entries(extract(weights, {}, {}))
    assert share == pytest.approx(0.6, abs=1e-3)
    with pytest.raises(ValueError, match="never pruned"):
        prunefl_density_for_share(config, model, 1e-6)


def test_knobs_say_none_where_a_method_cannot_reach_the_budget(model: nn.Module) -> None:
    config = CONFIG.replace({"fed_dropout": {"units": "rows"}})
    high, low = knobs_for(config, model, (0.8, 1e-6))
    assert high.share == 0.8 and None not in (high.fp_sparsity, high.prunefl_density, high.fd_rate)
    assert high.fd_rate is not None and client_share(config, model, high.fd_rate) == pytest.approx(0.8, abs=0.02)
    assert low.fp_sparsity is None and low.prunefl_density is None
    hidden = config.replace({"fed_dropout": {"units": "hidden"}})
    assert high.fd_hidden_rate is not None and high.fd_hidden_rate != high.fd_rate
    assert client_share(hidden, model, high.fd_hidden_rate) == pytest.approx(0.8, abs=0.02)
    assert low.fd_hidden_rate is None


def test_the_comparison_pairs_every_method_over_the_same_seeds() -> None:
    knobs = [Knobs(0.75, 0.2, 0.7, 0.3, 0.8), Knobs(0.5, 0.45, 0.5, 0.5), Knobs(0.35, 0.6, None, 0.7)]
    plan, arms = compare_sweep("c", rounds=12, seeds=(3, 4), knobs=knobs)
    assert len(arms) == len(plan.variants) and set(arms) == {plan.run_id(v) for v in plan.variants}
    by_method: dict[tuple[str, float | None], set[int]] = {}
    for arm in arms.values():
        by_method.setdefault((arm.method, arm.budget), set()).add(arm.seed)
    assert all(seeds == {3, 4} for seeds in by_method.values())  # paired: each arm runs every seed
    assert ("prunefl", 0.35) not in by_method and ("fp", 0.35) in by_method  # an unreachable knob is left out
    for v in plan.variants:
        config = ExperimentConfig.from_dict(preset("demo").to_dict()).replace(v.overrides)
        assert config.seed == arms[plan.run_id(v)].seed and config.schedule.num_rounds == 12
        if arms[plan.run_id(v)].method == "fp":
            assert config.pruning.sparsity in (0.2, 0.45, 0.6)
        if arms[plan.run_id(v)].method == "fd-hidden" and arms[plan.run_id(v)].budget is not None:
            assert (config.fed_dropout.units, config.fed_dropout.rate, arms[plan.run_id(v)].budget) == (
                "hidden", 0.8, 0.75)
    assert ("fd-hidden", 0.75) in by_method and ("fd-hidden", 0.5) not in by_method
    with pytest.raises(ValueError, match="rounds >= 12"):
        compare_sweep("c", rounds=6, knobs=knobs)


def test_sgd_runs_take_the_pilots_lr_and_are_named_by_it() -> None:
    from fedprune_core.sweep import SGD_LRS, sgd_lr_pilot

    knobs = [Knobs(0.5, 0.45, 0.5, 0.5)]
    plan, arms = compare_sweep("c", rounds=12, seeds=(0,), knobs=knobs, sgd_lr=0.5)
    sgd = {v.name: ExperimentConfig.from_dict(preset("demo").to_dict()).replace(v.overrides) for v in plan.variants
           if arms[plan.run_id(v)].method.startswith("fp-sgd")}
    assert sorted(sgd) == ["fp-sgd-lr050-gradsq-s0", "fp-sgd-lr050-s0"]  # another lr: other runs, not these
    assert all((c.federated.local.optimizer, c.federated.local.lr, c.federated.local.max_grad_norm) == ("sgd", 0.5, 1.0)
               for c in sgd.values())
    pilot = [ExperimentConfig.from_dict(preset("demo").to_dict()).replace(v.overrides)
             for v in sgd_lr_pilot("c", 12, 0.45)]
    assert [(c.seed, c.pruning.sparsity, c.federated.local.optimizer, c.federated.local.lr) for c in pilot] == [
        (0, 0.45, "sgd", lr) for lr in SGD_LRS]
    assert {c.federated.local.max_grad_norm for c in pilot} == {1.0}


def test_every_run_of_the_comparison_and_its_pilots_has_a_valid_run_id() -> None:
    from fedprune_core.sweep import fd_lr_pilot, sgd_lr_pilot
    from infra.checkpoint import validate_run_id

    plan, _ = compare_sweep("compare", knobs=[Knobs(0.5, 0.45, 0.5, 0.5)])
    pilots = [*fd_lr_pilot("compare", 32, 0.5), *sgd_lr_pilot("compare", 32, 0.45)]
    names = [plan.run_id(v) for v in plan.variants] + [f"compare-{v.name}" for v in pilots]
    for run_id in names:
        validate_run_id(run_id)
    assert len(set(names)) == len(names)
