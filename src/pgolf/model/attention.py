"""Causal self-attention of the SP8192 stack (SPEC §2.4): GQA, QK RMS-norm, partial RoPE, per-head q_gain,
XSA. The kernel that runs is pgolf.model.backend's choice.

Tensors inside this module use the [B, T, heads, head_dim] layout (FlashAttention's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.config.schema import ModelConfig
from pgolf.model.backend import Documents, causal_attention
from pgolf.model.layers import CastedLinear

if TYPE_CHECKING:
    from pgolf.model.lora import SlotAdapters


@dataclass(frozen=True)
class AttnInputs:
    """What every attention layer of one forward reads, built once by the model per forward."""

    cos: Tensor  # [T, rot_dims/2] fp32 RoPE tables of the whole row
    sin: Tensor
    backend: str  # 'flash' | 'sdpa' (pgolf.model.backend.resolve_backend)
    docs: Documents | None = None  # per-document attention; None = one causal sequence per row


def rope_tables(
    seq_len: int, rot_dims: int, base: float, device: torch.device, ntk_len: int
) -> tuple[Tensor, Tensor]:
    """cos/sin [T, rot_dims/2] in fp32; the base is rescaled NTK-style, base·(T/ntk_len)^(r/(r−2)), when
    seq_len > ntk_len > 0 (the records' rule with ntk_len = their train_seq_len; #1855's YaRN switch)."""
    if 0 < ntk_len < seq_len and rot_dims > 2:
        base = base * (seq_len / ntk_len) ** (rot_dims / (rot_dims - 2))
    half = rot_dims // 2
    inv_freq = 1.0 / base ** (torch.arange(half, device=device, dtype=torch.float32) * 2.0 / rot_dims)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first 2*cos.size(-1) dims of x [B,T,H,D] in the half-split layout; the rest pass through.

    With a = x[..., :r/2], b = x[..., r/2:r]: a' = a·cos + b·sin, b' = −a·sin + b·cos.
    """
    half = cos.size(-1)
    cos = cos[None, :, None, :].to(x.dtype)
    sin = sin[None, :, None, :].to(x.dtype)
    a, b, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((a * cos + b * sin, b * cos - a * sin, rest), dim=-1)


def exclusive_self_attention(y: Tensor, v: Tensor) -> Tensor:
    """XSA: remove from each head's output its component along the token's own value direction.

    y [B,T,H,D] is grouped by KV head (GQA: H/Hkv query heads share one v); v [B,T,Hkv,D].
    """
    bsz, seq, heads, dim = y.shape
    kv_heads = v.size(2)
    y = y.view(bsz, seq, kv_heads, heads // kv_heads, dim)
    v_dir = F.normalize(v, dim=-1).unsqueeze(3)
    y = y - (y * v_dir).sum(dim=-1, keepdim=True) * v_dir
    return y.view(bsz, seq, heads, dim)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, use_xsa: bool) -> None:
        super().__init__()
        dim, self.num_heads, self.num_kv_heads = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
        self.head_dim = dim // cfg.num_heads
        self.rot_dims = cfg.rope_dims or self.head_dim  # 0 = rotate every head dim (baseline)
        if self.rot_dims % 2 or self.rot_dims > self.head_dim:
            raise ValueError(f"model.rope_dims={cfg.rope_dims} must be even and <= head_dim={self.head_dim}")
        self.c_q = CastedLinear(dim, self.num_heads * self.head_dim)
        self.c_k = CastedLinear(dim, self.num_kv_heads * self.head_dim)
        self.c_v = CastedLinear(dim, self.num_kv_heads * self.head_dim)
        self.proj = CastedLinear(self.num_heads * self.head_dim, dim)
        self.q_gain = nn.Parameter(torch.full((self.num_heads,), float(cfg.qk_gain_init)))
        self.qk_norm = cfg.qk_norm
        self.use_xsa = use_xsa
        # Sparse output gate (#1855): y_h ← σ(s·W_h·x[:window])·y_h; W = 0 at init, so every gate is 0.5.
        self.attn_gate_w = (
            nn.Parameter(torch.zeros(self.num_heads, cfg.gate_window)) if cfg.sparse_attn_gate else None
        )
        self.gate_scale = cfg.sparse_attn_gate_scale

    def forward(self, x: Tensor, ctx: AttnInputs, tail: int = 0, lora: SlotAdapters | None = None) -> Tensor:
        """Attention output [B, T - tail, dim] of positions tail.. (keys and values: all of x).

        tail > 0 is for a model's last layer only, whose other positions nothing reads. `lora`: per-row
        adapters whose deltas join Q, K, V (before the norms and RoPE) and the output projection.
        """
        bsz, seq, _ = x.shape
        xq = x[:, tail:]
        q, k, v = self.c_q(xq), self.c_k(x), self.c_v(x)
        if lora is not None:
            q, k, v = q + lora.q(xq), k + lora.k(x), v + lora.v(x)
        q = q.view(bsz, seq - tail, self.num_heads, self.head_dim)
        k = k.view(bsz, seq, self.num_kv_heads, self.head_dim)
        v = v.view(bsz, seq, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = F.rms_norm(q, (self.head_dim,))
            k = F.rms_norm(k, (self.head_dim,))
        q, k = apply_rope(q, ctx.cos[tail:], ctx.sin[tail:]), apply_rope(k, ctx.cos, ctx.sin)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = causal_attention(q, k, v, ctx.backend, ctx.docs)
        if self.use_xsa:
            y = exclusive_self_attention(y, v[:, tail:])
        if self.attn_gate_w is not None:
            window = self.attn_gate_w.size(1)
            logit = F.linear(x[:, tail:, :window], self.attn_gate_w.to(x.dtype))  # [B, T - tail, heads]
            y = y * torch.sigmoid(self.gate_scale * logit)[..., None]
        out = self.proj(y.reshape(bsz, seq - tail, self.num_heads * self.head_dim))
        return out if lora is None else out + lora.o(xq)
