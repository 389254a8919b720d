"""Documents → token shards (SPEC §1.2–1.3): `pgolf data build`.

Inputs, read in the order given (a folder stands for its *.jsonl, *.jsonl.gz and *.txt files, sorted):
  *.jsonl / *.jsonl.gz  one JSON object per line with a string field "text" (blank lines are skipped);
  *.txt                 the whole file is ONE document.
The first `val_docs` documents are the validation split, all the rest are training. Each document is
encoded as [BOS=1] + ids with no EOS; shards hold at most `shard_tokens` tokens, a shard never mixes
splits, documents span shard boundaries freely. Tokenization runs in a pool of worker processes (one
SentencePiece processor each, batched encode of `chunk_docs` documents per task, results in input order,
a bounded number of tasks in flight), so memory stays at one shard buffer plus a few chunks.

With `caseops` (SPEC-1855 §1) every document goes through the CaseOps case transform before it is
encoded, the tokenizer must reserve the four operators at ids 4-7 (a trained one gets them as
user_defined_symbols), and each val shard gets its byte sidecar fineweb_val_bytes_NNNNNN.bin: the original
UTF-8 bytes of every token (pgolf.data.sidecar), which val_bpb then divides by.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pgolf.data import caseops as case_transform
from pgolf.data.shards import MAX_SHARD_TOKENS, shard_name, sidecar_name, write_shard
from pgolf.fileio import atomic_write_json, file_sha256

BOS_ID = 1
DOC_SUFFIXES = (".jsonl.gz", ".jsonl", ".txt")
# The challenge builder's SentencePiece trainer settings (SPEC §1.3); vocab_size is added per call.
TRAINER_SETTINGS: dict[str, Any] = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}


class InputError(ValueError):
    """A document file is unreadable or malformed; the message names the file (and line)."""


def _suffix_ok(path: Path) -> bool:
    return any(path.name.endswith(s) for s in DOC_SUFFIXES)


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files in the given order; a folder contributes its document files sorted by name."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and _suffix_ok(p))
            if not found:
                raise InputError(f"{path}: folder holds no {', '.join(DOC_SUFFIXES)} files")
            files.extend(found)
        elif not path.exists():
            raise FileNotFoundError(f"document file {path} does not exist")
        elif not _suffix_ok(path):
            raise InputError(f"{path}: unknown document file type (expected {', '.join(DOC_SUFFIXES)})")
        else:
            files.append(path)
    if not files:
        raise InputError("no document files given")
    return files


def _jsonl_texts(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(
                        f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})"
                    ) from None
                if not isinstance(obj, dict) or "text" not in obj:
                    raise InputError(
                        f"{path}:{lineno}: no 'text' field (expected a JSON object with a string 'text')"
                    )
                if not isinstance(obj["text"], str):
                    raise InputError(
                        f"{path}:{lineno}: 'text' is {type(obj['text']).__name__}, expected a string"
                    )
                yield obj["text"]
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, OSError) as err:
        raise InputError(f"{path}: cannot read as UTF-8 JSON lines ({err})") from None


def iter_documents(files: Iterable[Path]) -> Iterator[str]:
    """Every document text of the files, in order."""
    for path in files:
        if path.name.endswith(".txt"):
            try:
                yield path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"{path}: not UTF-8 text ({err})") from None
        else:
            yield from _jsonl_texts(path)


def encode_documents(sp, texts: list[str], num_threads: int = 1, caseops: bool = False) -> np.ndarray:
    """[BOS] + ids per document, concatenated as uint16 (per-document arrays, no per-token Python)."""
    if caseops:
        texts = [case_transform.encode(t) for t in texts]
    bos = np.array([BOS_ID], dtype=np.uint16)
    parts: list[np.ndarray] = []
    for ids in sp.encode(texts, num_threads=num_threads):
        parts.append(bos)
        parts.append(np.asarray(ids, dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


class _Encoder:
    """Documents -> (tokens, val byte sidecar or None); one per process."""

    def __init__(self, model_path: str, caseops: bool):
        import sentencepiece as spm

        from pgolf.data.sidecar import piece_table

        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.caseops = caseops
        self.table = piece_table(self.sp) if caseops else None

    def __call__(self, split: str, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        from pgolf.data.sidecar import token_bytes

        tokens = encode_documents(self.sp, texts, caseops=self.caseops)
        return tokens, (token_bytes(tokens, self.table) if self.caseops and split == "val" else None)


_WORKER: _Encoder | None = None  # the encoder of a pool worker


def _init_worker(model_path: str, caseops: bool) -> None:
    global _WORKER
    _WORKER = _Encoder(model_path, caseops)


def _encode_in_worker(split: str, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    return _WORKER(split, texts)


def _split_chunks(docs: Iterator[str], val_docs: int, chunk_docs: int) -> Iterator[tuple[str, list[str]]]:
    """(split, texts) chunks in order; a chunk never straddles the val/train switch."""
    chunk: list[str] = []
    split, seen = ("val" if val_docs > 0 else "train"), 0
    for text in docs:
        doc_split = "val" if seen < val_docs else "train"
        if doc_split != split or len(chunk) >= chunk_docs:
            if chunk:
                yield split, chunk
            chunk, split = [], doc_split
        chunk.append(text)
        seen += 1
    if chunk:
        yield split, chunk


def _encoded_chunks(
    chunks: Iterator[tuple[str, list[str]]], model_path: Path, workers: int, caseops: bool = False
) -> Iterator[tuple[str, int, tuple[np.ndarray, np.ndarray | None]]]:
    """(split, num_docs, (tokens, sidecar)) per chunk, in input order, encoded by `workers` processes."""
    if workers <= 1:
        encoder = _Encoder(str(model_path), caseops)
        for split, texts in chunks:
            yield split, len(texts), encoder(split, texts)
        return
    # spawn: workers start clean (no forked torch/OpenMP state); they import only numpy + sentencepiece.
    ctx = mp.get_context("spawn")
    max_in_flight = 4 * workers  # bounds the text and tokens held in queues
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(model_path), caseops)) as pool:
        pending: deque = deque()
        for split, texts in chunks:
            pending.append((split, len(texts), pool.apply_async(_encode_in_worker, (split, texts))))
            if len(pending) >= max_in_flight:
                split0, n0, result = pending.popleft()
                yield split0, n0, result.get()
        while pending:
            split0, n0, result = pending.popleft()
            yield split0, n0, result.get()


class ShardWriter:
    """Buffers one split's tokens and writes full shards of `shard_tokens` (the last one shorter); with
    `sidecar`, the byte counts of the tokens go to fineweb_val_bytes_NNNNNN.bin beside each shard."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, sidecar: bool = False):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buffer = np.empty((2 if sidecar else 1, shard_tokens), dtype=np.uint16)
        self.fill = 0
        self.docs = 0
        self.tokens = 0
        self.bytes = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, tokens: np.ndarray, docs: int, sidecar: np.ndarray | None = None) -> None:
        if (sidecar is None) != (len(self.buffer) == 1):
            raise ValueError(f"{self.split} shards: a byte sidecar must come with every chunk or none")
        rows = np.stack([tokens, sidecar]) if sidecar is not None else tokens[None]
        self.docs += docs
        self.tokens += len(tokens)
        self.bytes += 0 if sidecar is None else int(sidecar.sum(dtype=np.int64))
        pos = 0
        while pos < len(tokens):
            take = min(self.shard_tokens - self.fill, len(tokens) - pos)
            self.buffer[:, self.fill : self.fill + take] = rows[:, pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        index = len(self.shards)
        path = write_shard(self.out_dir / shard_name(self.split, index), self.buffer[0, : self.fill])
        info = {"name": path.name, "tokens": self.fill, "sha256": file_sha256(path)}
        if len(self.buffer) == 2:
            side = write_shard(self.out_dir / sidecar_name(index), self.buffer[1, : self.fill])
            info["sidecar"] = {"name": side.name, "sha256": file_sha256(side)}
        self.shards.append(info)
        self.fill = 0

    def summary(self) -> dict[str, Any]:
        out = {"docs": self.docs, "tokens": self.tokens, "shards": self.shards}
        return {**out, "bytes": self.bytes} if len(self.buffer) == 2 else out


def training_texts(
    files: list[Path], val_docs: int, max_docs: int = 0, caseops: bool = False
) -> Iterator[str]:
    """Tokenizer-training text: train documents only (never val), NULs → spaces, stripped, empty skipped,
    then CaseOps-transformed when `caseops`."""
    for i, text in enumerate(iter_documents(files)):
        if i < val_docs:
            continue
        if max_docs and i - val_docs >= max_docs:
            break
        text = text.replace("\x00", " ").strip()
        if text:
            yield case_transform.encode(text) if caseops else text


def train_tokenizer(
    files: list[Path],
    vocab_size: int,
    out_path: Path,
    val_docs: int,
    max_docs: int = 0,
    caseops: bool = False,
) -> dict[str, Any]:
    """Train a SentencePiece BPE with the challenge's settings on the train documents; returns the settings.
    With `caseops` the text is transformed and the operators are user_defined_symbols (ids 4-7)."""
    import sentencepiece as spm

    texts = training_texts(files, val_docs, max_docs, caseops)
    try:
        first = next(texts)
    except StopIteration:
        raise InputError(
            f"no training documents after the first {val_docs} (val) docs to train a tokenizer on"
        ) from None

    def all_texts() -> Iterator[str]:
        yield first
        yield from texts

    settings = {**TRAINER_SETTINGS, "vocab_size": vocab_size}
    if caseops:
        settings["user_defined_symbols"] = ",".join(case_transform.OPERATORS)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "tokenizer"
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_texts(), model_prefix=str(prefix), minloglevel=2, **settings
        )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(prefix.with_suffix(".model"), out_path)
    return {**settings, "trained_on": "train documents only", "max_docs": max_docs}


