"""pgolf.optim: MuonEq-R, parameter groups (SPEC §3.1–3.2) and the schedule (§3.3).

`build_optimizers(model, cfg.optim, dist)` -> `OptimizerSet`; `lr_multiplier`, `muon_momentum`,
`training_fraction` are pure functions of (elapsed, step, config).
"""

from pgolf.optim.groups import OptimizerSet, ParamGroups, build_optimizers, split_params
from pgolf.optim.muon import Muon, newton_schulz, ns_coefficients, shape_scale
from pgolf.optim.schedule import lr_multiplier, muon_momentum, train_budget_seconds, training_fraction

__all__ = [
    "Muon",
    "OptimizerSet",
    "ParamGroups",
    "build_optimizers",
    "lr_multiplier",
    "muon_momentum",
    "newton_schulz",
    "ns_coefficients",
    "shape_scale",
    "split_params",
    "train_budget_seconds",
    "training_fraction",
]
