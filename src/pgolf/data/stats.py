"""What a data folder holds (`pgolf data stats`): shards, token counts, and val bytes as bpb counts them.

The scored val bytes are those of the truncated stream of SPEC §1.4 (every target of whole windows of
`seq_len`), counted with the byte tables of SPEC §1.5 (pgolf.data.bytes), so `val_loss_sum / (ln 2 ·
val_bytes)` of an eval over that stream is its bpb. `val_bytes_raw` counts every target of the untruncated
stream: per document, the UTF-8 length of the tokenizer's decoded text. A CaseOps folder's val bytes are
its byte sidecars' (SPEC-1855 §1.4), which are checked against the counts recomputed from the tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgolf.data.shards import ShardError, list_shards, read_header, read_shard
from pgolf.data.val import read_sidecars, val_stream_length

BOS_ID = 1
_CHUNK = 1 << 22  # targets per byte-count step: bounds the int64 temporaries


def _target_bytes(tables, stream: np.ndarray) -> int:
    """Σ bytes of every target stream[1:], each with the token before it as context."""
    total = 0
    for lo in range(0, len(stream) - 1, _CHUNK):
        hi = min(lo + _CHUNK, len(stream) - 1)
        prev = torch.from_numpy(np.asarray(stream[lo:hi], dtype=np.int64))
        tgt = torch.from_numpy(np.asarray(stream[lo + 1 : hi + 1], dtype=np.int64))
        total += int(tables.target_bytes(prev, tgt).sum())
    return total


def data_stats(
    data_dir: str | Path, seq_len: int = 2048, tokenizer: str | Path | None = None
) -> dict[str, Any]:
    """Shard list and token counts; val bytes when a tokenizer (default DIR/tokenizer.model) exists."""
    data_dir = Path(data_dir)
    val_files = list_shards(data_dir, "val")
    try:
        train_files = list_shards(data_dir, "train")
    except FileNotFoundError:
        train_files = []
    shards = [{"split": "val", "name": p.name, "tokens": read_header(p)} for p in val_files]
    shards += [{"split": "train", "name": p.name, "tokens": read_header(p)} for p in train_files]
    val_raw = sum(s["tokens"] for s in shards if s["split"] == "val")
    stream_len = val_stream_length(val_raw, seq_len)
    parts = [np.asarray(read_shard(p)) for p in val_files]
    stream = np.concatenate(parts)
    sidecars = read_sidecars(val_files, parts)
    side = None if sidecars is None else np.concatenate(sidecars).astype(np.int64)
    stats: dict[str, Any] = {
        "dir": str(data_dir),
        "seq_len": seq_len,
        "val_tokens_raw": val_raw,
        "val_tokens": stream_len,
        "val_targets": stream_len - 1,
        "val_docs": int((stream == BOS_ID).sum()),
        "train_tokens": sum(s["tokens"] for s in shards if s["split"] == "train"),
        "train_shards": len(train_files),
        "val_shards": len(val_files),
        "val_bytes": None,
        "val_bytes_raw": None,
        "byte_sidecar": side is not None,
        "tokenizer": None,
        "shards": shards,
    }
    model = Path(tokenizer) if tokenizer else data_dir / "tokenizer.model"
    if model.is_file():
        from pgolf.data.bytes import build_byte_tables, load_tokenizer

        sp = load_tokenizer(model)
        top = int(stream.max()) + 1 if len(stream) else 0
        tables = build_byte_tables(sp, max(sp.get_piece_size(), top))
        stats["tokenizer"] = {"path": str(model), "vocab_size": int(sp.get_piece_size())}
        if side is None:
            stats["val_bytes_raw"] = _target_bytes(tables, stream)
            stats["val_bytes"] = _target_bytes(tables, stream[:stream_len])
        else:
            from pgolf.data.sidecar import piece_table, token_bytes

            mismatch = np.flatnonzero(token_bytes(stream, piece_table(sp)) != side)
            if mismatch.size:
                raise ShardError(
                    f"{data_dir}: byte sidecar disagrees with the tokens at val position {int(mismatch[0])} "
                    f"({mismatch.size} positions; sidecar built with another tokenizer?)"
                )
    if side is not None:
        stats["val_bytes_raw"] = int(side[1:].sum())
        stats["val_bytes"] = int(side[1:stream_len].sum())
    if stats["val_bytes"] is not None:
        stats["val_tokens_per_byte"] = stats["val_targets"] / max(stats["val_bytes"], 1)
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    """A short human-readable report."""
    lines = [f"data folder {stats['dir']}"]
    tok = stats["tokenizer"]
    lines.append(
        f"tokenizer    {tok['path']} (vocab {tok['vocab_size']})" if tok else "tokenizer    none found"
    )
    lines.append(
        f"val          {stats['val_tokens_raw']:,} tokens in {stats['val_shards']} shard(s), "
        f"{stats['val_docs']:,} docs"
    )
    lines.append(
        f"val stream   {stats['val_tokens']:,} tokens at seq_len {stats['seq_len']} "
        f"({stats['val_targets']:,} scored targets)"
    )
    if stats["val_bytes"] is not None:
        lines.append(
            f"val bytes    {stats['val_bytes']:,} scored ({stats['val_tokens_per_byte']:.5f} tokens/byte), "
            f"{stats['val_bytes_raw']:,} untruncated" + (" (byte sidecar)" if stats["byte_sidecar"] else "")
        )
    lines.append(f"train        {stats['train_tokens']:,} tokens in {stats['train_shards']} shard(s)")
    lines.append("shards:")
    lines.extend(f"  {s['name']:28s} {s['tokens']:>14,}" for s in stats["shards"])
    return "\n".join(lines)
