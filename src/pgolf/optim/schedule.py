"""Training progress, LR multiplier and Muon momentum (SPEC §3.2–3.3, §8, §11).

Everything is a pure function of (elapsed training seconds, step, config), so a resumed run recomputes
exactly the values an uninterrupted one would.
"""

from __future__ import annotations

from pgolf.config.schema import OptimConfig, TrainConfig


def train_budget_seconds(cfg: TrainConfig, quant_reserve_seconds: float = 0.0) -> float:
    """Seconds the loop may train: the wallclock cap minus the quantization reserve (0 = no cap)."""
    if cfg.max_wallclock_seconds <= 0:
        return 0.0
    budget = cfg.max_wallclock_seconds - max(0.0, quant_reserve_seconds)
    if budget <= 0:
        raise ValueError(
            f"train.max_wallclock_seconds={cfg.max_wallclock_seconds} leaves no training time after the "
            f"quantization reserve of {quant_reserve_seconds:.1f} s"
        )
    return budget


def training_fraction(
    elapsed_s: float, step: int, cfg: TrainConfig, quant_reserve_seconds: float = 0.0
) -> float:
    """frac = elapsed / (cap − reserve) with a wallclock cap (records), else step / iterations."""
    budget = train_budget_seconds(cfg, quant_reserve_seconds)
    if budget > 0:
        return elapsed_s / budget
    if cfg.iterations <= 0:
        raise ValueError(f"train.iterations={cfg.iterations} must be > 0 when train.max_wallclock_seconds=0")
    return step / cfg.iterations


def lr_multiplier(frac: float, cfg: OptimConfig, step: int = 0) -> float:
    """The LR multiplier shared by every group (no LR warm-up; linear warmdown to 0, floored at MIN_LR).

    warmdown_iters > 0 (the §8 baseline): the warmdown covers the last `warmdown_iters` steps at the mean
    step time so far. Since mean step time = elapsed/step and the remaining time is (1 − frac)·budget,
    the multiplier is min(1, (1 − frac)·step / (warmdown_iters·frac)); with a step-based frac
    (= step/iterations) this is exactly (iterations − step)/warmdown_iters, the baseline's rule.
    Otherwise (records): 1 until frac ≥ 1 − warmdown_frac, then (1 − frac)/warmdown_frac.
    """
    if cfg.warmdown_iters > 0:
        if step <= 0 or frac <= 0:
            return 1.0
        mult = min(1.0, (1.0 - frac) * step / (cfg.warmdown_iters * frac))
    elif cfg.warmdown_frac > 0 and frac >= 1.0 - cfg.warmdown_frac:
        mult = (1.0 - frac) / cfg.warmdown_frac
    else:
        return 1.0
    return max(mult, cfg.min_lr)


def muon_momentum(step: int, frac: float, cfg: OptimConfig) -> float:
    """Linear warm-up from muon_momentum_warmup_start to muon_momentum.

    Over muon_momentum_warmup_steps steps (records), or over the first muon_momentum_warmup_frac of
    training when that is > 0 (cpu-golf: a run of a few hundred steps never reaches step 1500).
    """
    if cfg.muon_momentum_warmup_frac > 0:
        t = frac / cfg.muon_momentum_warmup_frac
    elif cfg.muon_momentum_warmup_steps > 0:
        t = step / cfg.muon_momentum_warmup_steps
    else:
        t = 1.0
    t = min(max(t, 0.0), 1.0)
    return (1.0 - t) * cfg.muon_momentum_warmup_start + t * cfg.muon_momentum
