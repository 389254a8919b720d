"""The validation token stream (SPEC §1.4): all val shards in order, truncated to whole windows + 1.

A CaseOps data folder also holds a byte sidecar per val shard (SPEC-1855 §1.3): `load_val_stream` returns
it cut exactly like the tokens, after checking that it pairs with them (one count per token, the stream
starts with BOS, BOS costs 0 bytes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pgolf.data.shards import ShardError, list_shards, paired_sidecars, read_shard

BOS_ID = 1


def val_stream_length(num_tokens: int, seq_len: int) -> int:
    """((N - 1) // seq_len) * seq_len + 1: every target of a whole window, the tail dropped."""
    if num_tokens < seq_len + 1:
        raise ValueError(f"validation stream has {num_tokens} tokens, fewer than one window of {seq_len} + 1")
    return ((num_tokens - 1) // seq_len) * seq_len + 1


def _cut(arrays: list[np.ndarray], seq_len: int, max_tokens: int, dtype=np.int64) -> torch.Tensor:
    """Concatenate, optionally cut to `max_tokens`, then to whole windows + 1."""
    stream = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    if max_tokens > 0:
        stream = stream[:max_tokens]
    stream = stream[: val_stream_length(len(stream), seq_len)]
    return torch.from_numpy(np.ascontiguousarray(stream, dtype=dtype))


def load_val_tokens(data_dir: str | Path, seq_len: int, max_tokens: int = 0) -> torch.Tensor:
    """Concatenate `fineweb_val_*.bin` (sorted), optionally cut to `max_tokens`, then to whole windows + 1."""
    return _cut([np.asarray(read_shard(p)) for p in list_shards(data_dir, "val")], seq_len, max_tokens)


def read_sidecars(shards: list[Path], tokens: list[np.ndarray]) -> list[np.ndarray] | None:
    """Each shard's sidecar counts (None without sidecars), checked against the shard's tokens."""
    sidecars = paired_sidecars(shards)
    if sidecars is None:
        return None
    counts = []
    for shard, side, toks in zip(shards, sidecars, tokens):
        c = read_shard(side)
        if len(c) != len(toks):
            raise ShardError(
                f"{side}: {len(c)} byte counts for the {len(toks)} tokens of {shard.name} "
                "(expected exactly one per token)"
            )
        counts.append(np.asarray(c))
    if len(tokens[0]) and int(tokens[0][0]) != BOS_ID:
        raise ShardError(
            f"{shards[0]}: the val stream starts with token {int(tokens[0][0])}, not BOS ({BOS_ID}): "
            "every document must be [BOS] + ids (SPEC §1.2)"
        )
    for shard, side, toks, c in zip(shards, sidecars, tokens, counts):
        charged = np.flatnonzero((toks == BOS_ID) & (c != 0))
        if charged.size:
            raise ShardError(
                f"{side}: BOS at token {int(charged[0])} of {shard.name} is charged {int(c[charged[0]])} "
                "bytes, expected 0 (sidecar misaligned with its shard?)"
            )
    return counts


def load_val_stream(
    data_dir: str | Path, seq_len: int, max_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens, bytes per token or None): the val stream of `load_val_tokens` and, when the folder has byte
    sidecars, the original UTF-8 bytes of each token (int16: a piece is at most 16 characters)."""
    shards = list_shards(data_dir, "val")
    tokens = [np.asarray(read_shard(p)) for p in shards]
    counts = read_sidecars(shards, tokens)
    stream = _cut(tokens, seq_len, max_tokens)
    return stream, (None if counts is None else _cut(counts, seq_len, max_tokens, np.int16))
