"""Exact byte accounting and BpbMeter (SPEC §1.5, §9.4): the per-document byte invariant on the real val
split for both tokenizers, hand-built edge cases, float64 sums, masks, and the cross-rank all-reduce."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import test_data_common
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp
from conftest import read_docs

from pgolf.data.bytes import BpbMeter, build_byte_tables, load_tokenizer
from pgolf.runtime import shutdown_distributed

tiny_tokenizer = test_data_common.tiny_tokenizer  # the shared session fixture

BOS = 1


def stream_of(sp, texts: list[str]) -> tuple[np.ndarray, list[list[int]]]:
    docs = sp.encode(texts)
    stream = np.concatenate([np.asarray([BOS] + ids, dtype=np.int64) for ids in docs])
    return stream, docs


@pytest.mark.parametrize("model", ["fineweb_8192_bpe.model", "corpus_1024_bpe.model"])
def test_per_document_bytes_equal_utf8_of_decoded_text(test_data_dir: Path, model: str) -> None:
    sp = load_tokenizer(test_data_dir / "tokenizers" / model)
    texts = read_docs(test_data_dir / "val" / "val_000.jsonl.gz")
    assert len(texts) == 2020
    stream, docs = stream_of(sp, texts)
    tables = build_byte_tables(sp, sp.get_piece_size())
    t = torch.from_numpy(stream)
    per_target = tables.target_bytes(t[:-1], t[1:]).numpy()
    # Targets of document d are the tokens after its BOS up to the next BOS (the next BOS costs 0 bytes).
    bos_pos = np.flatnonzero(stream == BOS)
    assert len(bos_pos) == len(docs)
    per_doc = np.add.reduceat(per_target, bos_pos)  # target index i = stream position i + 1
    expected = np.array([len(s.encode("utf-8")) for s in sp.decode(docs)])
    bad = np.flatnonzero(per_doc != expected)
    assert bad.size == 0, f"{bad.size} docs differ, first {bad[:5].tolist()}"
    assert per_doc.sum() > 1_000_000


def _bytes(tables, prev: list[int], tgt: list[int]) -> list[int]:
    return tables.target_bytes(torch.tensor(prev), torch.tensor(tgt)).tolist()


def test_byte_fallback_pieces_count_one_byte_each(tiny_tokenizer: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    tables = build_byte_tables(sp, sp.get_piece_size())
    for text in ["🦜", "漢", "é"]:  # not in the tiny corpus: byte-fallback pieces <0xNN>
        ids = sp.encode(text)
        assert all(sp.is_byte(i) for i in ids) and len(ids) == len(text.encode("utf-8"))
        assert _bytes(tables, [BOS] + ids[:-1], ids) == [1] * len(ids)  # 1 byte each, never 6 (§9.4)


def test_leading_space_after_bos_and_elsewhere(tiny_tokenizer: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    tables = build_byte_tables(sp, sp.get_piece_size())
    space_pieces = [
        i
        for i in range(sp.get_piece_size())
        if sp.id_to_piece(i).startswith("▁") and len(sp.id_to_piece(i)) > 2
    ]
    piece = space_pieces[0]
    word = sp.id_to_piece(piece)[1:]
    plain = sp.piece_to_id(word[0])
    n = len(word.encode("utf-8"))
    assert tables.base_bytes[piece] == n and bool(tables.has_leading_space[piece])  # no "+1" in base (§9.4)
    assert _bytes(tables, [BOS], [piece]) == [n]  # the space right after BOS is not counted
    assert _bytes(tables, [plain], [piece]) == [n + 1]  # elsewhere the "▁" is one byte
    lone = sp.piece_to_id("▁")
    assert _bytes(tables, [plain, BOS], [lone, lone]) == [1, 0]


def test_control_unknown_and_out_of_range_ids(tiny_tokenizer: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    vocab = sp.get_piece_size()
    tables = build_byte_tables(sp, vocab + 64)  # model vocab larger than the tokenizer
    piece = next(i for i in range(vocab) if sp.id_to_piece(i).startswith("▁") and len(sp.id_to_piece(i)) > 1)
    n = int(tables.base_bytes[piece])
    for special in (0, 1, 2, 3, vocab, vocab + 63):  # pad, BOS (mid-stream), EOS, unk, ids past the tokenizer
        assert bool(tables.is_boundary[special])
        assert _bytes(tables, [piece], [special]) == [0]  # predicting it costs 0 bytes
        assert _bytes(tables, [special], [piece]) == [n]  # and no space byte after it
    assert _bytes(tables, [piece], [piece]) == [n + 1]


def test_meter_sums_float64_masks_and_bpb_formula(tiny_tokenizer: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    tables = build_byte_tables(sp, sp.get_piece_size())
    rng = np.random.default_rng(0)
    meter = BpbMeter(tables)
    all_nll, all_bytes = [], []
    for _ in range(5):
        ids = torch.from_numpy(rng.integers(0, sp.get_piece_size(), size=(4, 257)))
        nll = torch.from_numpy(rng.random((4, 256)).astype(np.float32) * 5 + 1e-3)
        mask = torch.from_numpy(rng.random((4, 256)) < 0.7)
        meter.update(nll, ids[:, :-1], ids[:, 1:], mask=mask)
        all_nll.append(nll[mask].double().numpy())
        all_bytes.append(tables.target_bytes(ids[:, :-1], ids[:, 1:])[mask].numpy())
    nll64, nbytes = np.concatenate(all_nll), int(np.concatenate(all_bytes).sum())
    res = meter.result(distributed=False)
    assert res.tokens == nll64.size and res.bytes == nbytes
    assert res.loss == pytest.approx(math.fsum(nll64) / nll64.size, rel=1e-12)
    assert res.bpb == pytest.approx(res.loss / math.log(2) * res.tokens / res.bytes, rel=1e-12)
    # float64 accumulation: float32 NLLs summed in float64 stay exact to ~1e-12 (a float32 sum would not)
    meter2 = BpbMeter(tables)
    for _ in range(50):
        meter2.update(torch.full((2_000,), 1e-4), torch.full((2_000,), 5), torch.full((2_000,), 5))
    assert meter2.loss_sum == pytest.approx(1e5 * float(np.float32(1e-4)), rel=1e-12)
    with pytest.raises(ValueError, match="bpb is undefined"):
        BpbMeter(tables).result(distributed=False)


def _meter_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # tables: every id is a 2-byte normal piece, no spaces, no boundaries
    from pgolf.data.bytes import ByteTables

    tables = ByteTables(
        torch.full((8,), 2, dtype=torch.int32),
        torch.zeros(8, dtype=torch.bool),
        torch.zeros(8, dtype=torch.bool),
    )
    meter = BpbMeter(tables)
    n = 3 + rank  # rank 0 scores 3 targets of nll 1, rank 1 scores 4 targets of nll 2
    meter.update(torch.full((n,), float(rank + 1)), torch.full((n,), 4), torch.full((n,), 5))
    res = meter.result()
    Path(out_dir, f"rank{rank}.txt").write_text(f"{res.loss!r} {res.bpb!r} {res.tokens} {res.bytes}")
    shutdown_distributed()


@pytest.mark.distributed
def test_meter_result_sums_across_ranks(tmp_path: Path) -> None:
    # fork: the children reuse the imported torch (spawn would re-import it, ~10 s on a loaded 2-core box)
    tmp_mp.start_processes(
        _meter_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    loss_sum, tokens, nbytes = 3 * 1.0 + 4 * 2.0, 7, 14
    for rank in range(2):
        loss, bpb, tok, nb = Path(tmp_path, f"rank{rank}.txt").read_text().split()
        assert (int(tok), int(nb)) == (tokens, nbytes)
        assert float(loss) == pytest.approx(loss_sum / tokens, rel=1e-12)
        assert float(bpb) == pytest.approx(loss_sum / (math.log(2) * nbytes), rel=1e-12)
