"""Checks of a run's inputs before anything is written or trained: each failure is one line naming the file
and what was expected, so a bad shard, tokenizer or missing split costs seconds, not a training run.

Every train and val shard is scanned once for token ids >= model.vocab_size (a memory-mapped max: the
loader would otherwise fail with an IndexError mid-run); under torchrun each rank scans its share of the
train shards (RANK::WORLD_SIZE; a rank that fails ends the job) and all of val. The tokenizer must be the
one the shards were built with when the data folder's manifest.json records its sha256.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pgolf.config import RunConfig
from pgolf.data.bytes import load_tokenizer
from pgolf.data.shards import ShardError, list_shards, read_shard
from pgolf.fileio import file_sha256
from pgolf.train.validate import tokenizer_path

MANIFEST = "manifest.json"


def check_shard_ids(files: list[Path], vocab_size: int) -> None:
    for file in files:
        tokens = read_shard(file)
        if tokens.size and int(tokens.max()) >= vocab_size:
            raise ShardError(
                f"{file}: token id {int(tokens.max())} >= model.vocab_size={vocab_size} "
                "(shards built with another tokenizer, or the wrong model.vocab_size)"
            )


def check_tokenizer(cfg: RunConfig, required: bool) -> None:
    """The tokenizer exists (when `required`), matches model.vocab_size, and is the manifest's."""
    tok = tokenizer_path(cfg)
    if not tok.is_file():
        if required:
            raise FileNotFoundError(
                f"{tok}: tokenizer not found (evaluation needs it to count bytes; set data.tokenizer or put "
                f"tokenizer.model in data.dir)"
            )
        return
    load_tokenizer(tok, cfg.model.vocab_size)
    manifest = Path(cfg.data.dir) / MANIFEST
    if not manifest.is_file():
        return
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8")).get("tokenizer", {}).get("sha256")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{manifest}: not a valid data manifest ({err})") from None
    if recorded and file_sha256(tok) != recorded:
        raise ValueError(
            f"{tok}: sha256 {file_sha256(tok)[:16]}... is not that of the tokenizer the shards were built "
            f"with ({manifest} records {recorded[:16]}...): bits per byte would be counted wrong"
        )


_PASSED: set[tuple] = set()  # inputs already checked in this process (`pgolf run` checks, then trains)


def check_inputs(cfg: RunConfig, need_eval: bool) -> None:
    """Data folder, train (and val) shards, token ids and tokenizer of `cfg`, before training starts.
    `need_eval`: the run evaluates afterwards (`pgolf run`), so the val split and tokenizer are required."""
    data_dir = Path(cfg.data.dir)
    files = sorted(data_dir.glob("fineweb_*.bin")) + [tokenizer_path(cfg)] if data_dir.is_dir() else []
    key = (cfg.model.vocab_size, cfg.data.train_seq_len, str(tokenizer_path(cfg)), need_eval) + tuple(
        (str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()
    )
    if key in _PASSED or (not need_eval and key[:3] + (True,) + key[4:] in _PASSED):
        return
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data.dir={cfg.data.dir!r} is not a folder (pass --data DIR)")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    check_shard_ids(list_shards(data_dir, "train")[rank::world], cfg.model.vocab_size)
    has_val = any(data_dir.glob("fineweb_val_*.bin"))
    if need_eval or has_val:
        check_shard_ids(list_shards(data_dir, "val"), cfg.model.vocab_size)
    check_tokenizer(cfg, required=need_eval)
    _PASSED.add(key)
