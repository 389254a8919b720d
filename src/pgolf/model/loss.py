"""The output head's loss: logits = h·Wᵀ, softcap c·tanh(z/c), cross-entropy in fp32 (SPEC §2.2).

On a CPU most of a training step used to be this tail: full [N, V] logits in bf16, an fp32 copy, tanh,
log-softmax and their saved activations. `fused_head_loss` instead walks row chunks small enough to stay
in cache: per chunk it computes the logits matmul, the fp32 softcap + log-softmax + NLL and, when a
gradient is needed, the logits gradient and its two matmuls (dh, dW) right away. No [N, V] tensor is ever
materialised and backward only scales the stored gradients by the incoming scalar.

The matmuls run in h's dtype (bf16 under autocast: the same rounding as the plain F.linear path) and the
weight gradient is accumulated across chunks in fp32.

`softcapped_cross_entropy` is #1855's form (model.fused_ce): the head matmul runs as one op and the loss
takes the raw [N, V] logits, walking the vocabulary in blocks (a Triton kernel per row on CUDA) so that
neither the capped fp32 copy nor a saved tanh output exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # the CUDA kernels of softcapped_cross_entropy; absent where Triton is not installed
    from pgolf.model import ce_triton as triton_ce
except ImportError:  # pragma: no cover - depends on the machine
    triton_ce = None

# Rows per chunk = CHUNK_ELEMENTS // vocab. CPU: 16 MB of fp32 logits (512 rows at V=8192); smaller chunks
# make the per-chunk matmuls and the dW read-modify-write dominate (docs/performance.md). GPUs prefer few big
# kernels.
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


# ----------------------------------------------------------------------------- fused softcapped CE (#1855)
# CPU tiles of ROW_BLOCK rows x VOCAB_BLOCK columns: the fp32 temporaries (1 MB) stay in cache and no
# [N, V] fp32 tensor is ever made.
ROW_BLOCK = 128
VOCAB_BLOCK = 2048


def _capped(z: Tensor, softcap: float) -> Tensor:
    """c·tanh(z/c) + c written as 2c·σ(2z/c) (fp32; the constant c cancels in the loss), or z when off."""
    return 2.0 * softcap * torch.sigmoid(z * (2.0 / softcap)) if softcap > 0 else z


def _tiles(rows: int, vocab: int):
    for r in range(0, rows, ROW_BLOCK):
        for a in range(0, vocab, VOCAB_BLOCK):
            yield slice(r, r + ROW_BLOCK), slice(a, a + VOCAB_BLOCK)


def _ce_forward_blocks(z: Tensor, targets: Tensor, softcap: float) -> tuple[Tensor, Tensor]:
    """Per-row loss and log-sum-exp of the capped logits; the LSE of each tile is folded into its rows'
    running LSE (logaddexp), so a row is never held whole in fp32."""
    lse = torch.full((z.size(0),), float("-inf"), dtype=torch.float32, device=z.device)
    for r, a in _tiles(*z.shape):
        lse[r] = torch.logaddexp(lse[r], torch.logsumexp(_capped(z[r, a].float(), softcap), dim=1))
    return lse - _capped(z.gather(1, targets[:, None]).squeeze(1).float(), softcap), lse


def _ce_backward_blocks(z: Tensor, targets: Tensor, lse: Tensor, scale: Tensor, softcap: float) -> Tensor:
    """d(scale·Σ loss)/dz = scale·(softmax(u) − onehot)·(1 − tanh²(z/c)), tile by tile, in z's dtype."""
    grad = torch.empty_like(z)
    for r, a in _tiles(*z.shape):
        if softcap > 0:
            sig = torch.sigmoid(z[r, a].float() * (2.0 / softcap))
            p = torch.exp_((2.0 * softcap) * sig - lse[r, None])
        else:
            p = torch.exp(z[r, a].float() - lse[r, None])
        local = targets[r] - a.start
        inside = torch.nonzero((local >= 0) & (local < p.size(1))).squeeze(1)
        p[inside, local[inside]] -= 1.0
        if softcap > 0:
            p.mul_(torch.addcmul(sig, sig, sig, value=-1.0))  # σ(1 − σ) = (1 − tanh²(z/c)) / 4
            grad[r, a] = p.mul_(4.0 * scale)
        else:
            grad[r, a] = p.mul_(scale)
    return grad


class _SoftcappedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, softcap: float) -> Tensor:  # type: ignore[override]
        if logits.is_cuda and triton_ce is not None:
            loss, lse = triton_ce.forward(logits, targets, softcap)
        else:
            loss, lse = _ce_forward_blocks(logits, targets, softcap)
        ctx.softcap = softcap
        ctx.save_for_backward(logits, targets, lse)
        return loss.mean()

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        logits, targets, lse = ctx.saved_tensors
        scale = (grad_out.float() / logits.size(0)).reshape(1)  # the loss is the mean over rows
        if logits.is_cuda and triton_ce is not None:
            grad = triton_ce.backward(logits, targets, lse, scale, ctx.softcap)
        else:
            grad = _ce_backward_blocks(logits, targets, lse, scale, ctx.softcap)
        return grad, None, None


def softcapped_cross_entropy(logits: Tensor, targets: Tensor, softcap: float) -> Tensor:
    """Mean fp32 cross-entropy of softcap·tanh(logits/softcap) against targets, from the raw logits [N, V]
    (any float dtype): saves only the logits, targets and per-row LSE, never an fp32 [N, V] copy. A Triton
    kernel per row on CUDA when Triton is importable, vocabulary blocks otherwise."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [N, V] and targets [N]; got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    return _SoftcappedCE.apply(logits, targets, float(softcap))