def _clear_old_shards(out_dir: Path, overwrite: bool) -> None:
    old = sorted(out_dir.glob("fineweb_train_*.bin")) + sorted(out_dir.glob("fineweb_val_*.bin"))
    if old and not overwrite:
        raise InputError(
            f"{out_dir}: already holds {len(old)} shard(s) (e.g. {old[0].name}); pass --overwrite"
        )
    for path in old:
        path.unlink()


def _write_shards(
    files: list[Path],
    model_path: Path,
    writers: dict[str, ShardWriter],
    val_docs: int,
    chunk_docs: int,
    workers: int,
    progress: bool,
    caseops: bool = False,
) -> None:
    from tqdm import tqdm

    with tqdm(unit="doc", unit_scale=True, disable=not progress, file=sys.stderr, desc="tokenize") as bar:
        chunks = _split_chunks(iter_documents(files), val_docs, chunk_docs)
        for split, ndocs, (tokens, sidecar) in _encoded_chunks(chunks, model_path, workers, caseops):
            if split == "train":
                writers["val"].flush()  # the split switch: val never shares a shard with train
            writers[split].add(tokens, ndocs, sidecar)
            bar.update(ndocs)
            bar.set_postfix(tokens=f"{writers['val'].tokens + writers['train'].tokens:,}", refresh=False)
    for writer in writers.values():
        writer.flush()
    if writers["val"].docs < val_docs:
        raise InputError(
            f"inputs hold only {writers['val'].docs} documents, fewer than --val-docs {val_docs}: "
            f"{', '.join(map(str, files))}"
        )


