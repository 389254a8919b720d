"""Exact bits-per-byte accounting (SPEC §1.5): the ONLY bpb code in pgolf.

Per token id three tables are built from the SentencePiece model:
  base_bytes[t]         0 for control/unknown/unused ids (and ids past the tokenizer), 1 for byte-fallback
                        pieces, else the UTF-8 length of the piece with one leading "▁" removed;
  has_leading_space[t]  the (normal) piece starts with "▁";
  is_boundary[t]        true only for control/unknown/unused ids and ids past the tokenizer.
A scored target y after input token x costs  base_bytes[y] + (has_leading_space[y] and not is_boundary[x]):
the "▁" space byte is counted once, and never right after BOS. Immune to the bugs of SPEC §9.4: no "+1" in
base_bytes for ▁-pieces, byte pieces count 1 byte (not 6), unused ids are boundaries, sums are float64.

A CaseOps val stream (SPEC-1855 §1.4) carries its byte counts instead: `ByteTables.sidecar` holds the
original UTF-8 bytes of every stream position (pgolf.data.sidecar), and a target's bytes are then
sidecar[position]; callers pass the positions of their targets, and a sidecar without positions is an
error (so no eval mode can fall back to the tables, which would charge each operator as a piece).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pgolf.runtime import all_reduce_

SPACE_PIECE = "\u2581"  # "▁"


class TokenizerError(ValueError):
    """The tokenizer model is missing or does not fit the config; the message names the file."""


def load_tokenizer(path: str | Path, vocab_size: int | None = None):  # -> spm.SentencePieceProcessor
    """Load a SentencePiece model, checking it against the config's vocab and the ▁ piece (repo issue #897)."""
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer model {path} does not exist")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as err:
        raise TokenizerError(f"{path}: not a SentencePiece model ({err})") from None
    if vocab_size is not None and sp.get_piece_size() != vocab_size:
        raise TokenizerError(
            f"{path}: tokenizer vocab is {sp.get_piece_size()} but the config says model.vocab_size={vocab_size}"
        )
    if sp.piece_to_id(SPACE_PIECE) == sp.unk_id():
        raise TokenizerError(f"{path}: '▁' must be its own piece for exact space accounting (SPEC §1.5)")
    return sp


@dataclass
class ByteTables:
    base_bytes: torch.Tensor  # int32 [V]
    has_leading_space: torch.Tensor  # bool [V]
    is_boundary: torch.Tensor  # bool [V]
    sidecar: torch.Tensor | None = None  # int [stream length]: bytes per val-stream position (CaseOps)

    def to(self, device: torch.device | str) -> ByteTables:
        side = None if self.sidecar is None else self.sidecar.to(device)
        return ByteTables(
            self.base_bytes.to(device), self.has_leading_space.to(device), self.is_boundary.to(device), side
        )

    def narrow(self, start: int, stop: int) -> ByteTables:
        """The tables for the sub-stream tokens[start:stop] (positions then count from `start`)."""
        if self.sidecar is None:
            return self
        return ByteTables(self.base_bytes, self.has_leading_space, self.is_boundary, self.sidecar[start:stop])

    def target_bytes(
        self, prev_ids: torch.Tensor, tgt_ids: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """UTF-8 bytes each target stands for (int64, the shape of tgt_ids): from the token before it, or,
        with a sidecar, sidecar[positions] (`positions` = each target's index in the val stream)."""
        if self.sidecar is not None:
            if positions is None:
                raise ValueError("the val data has a byte sidecar: byte counts need the targets' positions")
            return self.sidecar[positions.long()].long()
        prev_ids, tgt_ids = prev_ids.long(), tgt_ids.long()
        space = self.has_leading_space[tgt_ids] & ~self.is_boundary[prev_ids]
        return self.base_bytes[tgt_ids].long() + space.long()


def build_byte_tables(sp, vocab_size: int, sidecar: torch.Tensor | None = None) -> ByteTables:
    """Tables of size max(tokenizer pieces, vocab_size); ids the tokenizer lacks are 0-byte boundaries.
    `sidecar`: the val stream's bytes per position (load_val_stream), which then replaces the tables."""
    n_sp = sp.get_piece_size()
    size = max(n_sp, vocab_size)
    base = torch.zeros(size, dtype=torch.int32)
    lead = torch.zeros(size, dtype=torch.bool)
    boundary = torch.ones(size, dtype=torch.bool)
    for i in range(n_sp):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE_PIECE):
            lead[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteTables(base, lead, boundary, sidecar)


@dataclass
class BpbResult:
    loss: float  # mean NLL in nats per target token
    bpb: float  # bits per UTF-8 byte
    tokens: int
    bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


class BpbMeter:
    """Accumulates per-target NLL (nats), target count and byte count in float64; all-reduces on result()."""

    def __init__(self, tables: ByteTables):
        self.tables = tables
        self.loss_sum = 0.0
        self.tokens = 0
        self.bytes = 0

    def update(
        self,
        nll: torch.Tensor,
        prev_ids: torch.Tensor,
        tgt_ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> None:
        """Add scored targets: `nll[i]` is the NLL of `tgt_ids[i]`, whose input token was `prev_ids[i]` and
        whose index in the val stream is `positions[i]` (needed when the tables carry a sidecar)."""
        if not (nll.shape == prev_ids.shape == tgt_ids.shape):
            raise ValueError(
                f"nll {tuple(nll.shape)}, prev {tuple(prev_ids.shape)}, tgt {tuple(tgt_ids.shape)} differ"
            )
        if self.tables.base_bytes.device != tgt_ids.device:
            self.tables = self.tables.to(tgt_ids.device)  # once: a sidecar is the size of the val stream
        nbytes = self.tables.target_bytes(prev_ids, tgt_ids, positions)
        nll = nll.double()
        if mask is not None:
            mask = mask.bool()
            nll, nbytes = nll[mask], nbytes[mask]
        self.loss_sum += float(nll.sum())
        self.tokens += int(nll.numel())
        self.bytes += int(nbytes.sum())

    def result(self, distributed: bool = True) -> BpbResult:
        """val_loss = Σnll/N and val_bpb = Σnll / (ln 2 · Σbytes), summed over ranks when distributed."""
        totals = torch.tensor([self.loss_sum, float(self.tokens), float(self.bytes)], dtype=torch.float64)
        if distributed:
            all_reduce_(totals, "sum")
        loss_sum, tokens, nbytes = float(totals[0]), int(totals[1]), int(totals[2])
        if tokens == 0 or nbytes == 0:
            raise ValueError(f"no bytes scored (tokens={tokens}, bytes={nbytes}): bpb is undefined")
        return BpbResult(
            loss=loss_sum / tokens, bpb=loss_sum / (math.log(2) * nbytes), tokens=tokens, bytes=nbytes
        )
