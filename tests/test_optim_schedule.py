"""Schedule values at hand-computed points (SPEC §3.2–3.3, §8, §11)."""

from __future__ import annotations

import pytest

from pgolf.config import OptimConfig, TrainConfig
from pgolf.optim import lr_multiplier, muon_momentum, train_budget_seconds, training_fraction


def test_training_fraction_wallclock_and_steps():
    tc = TrainConfig(max_wallclock_seconds=600.0)
    assert training_fraction(294.0, 10, tc, quant_reserve_seconds=12.0) == pytest.approx(0.5)  # 294/588
    assert train_budget_seconds(tc, 12.0) == 588.0
    assert train_budget_seconds(tc, -5.0) == 600.0  # a negative reserve counts as none
    steps = TrainConfig(max_wallclock_seconds=0.0, iterations=200)
    assert training_fraction(1e9, 50, steps) == 0.25  # no cap: step / iterations, the clock is ignored
    with pytest.raises(ValueError, match="no training time"):
        training_fraction(1.0, 1, TrainConfig(max_wallclock_seconds=10.0), quant_reserve_seconds=10.0)


def test_lr_multiplier_warmdown_frac():
    oc = OptimConfig(warmdown_frac=0.72, min_lr=0.0)
    assert lr_multiplier(0.2, oc) == 1.0
    assert lr_multiplier(0.28, oc) == pytest.approx(1.0)  # warmdown starts at 1 - 0.72
    assert lr_multiplier(0.64, oc) == pytest.approx(0.5)  # 0.36 / 0.72
    assert lr_multiplier(1.0, oc) == 0.0
    floored = OptimConfig(warmdown_frac=0.72, min_lr=0.1)
    assert lr_multiplier(0.946, floored) == pytest.approx(0.1)  # max(0.054/0.72 = 0.075, 0.1)
    assert lr_multiplier(1.1, floored) == pytest.approx(0.1)
    assert lr_multiplier(0.99, OptimConfig(warmdown_frac=0.0)) == 1.0


def test_lr_multiplier_warmdown_iters_baseline_rule():
    oc = OptimConfig(warmdown_iters=1200)
    # Step-based (frac = step/20000): (iterations - step) / warmdown_iters inside the last 1200 steps.
    assert lr_multiplier(18000 / 20000, oc, step=18000) == 1.0
    assert lr_multiplier(18800 / 20000, oc, step=18800) == pytest.approx(1.0)
    assert lr_multiplier(19400 / 20000, oc, step=19400) == pytest.approx(0.5)
    # Wallclock: 500 s for 1000 steps (0.5 s/step) of a 600 s budget: 100 s left, warmdown = 600 s -> 1/6.
    assert lr_multiplier(500 / 600, oc, step=1000) == pytest.approx(1 / 6)
    assert lr_multiplier(0.0, oc, step=0) == 1.0


def test_muon_momentum_warmup():
    oc = OptimConfig(muon_momentum=0.99, muon_momentum_warmup_start=0.92, muon_momentum_warmup_steps=1500)
    assert muon_momentum(0, 0.0, oc) == pytest.approx(0.92)
    assert muon_momentum(750, 0.9, oc) == pytest.approx(0.955)  # step-based: frac is ignored
    assert muon_momentum(3000, 0.1, oc) == pytest.approx(0.99)
    frac_based = OptimConfig(
        muon_momentum=0.97, muon_momentum_warmup_start=0.92, muon_momentum_warmup_frac=0.25
    )
    assert muon_momentum(10_000, 0.125, frac_based) == pytest.approx(0.945)  # halfway through 25%
    assert muon_momentum(0, 0.5, frac_based) == pytest.approx(0.97)
    no_warmup = OptimConfig(muon_momentum=0.95, muon_momentum_warmup_steps=0)
    assert muon_momentum(0, 0.0, no_warmup) == 0.95


def test_pr1855_schedule_spec_1855_section_2():
    """MIN_LR is a multiplicative floor on the warmdown factor: mult = max((1 − frac)/0.85, 0.1); decay
    starts at frac 0.15 and the floor takes over at frac 0.915. Momentum 0.92 → 0.97 over 1500 steps."""
    from pgolf.config import preset

    oc = preset("pr1855").optim
    assert lr_multiplier(0.10, oc) == 1.0
    assert lr_multiplier(0.15, oc) == pytest.approx(1.0)
    assert lr_multiplier(0.575, oc) == pytest.approx(0.5)  # 0.425 / 0.85
    assert lr_multiplier(0.915, oc) == pytest.approx(0.1)  # 0.085 / 0.85: where the floor begins
    assert lr_multiplier(0.95, oc) == pytest.approx(0.1) and lr_multiplier(1.0, oc) == pytest.approx(0.1)
    assert muon_momentum(0, 0.0, oc) == pytest.approx(0.92)
    assert muon_momentum(750, 0.3, oc) == pytest.approx(0.945)
    assert muon_momentum(1500, 0.4, oc) == pytest.approx(0.97) and muon_momentum(
        4000, 0.9, oc
    ) == pytest.approx(0.97)
    tc = preset("pr1855").train
    assert train_budget_seconds(tc, tc.quant_reserve_seconds) == 592.0  # 600 s minus the 8 s GPTQ reserve
