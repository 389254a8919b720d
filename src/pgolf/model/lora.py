"""Per-document low-rank adapters for the model's one forward (SPEC-1855 part B §3.3).

A `LoraSet` holds, for a batch of B documents (row b of every forward = document b), one adapter per
virtual layer slot (a looped block gets one per visit) on Q, K, V, O and the MLP, plus one on the output
head: Δ(x) = (α/r)·B(Ax) with A [B, r, in] ~ U(±1/√in) and B [B, out, r] = 0, so a fresh set changes
nothing. The model adds the deltas inside its own layers (`GPT.hidden(..., lora=...)`): Q/K/V read the
normed block input, O reads it too and is added after the output projection, the MLP adapter reads the
normed MLP input and is added to the MLP output, the head adapter reads the final hidden state and is
added to the logits before the softcap. Every gate of the plain path applies unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class BatchedLora(nn.Module):
    """Δ(x) = scale·B(Ax) with one (A, B) per batch row; x [B, T, in] -> [B, T, out]."""

    def __init__(self, batch: int, in_features: int, out_features: int, rank: int, scale: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(batch, rank, in_features))
        self.B = nn.Parameter(torch.zeros(batch, out_features, rank))
        self.scale = scale

    @torch.no_grad()
    def reset_A(self, generator: torch.Generator | None = None) -> None:
        bound = 1.0 / math.sqrt(self.A.size(-1))
        self.A.copy_(torch.rand(self.A.shape, generator=generator) * (2 * bound) - bound)

    def forward(self, x: Tensor) -> Tensor:
        return _delta(x, self.A, self.B, self.scale)


def _delta(x: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    h = torch.bmm(x, a.transpose(1, 2).to(x.dtype))
    return torch.bmm(h, b.transpose(1, 2).to(x.dtype)) * scale


class _RowsOf:
    """Some rows of a BatchedLora, gathered at each call (so they follow optimizer steps); gradients flow
    back to those rows only."""

    def __init__(self, lora: BatchedLora, rows: Tensor) -> None:
        self.lora, self.rows = lora, rows

    def __call__(self, x: Tensor) -> Tensor:
        return _delta(x, self.lora.A[self.rows], self.lora.B[self.rows], self.lora.scale)


class LayerLora(nn.Module):
    """The adapters of one virtual layer slot."""

    def __init__(self, batch: int, dim: int, q_out: int, kv_out: int, rank: int, scale: float) -> None:
        super().__init__()
        self.q = BatchedLora(batch, dim, q_out, rank, scale)
        self.k = BatchedLora(batch, dim, kv_out, rank, scale)
        self.v = BatchedLora(batch, dim, kv_out, rank, scale)
        self.o = BatchedLora(batch, dim, dim, rank, scale)
        self.mlp = BatchedLora(batch, dim, dim, rank, scale)


class LoraSet(nn.Module):
    """Adapters for `batch` documents on every virtual layer slot of `model` (its current looping) and
    its head. `slots[i]` belongs to the i-th virtual layer of the forward."""

    def __init__(self, model: nn.Module, batch: int, rank: int, alpha: float, seed: int = 0) -> None:
        super().__init__()
        if batch <= 0 or rank <= 0:
            raise ValueError(f"LoRA batch={batch} and rank={rank} must be positive")
        cfg = model.cfg
        head_dim = cfg.model_dim // cfg.num_heads
        scale = alpha / rank
        self.batch, self.looping = batch, model.looping
        num_slots = len(model.layer_steps())
        self.slots = nn.ModuleList(
            LayerLora(batch, cfg.model_dim, cfg.num_heads * head_dim, cfg.num_kv_heads * head_dim, rank, scale)
            for _ in range(num_slots)
        )
        self.head = BatchedLora(batch, cfg.model_dim, cfg.vocab_size, rank, scale)
        device = next(model.parameters()).device
        self.reset_A(torch.Generator().manual_seed(seed))
        self.to(device)

    def adapters(self) -> list[BatchedLora]:
        return [m for m in self.modules() if isinstance(m, BatchedLora)]

    @torch.no_grad()
    def reset_A(self, generator: torch.Generator | None = None) -> None:
        for m in self.adapters():
            m.reset_A(generator)

    @torch.no_grad()
    def reset_B(self) -> None:
        for m in self.adapters():
            m.B.zero_()

    def rows(self, rows: Tensor) -> LoraRows:
        """The adapters of documents `rows` only, for a forward of len(rows) rows (the others sit out)."""
        return LoraRows(self, rows)


class LoraRows:
    """A LoraSet restricted to some of its rows; the model reads it like a LoraSet."""

    def __init__(self, lora: LoraSet, rows: Tensor) -> None:
        self.batch = int(rows.numel())
        self.slots = [SlotRows(slot, rows) for slot in lora.slots]
        self.head = _RowsOf(lora.head, rows)


class SlotRows:
    def __init__(self, slot: LayerLora, rows: Tensor) -> None:
        self.q, self.k, self.v = _RowsOf(slot.q, rows), _RowsOf(slot.k, rows), _RowsOf(slot.v, rows)
        self.o, self.mlp = _RowsOf(slot.o, rows), _RowsOf(slot.mlp, rows)


Adapters = LoraSet | LoraRows  # what GPT.hidden accepts as `lora`
SlotAdapters = LayerLora | SlotRows  # one virtual layer's part of it