def _check_vocab(sp, path: Path, vocab_size: int | None, caseops: bool = False) -> None:
    from pgolf.data.bytes import TokenizerError
    from pgolf.data.sidecar import check_caseops_tokenizer, is_caseops_tokenizer

    if caseops:
        check_caseops_tokenizer(sp, path)
    elif is_caseops_tokenizer(sp):
        raise TokenizerError(f"{path}: a CaseOps tokenizer (operators at ids 4-7): pass --caseops")
    pieces = sp.get_piece_size()
    if vocab_size is not None and pieces != vocab_size:
        raise TokenizerError(f"{path}: tokenizer vocab is {pieces} but --vocab-size is {vocab_size}")
    if pieces > 65536:
        raise TokenizerError(
            f"{path}: tokenizer vocab {pieces} exceeds 65536: ids would not fit uint16 shards"
        )


def build_dataset(
    docs: list[str | Path],
    out_dir: str | Path,
    val_docs: int,
    tokenizer: str | Path | None = None,
    train_vocab: int = 0,
    vocab_size: int | None = None,
    shard_tokens: int = MAX_SHARD_TOKENS,
    workers: int = 0,
    chunk_docs: int = 256,
    tokenizer_train_docs: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    command: dict[str, Any] | None = None,
    caseops: bool = False,
) -> dict[str, Any]:
    """Tokenize documents into `out_dir` (shards, tokenizer.model, manifest.json); returns the manifest.

    With workers != 1 the pool is started with `spawn`: call this under `if __name__ == "__main__":`.
    """
    from pgolf.data.bytes import load_tokenizer

    if (tokenizer is None) == (not train_vocab):
        raise ValueError("give exactly one of a tokenizer model or a vocab size to train one")
    if val_docs < 0 or not 0 < shard_tokens <= MAX_SHARD_TOKENS:
        raise ValueError(f"val_docs must be >= 0 and shard_tokens in 1..{MAX_SHARD_TOKENS}")
    files = expand_inputs(docs)
    if next(iter_documents(files), None) is None:
        raise InputError(f"no documents in {', '.join(map(str, files))} (empty input)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_old_shards(out_dir, overwrite)
    model_path = out_dir / "tokenizer.model"
    t0 = time.time()
    if train_vocab:
        trainer = train_tokenizer(files, train_vocab, model_path, val_docs, tokenizer_train_docs, caseops)
        source = None
    else:
        trainer, source = None, Path(tokenizer)
        # errors name the user's file, before copying
        _check_vocab(load_tokenizer(source), source, vocab_size, caseops)
        if source.resolve() != model_path.resolve():
            shutil.copyfile(source, model_path)
    sp = load_tokenizer(model_path)
    _check_vocab(sp, source or model_path, vocab_size, caseops)
    tokenizer_seconds = time.time() - t0

    writers = {s: ShardWriter(out_dir, s, shard_tokens, caseops and s == "val") for s in ("val", "train")}
    workers = workers if workers > 0 else (os.cpu_count() or 1)
    t1 = time.time()
    try:
        _write_shards(files, model_path, writers, val_docs, chunk_docs, workers, progress, caseops)
    except BaseException:
        # No half-built dataset: remove the shards of this run (manifest.json is written last).
        for path in out_dir.glob("fineweb_*_*.bin"):
            path.unlink()
        raise
    encode_seconds = time.time() - t1
    total_tokens = writers["val"].tokens + writers["train"].tokens
    manifest = {
        "format": "pgolf-data/1",
        "bos_id": BOS_ID,
        "append_eos": False,
        "text_transform": case_transform.TRANSFORM_NAME if caseops else None,
        "command": command,
        "inputs": [{"path": str(p), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files],
        "tokenizer": {
            "path": "tokenizer.model",
            "source": str(source) if source else None,
            "sha256": file_sha256(model_path),
            "vocab_size": int(sp.get_piece_size()),
            "trainer": trainer,
        },
        "val_docs_requested": val_docs,
        "shard_tokens": shard_tokens,
        "splits": {s: w.summary() for s, w in writers.items()},
        "seconds": {"tokenizer": round(tokenizer_seconds, 3), "encode": round(encode_seconds, 3)},
        "tokens_per_second": round(total_tokens / max(encode_seconds, 1e-9), 1),
        "workers": workers,
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest
