"""The challenge's token shard format (SPEC §1.1).

Header: 256 little-endian int32 (1024 bytes): magic 20240520, version 1, num_tokens, then zeros.
Payload: num_tokens little-endian uint16 ids. File size must equal 1024 + 2 * num_tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pgolf.fileio import atomic_write_bytes

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_SHARD_TOKENS = 100_000_000  # 10^8 tokens per shard, as the challenge's exporter


class ShardError(ValueError):
    """A shard file is malformed; the message names the file and what was expected."""


def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


def sidecar_name(index: int) -> str:
    """The byte sidecar of val shard `index` (SPEC-1855 §1.3): same format, one uint16 per token."""
    return f"fineweb_val_bytes_{index:06d}.bin"


def write_shard(path: str | Path, tokens: np.ndarray) -> Path:
    """Write token ids (any integer dtype, all in [0, 65536)) as one shard, atomically."""
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ShardError(f"{path}: tokens must be 1-D, got shape {arr.shape}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 65536):
        bad = int(arr.max()) if int(arr.max()) >= 65536 else int(arr.min())
        raise ShardError(f"{path}: token id {bad} does not fit uint16 (expected 0 <= id < 65536)")
    if arr.size > MAX_SHARD_TOKENS:
        raise ShardError(f"{path}: {arr.size} tokens exceed the shard limit of {MAX_SHARD_TOKENS}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, arr.size
    return atomic_write_bytes(path, header.tobytes() + arr.astype("<u2").tobytes())


def read_header(path: str | Path) -> int:
    """Validate magic, version and file size; return num_tokens."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: shard file does not exist")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        raise ShardError(f"{path}: bad magic {int(header[0])}, expected {SHARD_MAGIC} (not a token shard)")
    if int(header[1]) != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported shard version {int(header[1])}, expected {SHARD_VERSION}")
    num_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        raise ShardError(
            f"{path}: file is {size} bytes but its header says {num_tokens} tokens "
            f"(expected {expected} bytes; truncated or corrupt)"
        )
    return num_tokens


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a validated shard's tokens as uint16 (no copy)."""
    num_tokens = read_header(path)
    if num_tokens == 0:
        return np.zeros(0, dtype="<u2")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


def list_shards(data_dir: str | Path, split: str) -> list[Path]:
    """Sorted `fineweb_{split}_*.bin` files of a data folder (error when there are none).

    The glob `fineweb_val_*.bin` also matches the byte sidecars `fineweb_val_bytes_*.bin`: those are not
    token shards and are left out (SPEC-1855 §1.3)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist")
    files = sorted(p for p in data_dir.glob(f"fineweb_{split}_*.bin") if "_bytes_" not in p.name)
    if not files:
        raise FileNotFoundError(f"{data_dir}: no fineweb_{split}_*.bin shards found")
    return files


def paired_sidecars(shards: list[Path]) -> list[Path] | None:
    """The byte sidecar of every val shard, or None when the folder has none; a partial set is an error."""
    if not shards:
        return None
    folder = shards[0].parent
    present = sorted(folder.glob("fineweb_val_bytes_*.bin"))
    if not present:
        return None
    expected = [folder / p.name.replace("fineweb_val_", "fineweb_val_bytes_", 1) for p in shards]
    missing = [p.name for p in expected if not p.is_file()]
    if missing:
        raise ShardError(
            f"{folder}: val byte sidecar {missing[0]} is missing ({len(missing)} of {len(shards)})"
        )
    extra = sorted(set(present) - set(expected))
    if extra:
        raise ShardError(
            f"{extra[0]}: byte sidecar without its val shard {extra[0].name.replace('_bytes', '')}"
        )
    return expected
