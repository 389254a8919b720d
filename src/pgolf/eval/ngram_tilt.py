"""The causal n-gram tilt (SPEC §5.5, §9.3, §9.8): an exactly normalised tilt of the model's distribution
towards each position's hint (hints from `pgolf.eval.ngram_hints`).

p_tilt(v) = p(v)·exp(β·[v = h]) / Z with Z = 1 + p_h·(e^β − 1); the scored NLL becomes
nll + ln Z − β·[y = h] at hinted positions and is unchanged elsewhere.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pgolf.config.schema import EvalConfig
from pgolf.data.bytes import ByteTables
from pgolf.eval.ngram_hints import HintParams, compute_hints, token_flags


class NgramTilt:
    """The NllTransform of the tilt: nll' = nll + has_hint·(ln Z − β·[y = h]), Z = 1 + p_h·(e^β − 1),
    p_h = exp(logit_h − lse) with lse = nll + logit_y (SPEC §5.5). Hints are indexed by token position."""

    def __init__(self, hints: np.ndarray | torch.Tensor, betas: np.ndarray | torch.Tensor):
        self.hints = torch.as_tensor(np.asarray(hints), dtype=torch.int64)
        self.betas = torch.as_tensor(np.asarray(betas), dtype=torch.float64)
        self.coverage = float((self.hints >= 0).double().mean()) if self.hints.numel() else 0.0

    def __call__(
        self, nll: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        device = nll.device
        pos = positions.long().cpu()
        hint = self.hints[pos].to(device)
        beta = self.betas[pos].to(device)
        has = hint >= 0
        safe = hint.clamp(min=0)
        nll64 = nll.double()
        lse = nll64 + logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1).double()
        log_ph = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1).double() - lse
        log_z = torch.log1p(torch.exp(log_ph) * torch.expm1(beta))
        bonus = beta * (targets.long() == hint).double()
        return torch.where(has, nll64 + log_z - bonus, nll64).to(nll.dtype)


def tilt_for(
    tokens: np.ndarray | torch.Tensor, cfg: EvalConfig, tables: ByteTables, quiet: bool = False
) -> NgramTilt:
    """The tilt of a token stream under cfg's hint parameters (one process)."""
    toks = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
    return NgramTilt(*compute_hints(toks, HintParams.from_config(cfg), token_flags(tables), quiet=quiet))


def build_tilt(tokens: torch.Tensor, cfg: EvalConfig, tables: ByteTables) -> tuple[NgramTilt, float]:
    """Hints for the whole stream (rank 0 computes, every rank receives them) and the seconds it took."""
    import torch.distributed as dist

    from pgolf.runtime import dist_info

    start = time.perf_counter()
    info = dist_info()
    n = tokens.numel()
    if info.is_main:
        tilt = tilt_for(tokens, cfg, tables)
        h, b = tilt.hints, tilt.betas
    else:
        h = torch.empty(n, dtype=torch.int64)
        b = torch.empty(n, dtype=torch.float64)
    if info.distributed:
        # NCCL needs device tensors; gloo takes CPU ones
        dev = info.device if dist.get_backend() == "nccl" else torch.device("cpu")
        h, b = h.to(dev), b.to(dev)
        dist.broadcast(h, src=0)
        dist.broadcast(b, src=0)
        h, b = h.cpu(), b.cpu()
    tilt = NgramTilt(h, b)
    if info.is_main:
        print(f"ngram hints: {100 * tilt.coverage:.1f}% of positions")
    return tilt, time.perf_counter() - start
