"""Exponential moving average of the full state_dict in fp32 (SPEC §3.4).

Updated after every optimizer step, no bias correction: ema ← d·ema + (1 − d)·live. Before
`start_frac` of training the EMA simply copies the live weights, so a short run's average covers only
its end (a 0.997 EMA over 60 steps would otherwise keep most of the initialisation). decay = 0 makes the
EMA a copy of the live weights: the export is then the final live model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, start_frac: float = 0.0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"optim.ema_decay={decay} must be in [0, 1)")
        self.decay, self.start_frac = decay, start_frac
        self.names: list[str] = []
        self.shadow: list[Tensor] = []
        self._live_cache: tuple[int, list[Tensor]] | None = None
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                self.names.append(name)
                self.shadow.append(t.detach().float().clone())

    def _live(self, model: nn.Module) -> list[Tensor]:
        # state_dict() walks every module; the tensors it returns alias the parameters, so build it once.
        if self._live_cache is None or self._live_cache[0] != id(model):
            state = model.state_dict()
            self._live_cache = (id(model), [state[n].detach() for n in self.names])
        return self._live_cache[1]

    @torch.no_grad()
    def update(self, model: nn.Module, frac: float) -> None:
        """One step of the average (`frac` = training fraction reached after this step)."""
        live = self._live(model)
        if self.decay == 0.0 or frac < self.start_frac:
            torch._foreach_copy_(self.shadow, live)
            return
        torch._foreach_mul_(self.shadow, self.decay)
        torch._foreach_add_(self.shadow, live, alpha=1.0 - self.decay)

    @torch.no_grad()
    def averaged_state(self, model: nn.Module) -> dict[str, Tensor]:
        """model's state_dict with the averaged weights, each cast to the live tensor's dtype (model.pt);
        the live weights stay untouched."""
        state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        for name, avg in zip(self.names, self.shadow):
            state[name].copy_(avg.to(state[name].dtype))
        return state

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model`, each cast back to the dtype of the live tensor."""
        model.load_state_dict(self.averaged_state(model))

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "start_frac": self.start_frac,
            "shadow": {n: t.cpu().clone() for n, t in zip(self.names, self.shadow)},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        missing = [n for n in self.names if n not in shadow]
        if missing or len(shadow) != len(self.names):
            raise ValueError(
                f"EMA state does not match the model (missing {missing[:3]}, {len(shadow)} vs {len(self.names)} tensors)"
            )
        for name, t in zip(self.names, self.shadow):
            t.copy_(shadow[name])
        self.decay, self.start_frac = float(state["decay"]), float(state["start_frac"])
