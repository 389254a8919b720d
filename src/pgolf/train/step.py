"""One optimizer step's compute (SPEC §3.4): micro-steps of forward/backward, then the global grad clip.

Kept apart from the loop so a distributed test can feed fixed batches and compare ranks with a single
process. The optimizer step itself is the caller's, after it has checked the loss is finite.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from pgolf.runtime import autocast


class TrainStep:
    """`run(batches)` -> mean loss (detached, on device) with gradients accumulated and clipped.

    `model` is what gets called (possibly DDP/compiled); `params` are the raw trainable parameters.
    Each micro-step's loss is divided by the number of micro-steps, so the gradient is the mean over the
    rank's batch; DDP averages it over ranks, syncing only on the last micro-step.
    """

    def __init__(
        self,
        model: nn.Module,
        params: list[nn.Parameter],
        device: torch.device,
        autocast_mode: str = "auto",
        grad_clip_norm: float = 0.0,
    ) -> None:
        self.model, self.params, self.device = model, params, device
        self.autocast_mode, self.grad_clip_norm = autocast_mode, grad_clip_norm
        self.is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)

    def run(self, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
        n = len(batches)
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(batches):
            sync = not self.is_ddp or i == n - 1
            ctx = contextlib.nullcontext() if sync else self.model.no_sync()
            with ctx:
                with autocast(self.device, self.autocast_mode):
                    loss = self.model(x, y)
                (loss / n).backward()
            total += loss.detach().float()
        if self.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip_norm, foreach=True)
        return total / n
