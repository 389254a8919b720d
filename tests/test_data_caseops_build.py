"""`pgolf data build --caseops`: shards and val byte sidecars from the record's CaseOps tokenizer and from a
trained one, the val stream and its sidecar, the loader's one-line errors (short sidecar, missing BOS,
the `_bytes_` name collision), and bpb over the sidecar in every eval mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import read_docs
from test_data_common import tiny_docs, write_jsonl
from test_eval_common import tiny_eval_cfg, tiny_model, tiny_stream, tiny_tables

from pgolf.cli import main
from pgolf.data.build import build_dataset
from pgolf.data.bytes import BpbMeter, TokenizerError
from pgolf.data.caseops import decode, encode
from pgolf.data.shards import ShardError, list_shards, read_shard, write_shard
from pgolf.data.sidecar import CaseOpsTokenizerError, piece_table, token_bytes
from pgolf.data.stats import data_stats
from pgolf.data.val import load_val_stream, load_val_tokens
from pgolf.runtime import DistInfo

RECORD_MODEL = "tokenizers/record_variants/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


def _concat(paths: list[Path]) -> np.ndarray:
    return np.concatenate([np.asarray(read_shard(p), dtype=np.int64) for p in paths])


def test_build_with_the_record_tokenizer_writes_exact_sidecars(test_data_dir: Path, tmp_path: Path) -> None:
    val_file, model = test_data_dir / "val" / "val_000.jsonl.gz", test_data_dir / RECORD_MODEL
    out = tmp_path / "co"
    argv = [
        "data",
        "build",
        "--docs",
        str(val_file),
        "--tokenizer",
        str(model),
        "--caseops",
        "--out",
        str(out),
    ]
    assert main([*argv, "--val-docs", "400", "--shard-tokens", "150000", "--workers", "1", "--quiet"]) == 0
    texts = read_docs(val_file)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    docs = sp.encode([encode(t) for t in texts[:400]])
    want = np.concatenate([np.asarray([1] + d, dtype=np.int64) for d in docs])
    val_shards = list_shards(out, "val")
    assert all("_bytes_" not in p.name for p in val_shards) and len(val_shards) == -(-len(want) // 150_000)
    sidecars = sorted(out.glob("fineweb_val_bytes_*.bin"))
    assert [p.name for p in sidecars] == [p.name.replace("val_", "val_bytes_") for p in val_shards]
    assert not list(out.glob("fineweb_train_bytes_*"))  # val only
    assert np.array_equal(_concat(val_shards), want)
    side = _concat(sidecars)
    assert np.array_equal(side, token_bytes(want, piece_table(sp)))
    decoded = sum(len(decode(d, strict=False).encode("utf-8")) for d in sp.decode(docs))
    manifest = json.loads((out / "manifest.json").read_text())
    assert int(side.sum()) == decoded == manifest["splits"]["val"]["bytes"]
    assert manifest["text_transform"] == "lossless_caps_caseops_v1"
    tokens, counts = load_val_stream(out, 1024)
    n = (len(want) - 1) // 1024 * 1024 + 1
    assert np.array_equal(tokens.numpy(), want[:n]) and np.array_equal(counts.numpy(), side[:n])
    assert torch.equal(load_val_tokens(out, 1024), tokens)  # the sidecars are never read as tokens
    stats = data_stats(out, seq_len=1024)
    assert stats["byte_sidecar"] and stats["val_bytes_raw"] == decoded
    assert stats["val_bytes"] == int(side[1:n].sum())


def test_build_trains_a_caseops_tokenizer_with_reserved_operators(tmp_path: Path) -> None:
    texts = [
        t.replace(" a", " NASA a").replace(" b", " iPhone b") + " \ue001" for t in tiny_docs(700, seed=3)
    ]
    docs = write_jsonl(tmp_path / "docs.jsonl", texts)
    m = build_dataset([docs], tmp_path / "out", val_docs=100, train_vocab=400, workers=1, progress=False,
                      caseops=True)  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(4, 8)] == ["\ue001", "\ue002", "\ue003", "\ue004"]
    assert m["tokenizer"]["trainer"]["user_defined_symbols"] == "\ue001,\ue002,\ue003,\ue004"
    tokens, counts = load_val_stream(tmp_path / "out", 64)
    bos = np.flatnonzero(tokens.numpy() == 1)
    doc_ids = [d[1:].tolist() for d in np.split(tokens.numpy(), bos[1:])]
    per_doc = np.add.reduceat(counts.numpy().astype(np.int64), bos)
    for i, ids in enumerate(doc_ids[:-1]):  # the last document may be cut by the window truncation
        assert per_doc[i] == len(decode(sp.decode(ids)).encode("utf-8"))
    assert decode(sp.decode(doc_ids[0])) == " ".join(texts[0].split())  # case restored (spaces collapsed)


def test_build_refuses_a_tokenizer_that_does_not_fit_the_flag(test_data_dir: Path, tmp_path: Path) -> None:
    docs = write_jsonl(tmp_path / "d.jsonl", tiny_docs(20))
    plain = test_data_dir / "tokenizers" / "corpus_1024_bpe.model"
    with pytest.raises(CaseOpsTokenizerError, match=r"corpus_1024_bpe.model: not a CaseOps tokenizer"):
        build_dataset(
            [docs], tmp_path / "a", val_docs=5, tokenizer=plain, caseops=True, workers=1, progress=False
        )
    with pytest.raises(TokenizerError, match="CaseOps tokenizer .* pass --caseops"):
        build_dataset([docs], tmp_path / "b", val_docs=5, tokenizer=test_data_dir / RECORD_MODEL, workers=1,
                      progress=False)  # fmt: skip


def _sidecar_folder(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    tokens = tiny_stream(600).numpy()
    side = np.where(tokens == 1, 0, 2)
    for i, lo in enumerate(range(0, 600, 250)):
        write_shard(tmp_path / f"fineweb_val_{i:06d}.bin", tokens[lo : lo + 250])
        write_shard(tmp_path / f"fineweb_val_bytes_{i:06d}.bin", side[lo : lo + 250])
    return tmp_path, tokens, side


def test_val_stream_pairs_each_shard_with_its_sidecar(tmp_path: Path) -> None:
    folder, tokens, side = _sidecar_folder(tmp_path)
    assert len(list_shards(folder, "val")) == 3  # the glob fineweb_val_*.bin also matches the sidecars
    got, counts = load_val_stream(folder, 64, max_tokens=500)
    assert np.array_equal(got.numpy(), tokens[:449]) and np.array_equal(counts.numpy(), side[:449])
    for sidecar in folder.glob("fineweb_val_bytes_*.bin"):
        sidecar.unlink()
    assert load_val_stream(folder, 64)[1] is None  # a plain folder: the byte tables apply


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            "short",
            r"fineweb_val_bytes_000001.bin: 249 byte counts for the 250 tokens of fineweb_val_000001.bin",
        ),
        ("missing", r"val byte sidecar fineweb_val_bytes_000002.bin is missing \(1 of 3\)"),
        (
            "orphan",
            r"fineweb_val_bytes_000007.bin: byte sidecar without its val shard fineweb_val_000007.bin",
        ),
        ("no_bos", r"fineweb_val_000000.bin: the val stream starts with token 5, not BOS \(1\)"),
        (
            "misaligned",
            r"fineweb_val_bytes_000000.bin: BOS at token 0 of fineweb_val_000000.bin is charged 2",
        ),
    ],
)
def test_val_stream_errors_are_one_line(tmp_path: Path, damage: str, message: str) -> None:
    folder, tokens, side = _sidecar_folder(tmp_path)
    if damage == "short":
        write_shard(folder / "fineweb_val_bytes_000001.bin", side[250:499])
    elif damage == "missing":
        (folder / "fineweb_val_bytes_000002.bin").unlink()
    elif damage == "orphan":
        write_shard(folder / "fineweb_val_bytes_000007.bin", side[:10])
    elif damage == "no_bos":
        write_shard(folder / "fineweb_val_000000.bin", np.concatenate([[5], tokens[1:250]]))
    else:
        write_shard(folder / "fineweb_val_bytes_000000.bin", np.full(250, 2))
    with pytest.raises(ShardError, match=message) as err:
        load_val_stream(folder, 64)
    assert "\n" not in str(err.value)


def test_meter_counts_sidecar_bytes_by_position() -> None:
    tables = tiny_tables()
    tables.sidecar = torch.tensor([0, 5, 0, 7, 1, 2], dtype=torch.int16)
    meter = BpbMeter(tables)
    ids = torch.tensor([1, 9, 1, 9, 9, 9])
    meter.update(torch.ones(3), ids[:3], ids[1:4], positions=torch.tensor([1, 2, 3]))
    meter.update(
        torch.ones(2), ids[3:5], ids[4:6], mask=torch.tensor([False, True]), positions=torch.tensor([4, 5])
    )
    assert meter.result(distributed=False).bytes == 5 + 0 + 7 + 2
    with pytest.raises(ValueError, match="byte sidecar: byte counts need the targets' positions"):
        meter.update(torch.ones(1), ids[:1], ids[1:2])
    assert tables.narrow(3, 6).target_bytes(ids[:2], ids[:2], torch.tensor([0, 2])).tolist() == [7, 2]


def test_every_eval_mode_and_training_validation_divide_by_the_sidecar() -> None:
    from pgolf.eval.score import eval_nonoverlap, eval_sliding
    from pgolf.eval.ttt import eval_ttt
    from pgolf.train.validate import Validator

    model, tokens, tables = tiny_model(), tiny_stream(257), tiny_tables()
    gen = torch.Generator().manual_seed(1)
    tables.sidecar = torch.where(tokens == 1, 0, torch.randint(0, 9, tokens.shape, generator=gen)).to(
        torch.int16
    )
    want = int(tables.sidecar[1:].sum())
    plain = eval_nonoverlap(model, tokens, tables, seq_len=32, batch_seqs=4)
    sliding, _ = eval_sliding(model, tokens, tables, seq_len=32, stride=8, batch_seqs=4)
    ttt, _ = eval_ttt(model, tokens, tables, tiny_eval_cfg())
    assert plain.bytes == sliding.bytes == ttt.bytes == want
    loss, bpb = Validator(tokens, 32, tables, 3, DistInfo(0, 1, 0, torch.device("cpu")))(model)
    assert bpb == pytest.approx(plain.bpb, rel=1e-5)
    half = Validator(tokens, 32, tables, 3, DistInfo(1, 2, 1, torch.device("cpu")))  # rank 1's share
    assert int(half.tables.sidecar.sum()) == int(tables.sidecar[128:].sum())
