"""The output head's loss: logits = h·Wᵀ, softcap c·tanh(z/c), cross-entropy in fp32 (SPEC §2.2).

On a CPU most of a training step used to be this tail: full [N, V] logits in bf16, an fp32 copy, tanh,
log-softmax and their saved activations. `fused_head_loss` instead walks row chunks small enough to stay
in cache: per chunk it computes the logits matmul, the fp32 softcap + log-softmax + NLL and, when a
gradient is needed, the logits gradient and its two matmuls (dh, dW) right away. No [N, V] tensor is ever
materialised and backward only scales the stored gradients by the incoming scalar.

The matmuls run in h's dtype (bf16 under autocast: the same rounding as the plain F.linear path) and the
weight gradient is accumulated across chunks in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows per chunk = CHUNK_ELEMENTS // vocab. CPU: 16 MB of fp32 logits (512 rows at V=8192), the fastest of
# 2^18..2^24 measured at 16,384 x 256 x 8192 (smaller chunks make the per-chunk matmuls and the dW
# read-modify-write dominate). GPUs prefer few big kernels.
CPU_CHUNK_ELEMENTS = 1 << 22
GPU_CHUNK_ELEMENTS = 1 << 27


def softcap_logits(logits: Tensor, softcap: float) -> Tensor:
    """fp32 logits, capped as c·tanh(z/c) (softcap 0 = off)."""
    logits = logits.float()
    return softcap * torch.tanh(logits / softcap) if softcap > 0 else logits


def chunk_rows(num_rows: int, vocab: int, device: torch.device) -> int:
    elements = GPU_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS
    return max(1, min(num_rows, elements // vocab))


def _chunk_nll_and_grad(
    logits: Tensor, targets: Tensor, softcap: float, want_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Per-row NLL of one chunk of raw logits and, optionally, d(sum NLL)/d(raw logits) in fp32."""
    z = logits.float()
    if softcap > 0:
        t = torch.tanh(z / softcap)
        s = softcap * t
    else:
        t, s = None, z
    lse = torch.logsumexp(s, dim=-1)
    nll = lse - s.gather(1, targets[:, None]).squeeze(1)
    if not want_grad:
        return nll, None
    grad = torch.exp(s - lse[:, None])  # softmax of the capped logits
    grad[torch.arange(grad.size(0), device=grad.device), targets] -= 1.0
    if t is not None:
        grad *= 1.0 - t * t  # d(c·tanh(z/c))/dz
    return nll, grad


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, h: Tensor, weight: Tensor, targets: Tensor, softcap: float, grad_enabled: bool
    ) -> Tensor:
        num_rows, vocab = h.size(0), weight.size(0)
        # needs_input_grad is True even under no_grad; the caller passes the real grad mode.
        want_h = grad_enabled and ctx.needs_input_grad[0]
        want_w = grad_enabled and ctx.needs_input_grad[1]
        w = weight.to(h.dtype)
        step = chunk_rows(num_rows, vocab, h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w else None
        for start in range(0, num_rows, step):
            h_c = h[start : start + step]
            nll, g = _chunk_nll_and_grad(
                h_c @ w.t(), targets[start : start + step], softcap, want_h or want_w
            )
            total = total + nll.sum()
            if g is not None:
                g = (g / num_rows).to(h.dtype)  # the loss is the mean over rows
                if grad_h is not None:
                    grad_h[start : start + step] = g @ w
                if grad_w is not None:
                    grad_w += (g.t() @ h_c).float()
        ctx.save_for_backward(
            grad_h if grad_h is not None else h.new_empty(0),
            grad_w.to(weight.dtype) if grad_w is not None else weight.new_empty(0),
        )
        return total / num_rows

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        dw = grad_w * grad_out.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None


def fused_head_loss(h: Tensor, weight: Tensor, targets: Tensor, softcap: float) -> Tensor:
    """Mean cross-entropy of softcap(h·weightᵀ) against targets; h [N, d], weight [V, d], targets [N]."""
    if h.dim() != 2 or targets.shape != h.shape[:1]:
        raise ValueError(
            f"expected h [N, d] and targets [N]; got {tuple(h.shape)} and {tuple(targets.shape)}"
        )
    return _FusedHeadLoss.apply(h, weight, targets, float(softcap), torch.is_grad_enabled())


def head_nll(h: Tensor, weight: Tensor, targets: Tensor, softcap: float) -> Tensor:
    """Per-row fp32 NLL [N] of softcap(h·weightᵀ), chunked so eval never holds [N, V] logits.

    Differentiable (plain autograd per chunk) when gradients are enabled.
    """
    w = weight.to(h.dtype)
    step = chunk_rows(h.size(0), weight.size(0), h.device)
    parts = []
    for start in range(0, h.size(0), step):
        capped = softcap_logits(h[start : start + step] @ w.t(), softcap)
        parts.append(F.cross_entropy(capped, targets[start : start + step], reduction="none"))
    return torch.cat(parts)
