"""The paper sweep's plan: every comparison the report needs, each a valid configuration."""

from __future__ import annotations

import pytest

from fedprune_core.engine import ServerState
from fedprune_core.presets import preset
from fedprune_core.speech.model import build_model
from fedprune_core.strategies import make_strategy
from fedprune_core.submodel import extract, payload_nbytes
from fedprune_core.sweep import paper_sweep


def test_every_variant_is_a_valid_configuration_starting_from_the_warmup() -> None:
    plan = paper_sweep()
    names = [v.name for v in plan.variants]
    assert len(names) == len(set(names)) == 26
    warm = preset(plan.preset, plan.warmups[0].overrides)
    assert warm.strategy == "fedavg" and warm.init_from == ""
    for v in plan.variants:
        config = preset(plan.preset, v.overrides)
        assert config.init_from == plan.run_id(plan.warmups[-1])
        assert config.schedule.num_rounds == 24


def test_the_comparisons_differ_from_fp05_in_exactly_their_factor() -> None:
    plan = paper_sweep()
    by_name = {v.name: preset(plan.preset, v.overrides) for v in plan.variants}
    fp = by_name["fp-s50"]
    assert (fp.strategy, fp.pruning.sparsity, fp.pruning.pattern, fp.pruning.allocation,
            fp.pruning.score_source, fp.pruning.score_norm) == ("fedprune", 0.5, "column", "adaptive", "weight", "l2")
    assert fp.schedule.refine_rounds > 0
    assert [by_name[f"fp-s{s}"].pruning.sparsity for s in ("10", "30", "50", "70")] == [0.1, 0.3, 0.5, 0.7]
    assert {by_name[n].pruning.pattern for n in ("fp-row", "fp-halfcolumn", "fp-halfrow", "fp-unstructured")} == {
        "row", "half_column", "half_row", "unstructured"}
    assert by_name["fp-uniform"].pruning.allocation == "uniform"
    assert by_name["fp-norefine"].schedule.refine_rounds == 0
    assert by_name["fp-gradient"].pruning.score_source == "gradient"
    assert by_name["fp-weightxgradient"].pruning.score_source == "weight_x_gradient"
    assert by_name["fd"].strategy == "fed_dropout" and by_name["fd"].fed_dropout.rate == 0.5
    assert dict(by_name["fd-vocab"].fed_dropout.layer_rates) == {"joiner.linear.weight": 0.0,
                                                                 "predictor.embedding.weight": 0.0}
    hidden = by_name["fd-hidden"].fed_dropout
    assert (hidden.units, hidden.rescale, by_name["fd-hidden-unscaled"].fed_dropout.rescale) == ("hidden", True, False)
    assert by_name["prunefl"].strategy == "prunefl"
    assert by_name["dense"].strategy == "fedavg"
    assert sorted(c.seed for n, c in by_name.items() if n.startswith("fp-s50")) == [0, 1, 2]
    assert sorted(c.seed for n, c in by_name.items() if n.startswith("dense")) == [0, 1, 2]
    for name, config in by_name.items():
        others = {k: v for k, v in config.to_dict().items() if k not in ("seed", "strategy", "pruning",
                                                                          "schedule", "fed_dropout", "prunefl")}
        assert others == {k: v for k, v in fp.to_dict().items() if k in others}, name


def test_only_selects_variants_and_rejects_unknown_names() -> None:
    assert [v.name for v in paper_sweep(only=("dense", "fd")).variants] == ["dense", "fd"]
    with pytest.raises(ValueError, match="only='nope' is not a variant"):
        paper_sweep(only=("nope",))
    with pytest.raises(ValueError, match="rounds=3"):
        paper_sweep(rounds=3)


def test_warmup_stages_continue_each_other() -> None:
    plan = paper_sweep(warmup_rounds=(5, 3, 2))
    configs = [preset(plan.preset, w.overrides) for w in plan.warmups]
    assert [c.schedule.num_rounds for c in configs] == [5, 3, 2]
    assert [c.init_from for c in configs] == ["", "paper-warmup", "paper-warmup2"]
    assert all(c.strategy == "fedavg" for c in configs)
    with pytest.raises(ValueError, match="warm-up stages"):
        paper_sweep(warmup_rounds=())


def test_warmup_from_starts_every_variant_from_that_run_without_a_warmup() -> None:
    plan = paper_sweep("again", warmup_from="paper/paper-warmup2")
    assert plan.warmups == ()
    assert {preset(plan.preset, v.overrides).init_from for v in plan.variants} == {"paper/paper-warmup2"}


def test_federated_dropout_of_hidden_units_sends_half_the_model_as_fp05_does() -> None:
    plan = paper_sweep()
    config = preset(plan.preset, next(v for v in plan.variants if v.name == "fd-hidden").overrides)
    model = build_model(config.model)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    strategy = make_strategy(config, model)
    sent = extract(weights, strategy.client_masks(ServerState(0, weights), {}, 1, 0), strategy.specs)
    assert 0.49 < payload_nbytes(sent) / payload_nbytes(extract(weights, {}, {})) < 0.51  # FP@0.5: 0.507
