"""`pgolf data build` / `pgolf data stats`: shards equal direct encoding token for token, splits, manifest,
tokenizer training on train docs only, and one clear error per kind of bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import test_data_common
from conftest import read_docs
from test_data_common import TINY_VOCAB, tiny_docs, write_jsonl

from pgolf.cli import main
from pgolf.data.build import build_dataset, train_tokenizer
from pgolf.data.loader import ShuffledSequenceLoader
from pgolf.data.shards import list_shards, read_shard, write_shard
from pgolf.data.stats import data_stats
from pgolf.data.val import load_val_tokens

tiny_tokenizer = test_data_common.tiny_tokenizer  # the shared session fixture


def encoded(sp, texts: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray([1] + ids, dtype=np.int64) for ids in sp.encode(texts)])


def split_tokens(out: Path, split: str) -> np.ndarray:
    return np.concatenate([np.asarray(read_shard(p), dtype=np.int64) for p in list_shards(out, split)])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_real_val_file_round_trips(test_data_dir: Path, tmp_path: Path, capsys) -> None:
    val_file = test_data_dir / "val" / "val_000.jsonl.gz"
    model = test_data_dir / "tokenizers" / "fineweb_8192_bpe.model"
    out = tmp_path / "data"
    argv = ["data", "build", "--docs", str(val_file), "--tokenizer", str(model), "--out", str(out)]
    assert (
        main([*argv, "--val-docs", "500", "--vocab-size", "8192", "--shard-tokens", "400000", "--quiet"]) == 0
    )
    texts = read_docs(val_file)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    want_val, want_train = encoded(sp, texts[:500]), encoded(sp, texts[500:])
    assert np.array_equal(split_tokens(out, "val"), want_val)
    assert np.array_equal(split_tokens(out, "train"), want_train)
    assert len(list_shards(out, "train")) == -(-len(want_train) // 400_000)  # 10^8-style fixed-size shards
    assert any(read_shard(p)[0] != 1 for p in list_shards(out, "train")[1:])  # docs span shard boundaries
    assert np.array_equal(
        load_val_tokens(out, 1024).numpy(), want_val[: (len(want_val) - 1) // 1024 * 1024 + 1]
    )
    loader = ShuffledSequenceLoader(list_shards(out, "train"), seq_len=256)
    x, y = loader.next_batch(8)
    for row in x.numpy():  # every window is a slice of the directly encoded train stream
        hits = np.flatnonzero(want_train[: len(want_train) - 256] == row[0])
        assert any(np.array_equal(want_train[h : h + 256], row) for h in hits)

    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["splits"]["val"]["docs"] == 500 and manifest["splits"]["train"]["docs"] == len(texts) - 500
    )
    assert manifest["splits"]["val"]["tokens"] == len(want_val)
    assert manifest["inputs"][0]["sha256"] == sha(val_file)
    assert manifest["tokenizer"]["sha256"] == sha(model) == sha(out / "tokenizer.model")
    assert manifest["tokenizer"]["vocab_size"] == 8192
    for entry in manifest["splits"]["train"]["shards"]:
        assert entry["sha256"] == sha(out / entry["name"])

    capsys.readouterr()
    assert main(["data", "stats", str(out), "--json", "--seq-len", "1024"]) == 0
    stats = json.loads(capsys.readouterr().out)
    decoded_bytes = sum(len(t.encode("utf-8")) for t in sp.decode(sp.encode(texts[:500])))
    assert stats["val_bytes_raw"] == decoded_bytes
    assert stats["val_tokens_raw"] == len(want_val) and stats["val_docs"] == 500
    assert stats["val_tokens"] == (len(want_val) - 1) // 1024 * 1024 + 1
    assert stats["val_bytes"] < stats["val_bytes_raw"]
    assert stats["train_tokens"] == len(want_train)
    assert data_stats(out, seq_len=1)["val_bytes"] == decoded_bytes  # seq_len 1 keeps every target


def test_splits_shards_and_worker_counts_agree(tiny_tokenizer: Path, tmp_path: Path) -> None:
    texts = tiny_docs(60, seed=5)
    a = write_jsonl(tmp_path / "a.jsonl.gz", texts[:25], gz=True)
    b = write_jsonl(tmp_path / "b.jsonl", texts[25:50])
    txts = []
    for i, t in enumerate(texts[50:]):  # a .txt file is one document
        txts.append(tmp_path / f"doc{i}.txt")
        txts[-1].write_text(t, encoding="utf-8")
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    manifests = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        m = build_dataset(
            [a, b, *txts],
            out,
            val_docs=30,
            tokenizer=tiny_tokenizer,
            shard_tokens=700,
            workers=workers,
            chunk_docs=7,
            progress=False,
        )
        assert np.array_equal(split_tokens(out, "val"), encoded(sp, texts[:30]))
        assert np.array_equal(split_tokens(out, "train"), encoded(sp, texts[30:]))
        sizes = [s["tokens"] for split in ("val", "train") for s in m["splits"][split]["shards"]]
        assert max(sizes) == 700 and all(0 < n <= 700 for n in sizes)
        assert read_shard(list_shards(out, "train")[0])[0] == 1  # train starts in a fresh shard (never mixed)
        assert (m["splits"]["val"]["docs"], m["splits"]["train"]["docs"]) == (30, 30)
        manifests.append(m)
    shas = [[s["sha256"] for s in m["splits"]["train"]["shards"]] for m in manifests]
    assert shas[0] == shas[1]  # ordered results: the pool changes nothing
    with pytest.raises(ValueError, match="already holds"):
        build_dataset([a], tmp_path / "out1", val_docs=1, tokenizer=tiny_tokenizer, progress=False)


def test_train_tokenizer_never_sees_val_docs(tmp_path: Path, capsys) -> None:
    marker = "ǂǁǃǂ"  # frequent in val only: a tokenizer trained on val would learn its characters and merges
    val = [f"{marker} {marker}{marker} {marker}. " * 40 for _ in range(30)]
    train = tiny_docs(300, seed=2)
    docs = write_jsonl(tmp_path / "docs.jsonl", val + train)
    out = tmp_path / "data"
    rc = main(["data", "build", "--docs", str(docs), "--train-tokenizer", "600", "--out", str(out),
               "--val-docs", "30", "--workers", "1", "--quiet"])  # fmt: skip
    assert rc == 0
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert not any("ǂ" in sp.id_to_piece(i) for i in range(sp.get_piece_size()))
    m = json.loads((out / "manifest.json").read_text())
    trainer = m["tokenizer"]["trainer"]
    assert trainer["trained_on"] == "train documents only" and trainer["vocab_size"] == 600
    assert trainer["byte_fallback"] is True and trainer["add_dummy_prefix"] is False
    assert np.array_equal(split_tokens(out, "val"), encoded(sp, val))
    # the same settings on val+train would have learnt the marker
    train_tokenizer([docs], 600, tmp_path / "leaky.model", val_docs=0)
    leaky = spm.SentencePieceProcessor(model_file=str(tmp_path / "leaky.model"))
    assert any("ǂǁ" in leaky.id_to_piece(i) for i in range(leaky.get_piece_size()))


# --- bad input: one clear error naming the file -----------------------------------------------------------


def run_cli(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


def test_shard_with_wrong_magic(tmp_path: Path, capsys) -> None:
    path = write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(3000))
    raw = bytearray(path.read_bytes())
    raw[0:4] = np.int32(12345).tobytes()
    path.write_bytes(bytes(raw))
    err = run_cli(["data", "stats", str(tmp_path)], capsys)
    assert "fineweb_val_000000.bin: bad magic 12345, expected 20240520" in err


def test_truncated_shard(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(3000))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(
        ValueError, match=r"fineweb_train_000000.bin: file is 7014 bytes .* \(expected 7024 bytes; truncated"
    ):
        ShuffledSequenceLoader([path], seq_len=16)


def test_token_id_too_large_for_uint16(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"fineweb_train_000000.bin: token id 65536 does not fit uint16"):
        write_shard(tmp_path / "fineweb_train_000000.bin", np.array([1, 5, 65536]))
    assert not (tmp_path / "fineweb_train_000000.bin").exists()


def test_tokenizer_vocab_differs_from_config(tiny_tokenizer: Path, tmp_path: Path, capsys) -> None:
    docs = write_jsonl(tmp_path / "d.jsonl", tiny_docs(5))
    err = run_cli(["data", "build", "--docs", str(docs), "--tokenizer", str(tiny_tokenizer), "--out",
                   str(tmp_path / "o"), "--val-docs", "1", "--vocab-size", "8192", "--quiet"], capsys)  # fmt: skip
    assert f"{tiny_tokenizer}: tokenizer vocab is {TINY_VOCAB} but --vocab-size is 8192" in err


def test_jsonl_line_without_text(tiny_tokenizer: Path, tmp_path: Path, capsys) -> None:
    docs = tmp_path / "bad.jsonl"
    docs.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"body": "no text here"}\n', encoding="utf-8")
    err = run_cli(["data", "build", "--docs", str(docs), "--tokenizer", str(tiny_tokenizer), "--out",
                   str(tmp_path / "o"), "--val-docs", "1", "--workers", "1", "--quiet"], capsys)  # fmt: skip
    assert "bad.jsonl:4: no 'text' field" in err
    assert not list((tmp_path / "o").glob("*.bin"))  # no half-built dataset left behind
    docs.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    err = run_cli(["data", "build", "--docs", str(docs), "--tokenizer", str(tiny_tokenizer), "--out",
                   str(tmp_path / "o"), "--val-docs", "1", "--workers", "1", "--quiet"], capsys)  # fmt: skip
    assert "bad.jsonl:2: invalid JSON" in err


def test_empty_input_and_unknown_type(tiny_tokenizer: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.jsonl.gz"
    write_jsonl(empty, [], gz=True)
    base = ["--tokenizer", str(tiny_tokenizer), "--out", str(tmp_path / "o"), "--val-docs", "0", "--quiet"]
    err = run_cli(["data", "build", "--docs", str(empty), *base], capsys)
    assert "no documents in" in err and "empty.jsonl.gz" in err
    odd = tmp_path / "docs.parquet"
    odd.write_bytes(b"PAR1")
    err = run_cli(["data", "build", "--docs", str(odd), *base], capsys)
    assert "docs.parquet: unknown document file type" in err
    few = write_jsonl(tmp_path / "few.jsonl", tiny_docs(3))
    err = run_cli(["data", "build", "--docs", str(few), *base[:-3], "--val-docs", "10", "--quiet"], capsys)
    assert "only 3 documents, fewer than --val-docs 10" in err and "few.jsonl" in err
