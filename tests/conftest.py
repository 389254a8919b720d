"""Shared fixtures: the real corpus (when $PGOLF_TEST_DATA is set), tiny real shards, synthetic shards.

Real-data fixtures skip with a clear reason when $PGOLF_TEST_DATA is unset; synthetic ones always work.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.config import RunConfig, resolve
from pgolf.data.shards import shard_name, write_shard

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

NO_DATA = "PGOLF_TEST_DATA is not set (point it at the shared corpus folder to run real-data tests)"


def real_data_dir() -> Path | None:
    root = os.environ.get("PGOLF_TEST_DATA")
    if not root:
        return None
    path = Path(root)
    return path if (path / "val" / "val_000.jsonl.gz").is_file() else None


@pytest.fixture(scope="session")
def test_data_dir() -> Path:
    path = real_data_dir()
    if path is None:
        pytest.skip(NO_DATA)
    return path


def read_docs(path: Path, limit: int | None = None) -> list[str]:
    docs = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            docs.append(json.loads(line)["text"])
            if limit is not None and len(docs) >= limit:
                break
    return docs


def _encode_docs(sp, docs: list[str]) -> np.ndarray:
    out: list[int] = []
    for ids in sp.encode(docs):
        out.append(1)  # BOS per document, no EOS (SPEC §1.2)
        out.extend(ids)
    return np.asarray(out, dtype=np.int64)


def make_real_shards(
    root: Path, tokenizer: Path, out: Path, val_docs: int, train_docs: int, n_train: int = 2
) -> Path:
    """Tokenize the first docs of the shared val/train files into `n_train` train shards + 1 val shard."""
    import shutil

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    out.mkdir(parents=True, exist_ok=True)
    write_shard(
        out / shard_name("val", 0), _encode_docs(sp, read_docs(root / "val" / "val_000.jsonl.gz", val_docs))
    )
    train = _encode_docs(sp, read_docs(root / "train" / "train_000.jsonl.gz", train_docs))
    for i, part in enumerate(np.array_split(train, n_train)):
        write_shard(out / shard_name("train", i), part)
    shutil.copyfile(tokenizer, out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def sp8192_shards(test_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny real sp8192 data folder: 2 train shards (~300 docs) + val shard (60 docs) + tokenizer.model."""
    out = tmp_path_factory.mktemp("sp8192")
    return make_real_shards(
        test_data_dir, test_data_dir / "tokenizers" / "fineweb_8192_bpe.model", out, 60, 300
    )


@pytest.fixture(scope="session")
def sp1024_shards(test_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny real cpu-golf data folder (corpus_1024 tokenizer), same layout as sp8192_shards."""
    out = tmp_path_factory.mktemp("sp1024")
    return make_real_shards(
        test_data_dir, test_data_dir / "tokenizers" / "corpus_1024_bpe.model", out, 60, 300
    )


@pytest.fixture
def one_thread():
    """One torch thread: two OpenMP threads on a shared 2-core machine spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def synthetic_shards(tmp_path: Path) -> Path:
    """Random-token shards (vocab 8192, BOS every ~200 tokens): 2 train shards of 40k, 1 val of 20k."""
    rng = np.random.default_rng(0)

    def stream(n: int) -> np.ndarray:
        toks = rng.integers(4, 8192, size=n)
        toks[rng.random(n) < 1 / 200] = 1
        toks[0] = 1
        return toks

    write_shard(tmp_path / shard_name("train", 0), stream(40_000))
    write_shard(tmp_path / shard_name("train", 1), stream(40_000))
    write_shard(tmp_path / shard_name("val", 0), stream(20_000))
    return tmp_path


def write_tiny_shards(out: Path) -> Path:
    """Synthetic shards over a 1,024-token vocab (BOS every ~100 tokens): 2 × 12k train, 3k val."""
    rng = np.random.default_rng(0)
    for split, idx, n in (("train", 0, 12_000), ("train", 1, 12_000), ("val", 0, 3_000)):
        toks = rng.integers(4, 1024, size=n)
        toks[rng.random(n) < 0.01] = 1
        write_shard(out / shard_name(split, idx), toks)
    return out


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """write_tiny_shards in tmp_path/data."""
    return write_tiny_shards(tmp_path / "data")


# The smoke preset shrunk for tests: vocab 1024, 8 sequences of 128 per step, fp32, 6 steps.
TINY_SETS = (
    "model.vocab_size=1024",
    "data.train_batch_tokens=1024",
    "data.max_val_tokens=1025",
    "train.autocast=off",
    "optim.muon_ns_dtype=fp32",
    "train.iterations=6",
    "train.log_every=2",
    "train.val_every=0",
)


def tiny_cfg(data_dir: Path, *sets: str) -> RunConfig:
    """The smoke preset at vocab 1024, 8 sequences of 128 per step, fp32 (bf16 is slow on AVX2 CPUs)."""
    return resolve("smoke", sets=[f"data.dir={data_dir}", *TINY_SETS, *sets])
