"""Triton kernels of the fused softcapped cross-entropy (pgolf.model.loss.softcapped_cross_entropy) on CUDA.

One program per token row walks the vocabulary in blocks: the forward keeps an online max and sum of
exp(u) with u = 2c·σ(2z/c) (= c·tanh(z/c) + c) and writes the row's loss and LSE; the backward recomputes
σ from the raw logits and writes g·(exp(u − LSE) − 1[j = y])·4σ(1 − σ). Importing this module raises
ImportError where Triton is absent (pgolf.model.loss then uses its vocabulary-block path). It runs only
on a GPU; on a CPU machine it is checked under Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024  # vocabulary columns per step (8 steps at V = 8192)
NEG = tl.constexpr(-1.0e30)  # a finite "minus infinity": masked lanes must not make the online rescale NaN


@triton.jit
def _forward_kernel(z_ptr, tgt_ptr, loss_ptr, lse_ptr, stride, softcap,
                    VOCAB: tl.constexpr, CAPPED: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride
    run_max = tl.full([BLOCK_V], NEG, tl.float32)
    run_sum = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, VOCAB, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < VOCAB, other=0.0).to(tl.float32)
        if CAPPED:
            z = 2.0 * softcap * tl.sigmoid(z * (2.0 / softcap))
        u = tl.where(cols < VOCAB, z, NEG)
        new_max = tl.maximum(run_max, u)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(u - new_max)
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    lse = row_max + tl.log(tl.sum(run_sum * tl.exp(run_max - row_max), axis=0))
    target = tl.load(tgt_ptr + row)
    u_target = tl.load(z_row + target).to(tl.float32)
    if CAPPED:
        u_target = 2.0 * softcap * tl.sigmoid(u_target * (2.0 / softcap))
    tl.store(loss_ptr + row, lse - u_target)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _backward_kernel(z_ptr, tgt_ptr, lse_ptr, scale_ptr, grad_ptr, stride, softcap,
                     VOCAB: tl.constexpr, CAPPED: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    z_row, grad_row = z_ptr + row * stride, grad_ptr + row * stride
    lse = tl.load(lse_ptr + row)
    target = tl.load(tgt_ptr + row)
    scale = tl.load(scale_ptr)
    for start in range(0, VOCAB, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < VOCAB
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        if CAPPED:
            sig = tl.sigmoid(z * (2.0 / softcap))
            p = tl.exp(2.0 * softcap * sig - lse)
            p = tl.where(cols == target, p - 1.0, p) * (4.0 * sig * (1.0 - sig))
        else:
            p = tl.exp(z - lse)
            p = tl.where(cols == target, p - 1.0, p)
        tl.store(grad_row + cols, (p * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def forward(logits: Tensor, targets: Tensor, softcap: float) -> tuple[Tensor, Tensor]:
    """Per-row fp32 loss and LSE of the capped logits [N, V] (rows contiguous)."""
    logits = logits.contiguous()
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    _forward_kernel[(rows,)](logits, targets.contiguous(), loss, lse, logits.stride(0), float(softcap),
                             VOCAB=vocab, CAPPED=softcap > 0, BLOCK_V=BLOCK, num_warps=4)  # fmt: skip
    return loss, lse


def backward(logits: Tensor, targets: Tensor, lse: Tensor, scale: Tensor, softcap: float) -> Tensor:
    """scale·d(Σ loss)/d(logits), in the logits' dtype; scale is a 1-element fp32 tensor (no host sync)."""
    logits = logits.contiguous()
    grad = torch.empty_like(logits)
    rows, vocab = logits.shape
    _backward_kernel[(rows,)](logits, targets.contiguous(), lse, scale, grad, logits.stride(0), float(softcap),
                              VOCAB=vocab, CAPPED=softcap > 0, BLOCK_V=BLOCK, num_warps=4)  # fmt: skip
    return grad
