"""The training data loader of the records (SPEC §1.6): shuffled fixed-length windows from memmapped shards.

Rank r owns shards files[r::world_size]. Per shard a random phase and a random permutation of the
window starts phase + k·L; each sequence picks a shard with probability proportional to its remaining
starts and pops one start. When every shard of the rank is exhausted, all are reshuffled (a new epoch).

The resumable state is small: the RNG state at the start of the current epoch regenerates every shard's
permutation exactly, then the current RNG state and the per-shard remaining counts say where we are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgolf.data.shards import read_shard
from pgolf.data.val import load_val_tokens

__all__ = ["ShuffledSequenceLoader", "load_val_tokens", "sequences_per_microbatch"]


def sequences_per_microbatch(train_batch_tokens: int, seq_len: int, world_size: int, grad_accum: int) -> int:
    """Sequences per rank per micro-step: TRAIN_BATCH_TOKENS / (world · grad_accum) / L, which must divide."""
    per_rank = train_batch_tokens // (world_size * grad_accum)
    if per_rank * world_size * grad_accum != train_batch_tokens or per_rank % seq_len:
        raise ValueError(
            f"data.train_batch_tokens={train_batch_tokens} is not a multiple of world_size ({world_size}) × "
            f"grad_accum ({grad_accum}) × data.train_seq_len ({seq_len})"
        )
    return per_rank // seq_len


class ShuffledSequenceLoader:
    """Yields (x, y) int64 batches of `seq_len` tokens (y = x shifted by one) from this rank's shards."""

    def __init__(
        self,
        files: list[str | Path],
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if len(files) < world_size:
            # raised on every rank alike: a check only the shard-less ranks fail leaves the others to crash
            # in their first all-reduce with 'connection closed by peer'
            raise ValueError(
                f"rank {rank}: {len(files)} train shard(s) for {world_size} ranks leave ranks "
                f"{len(files)}..{world_size - 1} without one; use at least as many train shards as ranks"
            )
        self.files = [Path(p) for p in files][rank::world_size]
        self.seq_len, self.rank, self.world_size, self.seed = seq_len, rank, world_size, seed
        self.tokens = [read_shard(p) for p in self.files]  # memmaps, validated once
        self.num_tokens = np.array([len(t) for t in self.tokens], dtype=np.int64)
        # seed 0 = the records' PCG64(rank): the data order does not depend on the training seed.
        self.rng = np.random.Generator(np.random.PCG64(rank if seed == 0 else [seed, rank]))
        self.epoch = -1
        self._new_epoch()
        if self.remaining.sum() == 0:
            short = ", ".join(f"{p.name} ({n} tokens)" for p, n in zip(self.files, self.num_tokens))
            raise ValueError(f"rank {rank}: no shard holds a window of {seq_len} + 1 tokens: {short}")

    def _shard_starts(self, ntok: int) -> np.ndarray:
        """One shard's window starts in random order (consumes the RNG like the records' loader)."""
        L = self.seq_len
        max_phase = min(L - 1, max(0, ntok - L - 1))
        phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
        count = max(0, (ntok - 1 - phase) // L)
        return phase + self.rng.permutation(count).astype(np.int64) * L

    def _new_epoch(self) -> None:
        self.epoch += 1
        self.epoch_rng_state = self.rng.bit_generator.state
        self.starts = [self._shard_starts(int(n)) for n in self.num_tokens]
        self.remaining = np.array([len(s) for s in self.starts], dtype=np.int64)

    def _pick_starts(self, num_seqs: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, start) per sequence, drawn one at a time since each pop changes the odds."""
        shard_ids = np.empty(num_seqs, dtype=np.int64)
        starts = np.empty(num_seqs, dtype=np.int64)
        for i in range(num_seqs):
            total = int(self.remaining.sum())
            if total == 0:
                self._new_epoch()
                total = int(self.remaining.sum())
            si = int(self.rng.choice(len(self.files), p=self.remaining / total))
            self.remaining[si] -= 1
            shard_ids[i] = si
            starts[i] = self.starts[si][self.remaining[si]]  # pop from the end of the permutation
        return shard_ids, starts

    def next_batch(
        self, num_seqs: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x = tokens[s : s+L], y = tokens[s+1 : s+L+1] for `num_seqs` fresh windows, int64 [num_seqs, L]."""
        shard_ids, starts = self._pick_starts(num_seqs)
        window = np.empty((num_seqs, self.seq_len + 1), dtype=np.int64)
        offsets = np.arange(self.seq_len + 1, dtype=np.int64)
        for si in np.unique(shard_ids):
            rows = np.nonzero(shard_ids == si)[0]
            # One fancy-index gather per shard: reads only the pages of the chosen windows.
            window[rows] = self.tokens[si][starts[rows, None] + offsets]
        # Contiguous x and y (callers may .view() them); pinned + async copies on CUDA.
        x = torch.from_numpy(np.ascontiguousarray(window[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(window[:, 1:]))
        device = torch.device(device)
        if device.type == "cuda":
            x = x.pin_memory().to(device, non_blocking=True)
            y = y.pin_memory().to(device, non_blocking=True)
        return x, y

    def _identity(self) -> dict[str, Any]:
        """What a saved state must match to be restored into this loader."""
        return {
            "files": [p.name for p in self.files],
            "num_tokens": self.num_tokens.tolist(),
            "seq_len": self.seq_len,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with the identical data order (plain Python types)."""
        return {
            **self._identity(),
            "epoch": self.epoch,
            "epoch_rng_state": self.epoch_rng_state,
            "rng_state": self.rng.bit_generator.state,
            "remaining": self.remaining.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict() of a loader over the same shards, seq_len, rank, world and seed."""
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ValueError(
                    f"loader state does not match this loader: {key} is {state.get(key)!r}, expected {value!r}"
                )
        # Replay the epoch's shuffles from its RNG state, then jump to the saved position.
        self.rng.bit_generator.state = state["epoch_rng_state"]
        self.epoch = int(state["epoch"]) - 1
        self._new_epoch()
        remaining = np.asarray(state["remaining"], dtype=np.int64)
        if (
            remaining.shape != self.remaining.shape
            or (remaining > self.remaining).any()
            or (remaining < 0).any()
        ):
            raise ValueError(
                f"loader state has remaining counts {remaining.tolist()} outside 0..{self.remaining.tolist()}"
            )
        self.remaining = remaining
        self.rng.bit_generator.state = state["rng_state"]
