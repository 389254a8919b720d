"""Causal self-attention of the SP8192 stack (SPEC §2.4): GQA, QK RMS-norm, partial RoPE, per-head q_gain,
XSA, and the FlashAttention-3 / SDPA backend choice.

Tensors inside this module use the [B, T, heads, head_dim] layout (FlashAttention-3's); SDPA gets a
transposed view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.config.schema import ModelConfig
from pgolf.model.layers import CastedLinear

try:  # FlashAttention-3 (Hopper wheels only); absent on CPU machines.
    from flash_attn_interface import flash_attn_func  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None

# Sequences longer than this get an NTK-style rescale of the RoPE base (records: fixed 2048).
ROPE_NTK_BASE_LEN = 2048


def resolve_backend(requested: str, device_type: str) -> str:
    """'flash' or 'sdpa' for an attention call: auto picks FA3 when importable and on CUDA."""
    if requested == "sdpa":
        return "sdpa"
    if requested == "flash":
        if flash_attn_func is None:
            raise RuntimeError(
                "model.attention_backend='flash' but flash_attn_interface (FlashAttention-3) is not "
                "importable; install it or use attention_backend='auto' or 'sdpa'"
            )
        return "flash"
    if requested == "auto":
        return "flash" if flash_attn_func is not None and device_type == "cuda" else "sdpa"
    raise ValueError(f"model.attention_backend={requested!r}; expected one of auto, flash, sdpa")


# CPU inference: SDPA's CPU kernel does not skip the masked upper triangle at T = 512 (no-grad
# [32,4,512,24] bf16: causal 33.3 ms, full 34.0 ms). Splitting the queries into blocks of this many, each
# over the keys it can see, removes part of that work. cpu-golf shapes ([B,512,4,24], ms per sequence and
# layer, best of 5): B=32 bf16 1.32 -> 1.08, fp32 1.02 -> 0.81; blocks of 64 or 128 gained less at B=32 and
# cost up to 40% at B=1, where 256 is neutral. Training keeps the single call: isolated fwd+bwd at B=16 bf16
# ran 64 -> 57 ms with blocks of 256, but the split is not measured on the train step yet.
CPU_QUERY_BLOCK = 256


def causal_attention(q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
    """Causal softmax attention, scale 1/sqrt(head_dim). q [B,Tq,H,D], k/v [B,T,Hkv,D] -> [B,Tq,H,D].

    Tq <= T: the queries are the last Tq positions (query i sits at position T - Tq + i and sees keys
    0..T - Tq + i), FlashAttention's bottom-right alignment. SDPA's is_causal aligns top-left, so a
    shorter query block gets an explicit mask.
    """
    if backend == "flash":
        out = flash_attn_func(q, k, v, causal=True)
        # Some FA3 releases return (out, softmax_lse).
        return out[0] if isinstance(out, tuple) else out
    off = k.size(1) - q.size(1)
    inference = not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    if q.device.type == "cpu" and inference and q.size(1) > CPU_QUERY_BLOCK:
        return _block_causal(q, k, v, off, CPU_QUERY_BLOCK)
    return _sdpa(q, k, v, off)


def _block_causal(q: Tensor, k: Tensor, v: Tensor, off: int, block: int) -> Tensor:
    """`_sdpa(q, k, v, off)` computed `block` queries at a time, each block over the keys it can see."""
    outs = [
        _sdpa(q[:, a : a + block], k[:, : off + a + block], v[:, : off + a + block], off + a)
        for a in range(0, q.size(1), block)
    ]
    return torch.cat(outs, dim=1)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, off: int) -> Tensor:
    """SDPA of queries at positions off.. over keys 0..: query i sees keys 0..off + i."""
    q_len, k_len = q.size(1), k.size(1)
    mask = None
    if off:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(off)
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=mask is None,
        enable_gqa=q.size(2) != k.size(2),
    )
    return y.transpose(1, 2)


def rope_tables(seq_len: int, rot_dims: int, base: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos/sin [T, rot_dims/2] in fp32; base rescaled NTK-style when seq_len > ROPE_NTK_BASE_LEN."""
    if seq_len > ROPE_NTK_BASE_LEN and rot_dims > 2:
        base = base * (seq_len / ROPE_NTK_BASE_LEN) ** (rot_dims / (rot_dims - 2))
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
        self.backend = cfg.attention_backend
        resolve_backend(self.backend, "cpu")  # fail at build time when 'flash' cannot be honoured

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], first: int = 0) -> Tensor:
        """Attention output [B, T - first, dim] of positions first.. (keys and values: all of x)."""
        bsz, seq, _ = x.shape
        q = self.c_q(x[:, first:]).view(bsz, seq - first, self.num_heads, self.head_dim)
        k = self.c_k(x).view(bsz, seq, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(bsz, seq, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = F.rms_norm(q, (self.head_dim,))
            k = F.rms_norm(k, (self.head_dim,))
        cos, sin = rope
        q, k = apply_rope(q, cos[first:], sin[first:]), apply_rope(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = causal_attention(q, k, v, resolve_backend(self.backend, x.device.type))
        if self.use_xsa:
            y = exclusive_self_attention(y, v[:, first:])
        return self.proj(y.reshape(bsz, seq - first, self.num_heads * self.head_dim))
