"""Per-token original-byte counts of a CaseOps token stream (SPEC-1855 §1.3-1.4): the val byte sidecar.

Each token is charged the UTF-8 bytes it adds to the *original* text, i.e. to the CaseOps-decoded text
of the tokenizer's decoded pieces:
  * an operator piece (TITLE/ALLCAPS/CAPNEXT/ESC), BOS and other control ids: 0;
  * the operator character right after an ESC: its UTF-8 length (3);
  * a normal piece: the UTF-8 length of its text with "▁" read as a space (ASCII letters 1 byte each:
    case changes no length), except that the "▁" of a document's first piece is not counted (the decoder
    drops it, as the byte tables of SPEC §1.5 do after BOS);
  * a byte-fallback run: the piece that completes a character carries the character's full UTF-8 length,
    the others 0 (`é` = <0xC3><0xA9> -> [0, 2]).
So the counts of a document sum to len(caseops.decode(sp.decode(ids)).encode()) exactly, NFKC included.

The counts are computed from the token ids and the tokenizer's piece table (vectorised numpy), not from
SentencePiece's per-piece `surface`: in sentencepiece 0.2.3 `immutable_proto` is gone and `proto` needs
the protobuf package, and a surface is a span of the *unnormalised* input, which NFKC makes differ from
the decoded text ("Ａ" has a 3-byte surface but decodes to the 1-byte "A"). Counting the decoded pieces
keeps CaseOps bytes equal to what a plain tokenizer's byte tables count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pgolf.data.caseops import ESC, OPERATOR_IDS, OPERATORS

BOS_ID = 1
SPACE_PIECE = "\u2581"


class CaseOpsTokenizerError(ValueError):
    """The tokenizer does not reserve the CaseOps operators at ids 4-7; the message names the file."""


@dataclass
class PieceTable:
    """Per-id facts the counts need (size = the tokenizer's piece count)."""

    text_bytes: np.ndarray  # int32: UTF-8 bytes of a normal piece ("▁" = 1), 0 for operators/control/bytes
    leading_space: np.ndarray  # bool: the normal piece starts with "▁"
    byte_value: np.ndarray  # int16: the byte of a <0xNN> piece, -1 otherwise
    is_operator: np.ndarray  # bool: ids 4-7
    is_unknown: np.ndarray  # bool: <unk> (no byte fallback for that character: not countable)
    esc_id: int


def check_caseops_tokenizer(sp, path: str | Path) -> None:
    """The model reserves TITLE/ALLCAPS/CAPNEXT/ESC as whole pieces at ids 4-7 and has byte fallback."""
    n = sp.get_piece_size()
    got = [sp.id_to_piece(i) if i < n else None for i in OPERATOR_IDS.values()]
    if got != list(OPERATORS):
        raise CaseOpsTokenizerError(
            f"{path}: not a CaseOps tokenizer: ids 4-7 are {got!r}, expected the operators U+E001..U+E004 "
            "(train one with --caseops --train-tokenizer V)"
        )
    inside = [i for i in range(8, n) if any(op in sp.id_to_piece(i) for op in OPERATORS)]
    if inside:
        raise CaseOpsTokenizerError(
            f"{path}: piece {inside[0]} ({sp.id_to_piece(inside[0])!r}) contains a CaseOps operator; "
            "operators must be user_defined_symbols (whole pieces)"
        )
    if sum(sp.is_byte(i) for i in range(n)) != 256:
        raise CaseOpsTokenizerError(f"{path}: CaseOps needs a byte_fallback tokenizer (256 <0xNN> pieces)")


def is_caseops_tokenizer(sp) -> bool:
    n = sp.get_piece_size()
    return n > 7 and [sp.id_to_piece(i) for i in OPERATOR_IDS.values()] == list(OPERATORS)


def piece_table(sp) -> PieceTable:
    n = sp.get_piece_size()
    text_bytes = np.zeros(n, dtype=np.int32)
    leading = np.zeros(n, dtype=bool)
    byte_value = np.full(n, -1, dtype=np.int16)
    is_op = np.zeros(n, dtype=bool)
    unknown = np.zeros(n, dtype=bool)
    for i in range(n):
        piece = sp.id_to_piece(i)
        if sp.is_unknown(i):
            unknown[i] = True
        elif sp.is_control(i) or sp.is_unused(i):
            continue
        elif sp.is_byte(i):
            byte_value[i] = int(piece[3:5], 16)  # "<0xNN>"
        elif piece in OPERATORS:
            is_op[i] = True
        else:
            leading[i] = piece.startswith(SPACE_PIECE)
            text_bytes[i] = len(piece.replace(SPACE_PIECE, " ").encode("utf-8"))
    esc_id = sp.piece_to_id(ESC) if is_op.any() else -1
    return PieceTable(text_bytes, leading, byte_value, is_op, unknown, esc_id)


def _where(ids: np.ndarray, pos: int) -> str:
    return f"token {pos} (id {int(ids[pos])})"


def _escaped_bytes(ids: np.ndarray, table: PieceTable, out: np.ndarray) -> None:
    """In a run of k ESC tokens the 2nd, 4th, ... are literal ESC characters; an odd k escapes the
    operator after the run. Each literal operator character is 3 UTF-8 bytes."""
    esc = ids == table.esc_id
    if not esc.any():
        return
    before = np.concatenate([[False], esc[:-1]])
    after = np.concatenate([esc[1:], [False]])
    starts, ends = np.flatnonzero(esc & ~before), np.flatnonzero(esc & ~after)
    pos = np.flatnonzero(esc)
    run_start = starts[np.searchsorted(starts, pos, side="right") - 1]
    literal = pos[(pos - run_start) % 2 == 1]
    nbytes = len(ESC.encode("utf-8"))
    out[literal] = nbytes
    odd_ends = ends[(ends - starts) % 2 == 0]  # runs of odd length
    target = odd_ends + 1
    bad = (target >= len(ids)) | ~table.is_operator[ids[np.minimum(target, len(ids) - 1)]]
    if bad.any():
        raise ValueError(f"CaseOps stream: ESC at {_where(ids, int(odd_ends[bad][0]))} escapes no operator")
    out[target] = nbytes


def _byte_fallback_bytes(ids: np.ndarray, table: PieceTable, out: np.ndarray) -> None:
    """Each UTF-8 character spelled in <0xNN> pieces is charged on its last byte piece."""
    value = table.byte_value[ids].astype(np.int32)
    is_byte = value >= 0
    if not is_byte.any():
        return
    cont = is_byte & (value >= 0x80) & (value < 0xC0)
    length = np.select(
        [value < 0x80, value < 0xC0, value < 0xE0, value < 0xF0, value < 0xF8], [1, 0, 2, 3, 4], 0
    )
    bad_lead = is_byte & ~cont & ((length == 0) | (value == 0xC0) | (value == 0xC1))
    if bad_lead.any():
        raise ValueError(
            f"CaseOps stream: byte piece at {_where(ids, int(np.flatnonzero(bad_lead)[0]))} is no UTF-8 lead byte"
        )
    leads = np.flatnonzero(is_byte & ~cont)
    n = length[leads]
    last = leads + n - 1
    covered = 0
    for k in (1, 2, 3):
        q = leads[n > k] + k
        ok = q < len(ids)
        ok[ok] = cont[q[ok]]
        if not ok.all():
            raise ValueError(
                f"CaseOps stream: UTF-8 character at {_where(ids, int(leads[n > k][~ok][0]))} is cut short"
            )
        covered += len(q)
    if covered != int(cont.sum()):
        raise ValueError("CaseOps stream: a UTF-8 continuation byte piece has no lead byte before it")
    out[last] = n


def token_bytes(ids: np.ndarray, table: PieceTable) -> np.ndarray:
    """The sidecar of a token stream of whole documents ([BOS] + ids ...): uint16, one count per token."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        return np.zeros(0, dtype=np.uint16)
    if ids.max() >= len(table.text_bytes) or ids.min() < 0:
        raise ValueError(f"CaseOps stream: token id {int(ids.max())} is outside the tokenizer")
    if table.is_unknown[ids].any():
        pos = int(np.flatnonzero(table.is_unknown[ids])[0])
        raise ValueError(f"CaseOps stream: <unk> at token {pos} has no byte count (needs byte fallback)")
    out = table.text_bytes[ids].copy()
    doc_start = np.concatenate([[True], ids[:-1] == BOS_ID])
    out -= (doc_start & table.leading_space[ids]).astype(np.int32)
    if table.esc_id >= 0:
        _escaped_bytes(ids, table, out)
    _byte_fallback_bytes(ids, table, out)
    return out.astype(np.uint16)
