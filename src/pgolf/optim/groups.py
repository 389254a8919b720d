"""Which parameter goes to which optimizer (SPEC §3.1), and the OptimizerSet the trainer drives.

| role (pgolf.model.param_role) | optimizer | lr | wd |
| matrix  | Muon (MuonEq-R)  | matrix_lr                                  | muon_wd  |
| embed   | AdamW            | tied_embed_lr (tied) / embed_lr (untied)   | embed_wd |
| control | AdamW            | scalar_lr                                  | adam_wd  |
| head    | AdamW (untied)   | head_lr                                    | 0        |

All AdamW groups live in one AdamW (betas, eps shared; fused on CUDA), each group remembering its base lr
so one multiplier scales every group (§3.3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pgolf.config.schema import OptimConfig
from pgolf.optim.muon import Muon
from pgolf.runtime import DistInfo, dist_info, resolve_precision

ROLES = ("matrix", "embed", "head", "control")
RoleFn = Callable[[str, Tensor], str]


@dataclass
class ParamGroups:
    """Trainable parameters by role, in model order, with their names (for messages and tests)."""

    matrix: list[tuple[str, Tensor]] = field(default_factory=list)
    embed: list[tuple[str, Tensor]] = field(default_factory=list)
    head: list[tuple[str, Tensor]] = field(default_factory=list)
    control: list[tuple[str, Tensor]] = field(default_factory=list)


def split_params(model: nn.Module, role_fn: RoleFn | None = None) -> ParamGroups:
    """Sort `model`'s trainable parameters by role (default: pgolf.model.param_role)."""
    if role_fn is None:
        from pgolf.model import param_role as role_fn
    groups = ParamGroups()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        role = role_fn(name, p)
        if role not in ROLES:
            raise ValueError(f"parameter {name}: role {role!r} is not one of {ROLES}")
        if role == "matrix" and p.dim() != 2:
            raise ValueError(
                f"parameter {name}: role 'matrix' needs a 2-D tensor, got shape {tuple(p.shape)}"
            )
        getattr(groups, role).append((name, p))
    return groups


class OptimizerSet:
    """Muon for the matrices + one AdamW for the rest, stepped and scheduled together."""

    def __init__(self, muon: Muon | None, adamw: torch.optim.AdamW | None, groups: ParamGroups) -> None:
        self.muon, self.adamw, self.groups = muon, adamw, groups
        self.optimizers = [o for o in (muon, adamw) if o is not None]
        for opt in self.optimizers:
            for g in opt.param_groups:
                g.setdefault("base_lr", g["lr"])

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def set_lr_multiplier(self, mult: float) -> None:
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * mult

    def set_muon_momentum(self, momentum: float) -> None:
        if self.muon is not None:
            self.muon.param_groups[0]["momentum"] = momentum

    def lrs(self) -> dict[str, float]:
        """Current lr per group name (for logs and tests)."""
        out = {}
        if self.muon is not None:
            out["matrix"] = self.muon.param_groups[0]["lr"]
        if self.adamw is not None:
            for g in self.adamw.param_groups:
                out[g["name"]] = g["lr"]
        return out

    def state_dict(self) -> dict[str, Any]:
        """Collective when distributed (Muon gathers its round-robin momentum buffers)."""
        return {
            "muon": self.muon.state_dict() if self.muon is not None else None,
            "adamw": self.adamw.state_dict() if self.adamw is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, opt in (("muon", self.muon), ("adamw", self.adamw)):
            if (state.get(key) is None) != (opt is None):
                raise ValueError(
                    f"optimizer state: '{key}' is present in one of checkpoint/model but not the other"
                )
            if opt is not None:
                opt.load_state_dict(state[key])


def build_optimizers(
    model: nn.Module,
    cfg: OptimConfig,
    dist: DistInfo | None = None,
    role_fn: RoleFn | None = None,
) -> OptimizerSet:
    """Muon (matrices) + AdamW (embedding, control tensors, untied head) per SPEC §3.1."""
    dist = dist or dist_info()
    groups = split_params(model, role_fn)
    muon = None
    if groups.matrix:
        muon = Muon(
            [p for _, p in groups.matrix],
            lr=cfg.matrix_lr,
            momentum=cfg.muon_momentum,
            nesterov=cfg.muon_nesterov,
            backend_steps=cfg.muon_backend_steps,
            row_normalize=cfg.muon_row_normalize,
            weight_decay=cfg.muon_wd,
            ns_dtype=_ns_dtype(cfg.muon_ns_dtype, groups.matrix[0][1].device),
            ns_coeffs=cfg.muon_ns_coeffs,
            momentum_dtype=cfg.muon_momentum_dtype,
            rank=dist.rank,
            world_size=dist.world_size,
        )
    tied = not groups.head
    adam_groups = []
    if groups.embed:
        lr = cfg.tied_embed_lr if tied else cfg.embed_lr
        adam_groups.append(
            {"name": "embed", "params": [p for _, p in groups.embed], "lr": lr, "weight_decay": cfg.embed_wd}
        )
    if groups.control:
        adam_groups.append(
            {
                "name": "control",
                "params": [p for _, p in groups.control],
                "lr": cfg.scalar_lr,
                "weight_decay": cfg.adam_wd,
            }
        )
    if groups.head:
        adam_groups.append(
            {"name": "head", "params": [p for _, p in groups.head], "lr": cfg.head_lr, "weight_decay": 0.0}
        )
    adamw = None
    if adam_groups:
        on_cuda = all(p.is_cuda for g in adam_groups for p in g["params"])
        adamw = torch.optim.AdamW(
            adam_groups,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.adam_eps,
            fused=True if on_cuda else None,
        )
    return OptimizerSet(muon, adamw, groups)


def _ns_dtype(mode: str, device: torch.device) -> str:
    """'auto': bf16 Newton–Schulz where bf16 matmuls are fast (as the records on CUDA), fp32 elsewhere."""
    if mode != "auto":
        return mode
    return "bf16" if resolve_precision("auto", device) == "bf16" else "fp32"
