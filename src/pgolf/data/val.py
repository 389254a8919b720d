"""The validation token stream (SPEC §1.4): all val shards in order, truncated to whole windows + 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pgolf.data.shards import list_shards, read_shard


def val_stream_length(num_tokens: int, seq_len: int) -> int:
    """((N - 1) // seq_len) * seq_len + 1: every target of a whole window, the tail dropped."""
    if num_tokens < seq_len + 1:
        raise ValueError(f"validation stream has {num_tokens} tokens, fewer than one window of {seq_len} + 1")
    return ((num_tokens - 1) // seq_len) * seq_len + 1


def load_val_tokens(data_dir: str | Path, seq_len: int, max_tokens: int = 0) -> torch.Tensor:
    """Concatenate `fineweb_val_*.bin` (sorted), optionally cut to `max_tokens`, then to whole windows + 1."""
    parts = [np.asarray(read_shard(p), dtype=np.int64) for p in list_shards(data_dir, "val")]
    tokens = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if max_tokens > 0:
        tokens = tokens[:max_tokens]
    return torch.from_numpy(np.ascontiguousarray(tokens[: val_stream_length(len(tokens), seq_len)]))
