"""Muon with MuonEq-R row normalisation (SPEC §3.2), distributed the records' way.

Per matrix: buf ← μ·buf + g; Nesterov u = g + μ·buf; (MuonEq-R) each row of u divided by its L2 norm;
Newton–Schulz quintic orthogonalisation in bf16 (the stock fixed coefficients, or #1855's Polar-Express
per-step schedule, SPEC-1855 §2); scale sqrt(max(1, rows/cols)); decoupled weight decay
p ← p·(1 − lr·wd); p ← p − lr·update.

Distribution: parameter i belongs to rank i mod world. Each rank computes only its own matrices' updates
(it holds only their momentum buffers) into one flat bf16 buffer (fp32 with ns_dtype=fp32) laid out in parameter order; a single
all-reduce (SUM) fills in every other rank's slots, and every rank applies all updates, so the weights
stay identical everywhere. Same-shape matrices are stacked so Newton–Schulz runs as one batched matmul
chain per shape (a handful of large ops instead of dozens of small ones: that is what keeps the optimizer
cheap on CPU).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from pgolf.config.schema import OptimConfig
from pgolf.runtime import all_reduce_

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # SPEC §3.2: the same (a, b, c) at every step
# SPEC-1855 §2 (#1855, from PR #1344): one (a, b, c) per step, steepest first. There are five: asking for more
# steps is an error (the record silently ran five).
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NS_EPS = 1e-7
ROW_NORM_EPS = 1e-7
NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_DEFAULTS = OptimConfig()  # structural switches default to the config's defaults: one place for defaults


def ns_coefficients(kind: str, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each of `steps` Newton–Schulz iterations for optim.muon_ns_coeffs=`kind`."""
    if kind == "quintic":
        return [NS_COEFFS] * steps
    if kind == "polar_express":
        if steps > len(POLAR_EXPRESS_COEFFS):
            raise ValueError(
                f"optim.muon_backend_steps={steps}: Polar-Express Newton–Schulz has "
                f"{len(POLAR_EXPRESS_COEFFS)} coefficient tuples, so at most {len(POLAR_EXPRESS_COEFFS)} steps"
            )
        return list(POLAR_EXPRESS_COEFFS[:steps])
    raise ValueError(f"optim.muon_ns_coeffs={kind!r}; expected quintic or polar_express")


def newton_schulz(
    g: Tensor,
    steps: int = _DEFAULTS.muon_backend_steps,
    dtype: torch.dtype = torch.bfloat16,
    coeffs: str = _DEFAULTS.muon_ns_coeffs,
) -> Tensor:
    """Newton–Schulz orthogonalisation of a matrix [r, c] or a stack [n, r, c], in `dtype`.

    X = G/(‖G‖_F + 1e-7), transposed when r > c so the Gram matrix X·Xᵀ is the small one (wide
    orientation); then for each step's (a, b, c) (see ns_coefficients): A = X·Xᵀ, X ← aX + (bA + cA²)X;
    transposed back. The result has singular values near 1.
    """
    if g.dim() not in (2, 3):
        raise ValueError(f"newton_schulz expects a matrix or a stack of matrices, got shape {tuple(g.shape)}")
    schedule = ns_coefficients(coeffs, steps)
    x = g.to(dtype)
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + NS_EPS)
    transposed = g.size(-2) > g.size(-1)
    if transposed:
        x = x.mT
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(0)
    for a, b, c in schedule:
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # bA + cA²
        x = torch.baddbmm(x, poly, x, beta=a)  # aX + (bA + cA²)X
    if squeeze:
        x = x.squeeze(0)
    return x.mT if transposed else x


def shape_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """sqrt(max(1, rows/cols)): tall matrices get a larger step so every update has a comparable RMS."""
    return math.sqrt(max(1.0, shape[0] / shape[1]))


