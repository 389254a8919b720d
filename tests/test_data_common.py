"""Shared helpers of the data-stage tests: a tiny synthetic corpus and a 1,024-piece tokenizer trained on it.

They need no real data, so the build/fineweb tests always run. Imported by test_data_*.py
(`from test_data_common import ...`); this module holds no tests itself.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from pgolf.data.build import train_tokenizer

TINY_VOCAB = 1024


def tiny_docs(n: int, seed: int = 0) -> list[str]:
    """Pseudo-English documents: random words from a random lexicon, sentences, a few digits."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lexicon = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(400)]
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(int(rng.integers(2, 8))):
            words = [lexicon[int(i)] for i in rng.zipf(1.3, size=int(rng.integers(4, 14))) % len(lexicon)]
            sentences.append(" ".join(words).capitalize() + f" {int(rng.integers(0, 1000))}.")
        docs.append(" ".join(sentences))
    return docs


def write_jsonl(path: Path, texts: list[str], gz: bool = False) -> Path:
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SentencePiece BPE of exactly 1,024 pieces, trained with the challenge's settings on tiny_docs."""
    root = tmp_path_factory.mktemp("tinytok")
    docs = write_jsonl(root / "docs.jsonl", tiny_docs(1500, seed=1))
    model = root / "tiny_1024.model"
    train_tokenizer([docs], TINY_VOCAB, model, val_docs=0)
    import sentencepiece as spm

    assert spm.SentencePieceProcessor(model_file=str(model)).get_piece_size() == TINY_VOCAB
    return model
