"""The attention kernel: which one runs is decided here and nowhere else.

FlashAttention (FA3's `flash_attn_interface` on Hopper, else FA2's `flash_attn`) on CUDA when importable,
PyTorch SDPA otherwise. `model.attention_backend` asks for auto | flash | sdpa; `override_backend` lets a
test (or a debugging session) force one for every model at once. Tensors use FlashAttention's
[B, T, heads, head_dim] layout; SDPA gets a transposed view.

Per-document attention (`Documents`): no query attends to a key of another document of its packed row.
FlashAttention runs its varlen kernel over the flattened rows; SDPA gets a block-diagonal causal mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # FlashAttention-3 (Hopper wheels)
    from flash_attn_interface import (  # type: ignore[import-not-found]
        flash_attn_func,
        flash_attn_varlen_func,
    )
except ImportError:  # pragma: no cover - depends on the machine
    try:  # FlashAttention-2: same [B, T, H, D] layout, causal mask aligned bottom-right (>= 2.1)
        from flash_attn import flash_attn_func, flash_attn_varlen_func  # type: ignore[import-not-found]
    except ImportError:
        flash_attn_func = flash_attn_varlen_func = None

BACKENDS = ("auto", "flash", "sdpa")
_override: str | None = None  # set by override_backend: wins over every model's attention_backend


@contextmanager
def override_backend(name: str | None) -> Iterator[None]:
    """Force `name` ('flash' | 'sdpa'; None = follow the config) for every attention call inside."""
    global _override
    if name not in (None, "flash", "sdpa"):
        raise ValueError(f"attention backend override {name!r}; expected 'flash', 'sdpa' or None")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def resolve_backend(requested: str, device_type: str) -> str:
    """'flash' or 'sdpa': auto picks FlashAttention when importable and on CUDA."""
    requested = _override or requested
    if requested not in BACKENDS:
        raise ValueError(f"model.attention_backend={requested!r}; expected one of {', '.join(BACKENDS)}")
    if requested == "flash" and flash_attn_func is None:
        raise RuntimeError(
            "model.attention_backend='flash' but FlashAttention (flash_attn_interface or flash_attn) is not "
            "importable; install it or use attention_backend='auto' or 'sdpa'"
        )
    if requested == "auto":
        return "flash" if flash_attn_func is not None and device_type == "cuda" else "sdpa"
    return requested


@dataclass(frozen=True)
class Documents:
    """The documents of each packed row, derived once per forward from where BOS sits.

    index [B, T]: how many BOS tokens precede-or-are each position in its row (equal = same document;
    a row's tokens before its first BOS are one document too). cu_seqlens/max_len: FlashAttention's varlen
    description of the same segments over the flattened B*T tokens (rows always start a segment).
    """

    index: Tensor
    cu_seqlens: Tensor | None = None
    max_len: int = 0

    @staticmethod
    def from_ids(ids: Tensor, bos_id: int, backend: str) -> Documents:
        is_bos = ids == bos_id
        index = is_bos.cumsum(dim=1)
        if backend != "flash":
            return Documents(index)
        starts = is_bos.clone()
        starts[:, 0] = True
        flat = torch.nonzero(starts.reshape(-1)).squeeze(1)
        total = torch.tensor([ids.numel()], device=ids.device, dtype=flat.dtype)
        # max_len only sizes the kernel's grid: the row length bounds every segment without a host sync.
        return Documents(index, torch.cat((flat, total)).to(torch.int32), ids.size(1))


# CPU inference: SDPA's CPU kernel does not skip the masked upper triangle, so the queries are split into
# blocks of this many, each over the keys it can see; smaller blocks cost more at batch 1. Training keeps the
# single call. Measurements: docs/performance.md.
CPU_QUERY_BLOCK = 256


def causal_attention(q: Tensor, k: Tensor, v: Tensor, backend: str, docs: Documents | None = None) -> Tensor:
    """Causal softmax attention, scale 1/sqrt(head_dim). q [B,Tq,H,D], k/v [B,T,Hkv,D] -> [B,Tq,H,D].

    Tq <= T: the queries are the last Tq positions (query i sits at position T - Tq + i and sees keys
    0..T - Tq + i), FlashAttention's bottom-right alignment. With `docs`, a query sees only the keys of its
    own document.
    """
    off = k.size(1) - q.size(1)
    if backend == "flash":
        if docs is None:
            out = flash_attn_func(q, k, v, causal=True)
            return out[0] if isinstance(out, tuple) else out  # some releases return (out, lse)
        if off == 0:
            return _flash_varlen(q, k, v, docs)
        # A scored tail with documents: the varlen kernel would need per-document query counts, some
        # zero; the masked SDPA kernel computes the same thing.
    doc_q, doc_k = (None, None) if docs is None else (docs.index[:, off:], docs.index)
    inference = not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    if q.device.type == "cpu" and inference and q.size(1) > CPU_QUERY_BLOCK:
        return _block_causal(q, k, v, off, doc_q, doc_k)
    return _sdpa(q, k, v, off, doc_q, doc_k)


def _flash_varlen(q: Tensor, k: Tensor, v: Tensor, docs: Documents) -> Tensor:
    bsz, seq = q.shape[:2]
    cu, n = docs.cu_seqlens, docs.max_len
    out = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, n, n, causal=True)
    out = out[0] if isinstance(out, tuple) else out
    return out.view(bsz, seq, *out.shape[1:])


def _block_causal(
    q: Tensor, k: Tensor, v: Tensor, off: int, doc_q: Tensor | None, doc_k: Tensor | None
) -> Tensor:
    """`_sdpa(q, k, v, off, ...)` computed CPU_QUERY_BLOCK queries at a time, each over the keys it can see."""
    block = CPU_QUERY_BLOCK
    outs = []
    for a in range(0, q.size(1), block):
        keys = off + a + block
        dq = None if doc_q is None else doc_q[:, a : a + block]
        dk = None if doc_k is None else doc_k[:, :keys]
        outs.append(_sdpa(q[:, a : a + block], k[:, :keys], v[:, :keys], off + a, dq, dk))
    return torch.cat(outs, dim=1)


def _sdpa(
    q: Tensor, k: Tensor, v: Tensor, off: int, doc_q: Tensor | None = None, doc_k: Tensor | None = None
) -> Tensor:
    """SDPA of queries at positions off.. over keys 0..: query i sees keys 0..off + i (of its document)."""
    q_len, k_len = q.size(1), k.size(1)
    mask = None
    if off or doc_q is not None:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(off)
        if doc_q is not None:
            mask = (mask & (doc_q[:, :, None] == doc_k[:, None, :])).unsqueeze(1)  # [B, 1, Tq, T]
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=mask is None,
        enable_gqa=q.size(2) != k.size(2),
    )
    return y.transpose(1, 2)
