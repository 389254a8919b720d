"""CaseOps (SPEC-1855 §1): the transform's worked examples and round trip (hypothesis + every val doc and a
fixed sample of train), its inverse's errors, and the byte sidecar against the record's tokenizer."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from conftest import read_docs
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf.data import caseops
from pgolf.data.caseops import ALLCAPS, CAPNEXT, ESC, TITLE, CaseOpsError, decode, encode
from pgolf.data.sidecar import CaseOpsTokenizerError, check_caseops_tokenizer, piece_table, token_bytes

RECORD_MODEL = "tokenizers/record_variants/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
T, A, C, E = TITLE, ALLCAPS, CAPNEXT, ESC


@pytest.mark.parametrize(
    "text, want",
    [  # SPEC-1855 §1.1, character for character
        ("The NASA Launch", f"{T}the {A}nasa {T}launch"),
        ("iPhone OpenAI", f"i{C}phone {T}open{C}a{C}i"),
        ("McDonald's", f"{T}mc{C}donald's"),
        ("NAÏVE", f"{A}naÏ{A}ve"),
        ("123ABC", f"123{A}abc"),
        ("I A a", f"{T}i {T}a a"),  # a single capital is rule 4 (TITLE), never ALLCAPS
        ("AbC", f"{T}ab{C}c"),
        ("\ue001x \ue004 \ue000", f"{E}\ue001x {E}\ue004 \ue000"),  # operators escaped, U+E000 plain
    ],
)
def test_worked_examples(text: str, want: str) -> None:
    assert encode(text) == want
    assert decode(want) == text


_chars = st.one_of(
    st.characters(),
    st.sampled_from([T, A, C, E, "\ue000", "a", "Z", "I", " ", "'", "Ï", "1"]),
)


@settings(max_examples=600, deadline=None)
@given(st.text(alphabet=_chars, max_size=40))
def test_round_trip_arbitrary_unicode(text: str) -> None:
    enc = encode(text)
    assert decode(enc) == text
    assert decode(enc, strict=False) == text
    assert not any(c.isascii() and c.isupper() for c in enc)  # the case lives in the operators only


@pytest.mark.parametrize(
    "bad, message",
    [
        (T, "dangling TITLE at the end"),
        (f"ab{E}", "dangling ESC at the end"),
        (f"{A} x", "ALLCAPS at position 0 is followed by ' '"),
        (f"{T}{T}a", "TITLE at position 0 is followed by '\\ue001'"),
        (f"{C}a", "CAPNEXT at position 0 does not follow a letter"),
        (f"{E}a", "ESC at position 0 escapes 'a'"),
        (f"a{T}b", "TITLE at position 1 is not at a word start"),
    ],
)
def test_inverse_rejects_dangling_and_misplaced_markers(bad: str, message: str) -> None:
    with pytest.raises(CaseOpsError, match="^CaseOps: " + message.replace("\\", "\\\\")):
        decode(bad)


def test_lenient_inverse_accepts_a_marker_after_nfkc_letters() -> None:
    # NFKC turns "™" into "TM": "™Brand" is encoded "™⟨T⟩brand", decoded by the tokenizer as "TM⟨T⟩brand".
    assert decode(f"TM{T}brand", strict=False) == "TMBrand"
    with pytest.raises(CaseOpsError, match="not at a word start"):
        decode(f"TM{T}brand")


def test_every_val_and_sampled_train_document_round_trips(test_data_dir: Path) -> None:
    val = read_docs(test_data_dir / "val" / "val_000.jsonl.gz")
    train = read_docs(test_data_dir / "train" / "train_001.jsonl.gz")
    sample = random.Random(0).sample(train, 1000)
    for i, text in enumerate(val + sample):
        assert decode(encode(text)) == text, f"document {i}"
    changed = [encode(t) != t for t in val]
    assert changed == [re.search("[A-Z\ue001-\ue004]", t) is not None for t in val]  # only ASCII capitals
    assert sum(changed) > 2000  # and operators change a document


@pytest.fixture(scope="module")
def record_sp(test_data_dir: Path) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor(model_file=str(test_data_dir / RECORD_MODEL))
    check_caseops_tokenizer(sp, RECORD_MODEL)
    return sp


def _doc_stream(sp, texts: list[str]) -> tuple[np.ndarray, list[list[int]]]:
    docs = sp.encode([encode(t) for t in texts])
    return np.concatenate([np.asarray([1] + d, dtype=np.int64) for d in docs]), docs


def test_record_tokenizer_pieces_and_sidecar_of_the_worked_examples(record_sp) -> None:
    table = piece_table(record_sp)
    stream, docs = _doc_stream(record_sp, ["The NASA Launch", "é", "\ue001A", "x\ue004\ue004"])
    assert [record_sp.id_to_piece(i) for i in docs[0]] == [T, "the", "▁", A, "nas", "a", "▁", T, "la", "unch"]
    side = token_bytes(stream, table)
    bos = np.flatnonzero(stream == 1)
    per_doc = np.split(side, bos[1:])
    assert per_doc[0].tolist() == [0, 0, 3, 1, 0, 3, 1, 1, 0, 2, 4]  # BOS, then SPEC-1855 §1.4's row
    assert per_doc[1].tolist() == [0, 0, 2]  # é = <0xC3><0xA9>: the completing piece carries 2
    assert [record_sp.id_to_piece(i) for i in docs[2]] == [E, T, T, "a"]
    assert per_doc[2].tolist() == [0, 0, 3, 0, 1]  # ESC 0, the escaped U+E001 3, the TITLE operator 0
    assert per_doc[3].tolist()[-2:] == [0, 3]  # x ESC ESC: the second ESC is the literal character


def test_sidecar_sums_to_the_decoded_val_text_exactly(test_data_dir: Path, record_sp) -> None:
    texts = read_docs(test_data_dir / "val" / "val_000.jsonl.gz")
    stream, docs = _doc_stream(record_sp, texts)
    side = token_bytes(stream, piece_table(record_sp)).astype(np.int64)
    per_doc = np.add.reduceat(side, np.flatnonzero(stream == 1))
    decoded = [decode(d, strict=False) for d in record_sp.decode(docs)]
    want = np.array([len(d.encode("utf-8")) for d in decoded])
    assert np.flatnonzero(per_doc != want).size == 0
    assert int(side.sum()) == 5_019_754  # = the sp8192 byte tables' count of the same docs (NFKC text)
    assert len(stream) - len(docs) == 1_609_859  # CaseOps tokens: +18.4 % over sp8192's 1,359,395


def test_sidecar_errors_name_the_token(record_sp) -> None:
    table = piece_table(record_sp)
    esc, lead = 7, record_sp.piece_to_id("<0xC3>")
    with pytest.raises(ValueError, match="ESC at token 1 .* escapes no operator"):
        token_bytes(np.array([1, esc, record_sp.piece_to_id("a")]), table)
    with pytest.raises(ValueError, match="UTF-8 character at token 1 .* is cut short"):
        token_bytes(np.array([1, lead]), table)
    with pytest.raises(ValueError, match="continuation byte piece has no lead"):
        token_bytes(np.array([1, record_sp.piece_to_id("<0xA9>")]), table)


def test_plain_tokenizer_is_not_caseops(test_data_dir: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(test_data_dir / "tokenizers" / "fineweb_8192_bpe.model"))
    with pytest.raises(CaseOpsTokenizerError, match="not a CaseOps tokenizer: ids 4-7"):
        check_caseops_tokenizer(sp, "fineweb_8192_bpe.model")


def test_transform_name_is_the_records() -> None:
    assert caseops.TRANSFORM_NAME == "lossless_caps_caseops_v1"
    assert caseops.OPERATOR_IDS == {T: 4, A: 5, C: 6, E: 7}