class Muon(torch.optim.Optimizer):
    """MuonEq-R over 2-D parameters; `rank`/`world_size` select the round-robin share this process computes.

    One param group; its `lr`, `momentum` and `weight_decay` may be changed between steps (the schedule
    does). Gradients must already be averaged across ranks (DDP does this) and identical everywhere.
    lr, momentum and weight_decay have no defaults here: the run's values come from OptimConfig.
    momentum_dtype="bf16" keeps the buffer in bf16 and accumulates the bf16-rounded gradient into it (the
    #1529/#1557 parallel Muon); "fp32" keeps it in the parameter's dtype.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
        nesterov: bool = _DEFAULTS.muon_nesterov,
        backend_steps: int = _DEFAULTS.muon_backend_steps,
        row_normalize: bool = _DEFAULTS.muon_row_normalize,
        ns_dtype: str = "bf16",
        ns_coeffs: str = _DEFAULTS.muon_ns_coeffs,
        momentum_dtype: str = _DEFAULTS.muon_momentum_dtype,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"optim.muon_ns_dtype={ns_dtype!r}; expected one of {sorted(NS_DTYPES)}")
        if momentum_dtype not in NS_DTYPES:
            raise ValueError(
                f"optim.muon_momentum_dtype={momentum_dtype!r}; expected one of {sorted(NS_DTYPES)}"
            )
        ns_coefficients(ns_coeffs, backend_steps)  # an impossible schedule fails here, not at the first step
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            backend_steps=backend_steps,
            row_normalize=row_normalize,
            weight_decay=weight_decay,
            ns_coeffs=ns_coeffs,
        )
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("Muon takes one parameter group (its lr/momentum are set by the schedule)")
        self.params: list[Tensor] = list(self.param_groups[0]["params"])
        for i, p in enumerate(self.params):
            if p.dim() != 2:
                raise ValueError(
                    f"Muon parameter {i} has shape {tuple(p.shape)}; only 2-D matrices are allowed"
                )
        self.rank, self.world_size, self.ns_dtype = rank, world_size, NS_DTYPES[ns_dtype]
        self.owned = [i for i in range(len(self.params)) if i % world_size == rank]
        # Owned matrices grouped by shape: each group is one batched Newton–Schulz.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in self.owned:
            groups.setdefault(tuple(self.params[i].shape), []).append(i)
        self.shape_groups = list(groups.items())
        self.momentum_dtype = NS_DTYPES[momentum_dtype] if momentum_dtype == "bf16" else None
        for i in self.owned:
            self.state[self.params[i]]["momentum_buffer"] = torch.zeros_like(
                self.params[i], dtype=self.momentum_dtype
            )
        self._flat: Tensor | None = None
        self._slots: list[Tensor] = []

    def _flat_buffer(self) -> Tensor:
        """The persistent update buffer (NS dtype: bf16 as the records) and per-parameter views into it."""
        if self._flat is None:
            total = sum(p.numel() for p in self.params)
            self._flat = torch.zeros(total, dtype=self.ns_dtype, device=self.params[0].device)
            offset = 0
            for p in self.params:
                self._slots.append(self._flat[offset : offset + p.numel()].view(p.shape))
                offset += p.numel()
        return self._flat

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("Muon.step does not take a closure")
        if not self.params:
            return
        group = self.param_groups[0]
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        flat = self._flat_buffer()
        if self.world_size > 1:
            flat.zero_()  # other ranks' slots must be zero before the SUM
        for shape, idxs in self.shape_groups:
            members = [i for i in idxs if self.params[i].grad is not None]
            if not members:
                continue
            grads = [self.params[i].grad for i in members]
            bufs = [self.state[self.params[i]]["momentum_buffer"] for i in members]
            if self.momentum_dtype is None:
                torch._foreach_mul_(bufs, mu)
                torch._foreach_add_(bufs, grads)
                updates = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs
            else:
                # Per tensor, as #1557 does: torch's bf16 _foreach_mul_ rounds differently from mul_.
                grads = [g.to(self.momentum_dtype) for g in grads]
                for buf, g in zip(bufs, grads):
                    buf.mul_(mu).add_(g)
                updates = [g.add(b, alpha=mu) for g, b in zip(grads, bufs)] if group["nesterov"] else bufs
            u = torch.stack(updates)
            if group["row_normalize"]:
                u = u / torch.linalg.vector_norm(u, dim=-1, keepdim=True).clamp_min(ROW_NORM_EPS)
            x = newton_schulz(u, group["backend_steps"], self.ns_dtype, group["ns_coeffs"])
            scale = shape_scale(shape)
            if scale != 1.0:
                x = x * scale
            torch._foreach_copy_([self._slots[i] for i in members], list(x.unbind(0)))
        if self.world_size > 1:
            all_reduce_(flat, "sum")
        if wd > 0:
            torch._foreach_mul_(self.params, 1.0 - lr * wd)
        torch._foreach_add_(self.params, self._slots, alpha=-lr)

    # ------------------------------------------------------------------ state (world-size independent)
    @torch.no_grad()
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Hyper-parameters plus every matrix's momentum buffer (collective: each rank contributes its own).

        The buffers are gathered with one SUM all-reduce, so every rank must call this at the same time and
        the result does not depend on the world size (a checkpoint resumes on any number of ranks).
        """
        total = sum(p.numel() for p in self.params)
        device = self.params[0].device if self.params else torch.device("cpu")
        flat = torch.zeros(total, dtype=torch.float32, device=device)
        offset, views = 0, []
        for p in self.params:
            views.append(flat[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
        for i in self.owned:
            views[i].copy_(self.state[self.params[i]]["momentum_buffer"])
        if self.world_size > 1:
            all_reduce_(flat, "sum")
        hyper = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"hyper": hyper, "momentum_buffers": [v.cpu().clone() for v in views]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        bufs = state["momentum_buffers"]
        if len(bufs) != len(self.params):
            raise ValueError(
                f"Muon state has {len(bufs)} momentum buffers, this optimizer has {len(self.params)} matrices"
            )
        for i, (p, b) in enumerate(zip(self.params, bufs)):
            if tuple(b.shape) != tuple(p.shape):
                raise ValueError(
                    f"Muon momentum buffer {i} has shape {tuple(b.shape)}, expected {tuple(p.shape)}"
                )
        for i in self.owned:
            self.state[self.params[i]]["momentum_buffer"].copy_(bufs[i])
        self.param_groups[0].update(state["hyper"])
