"""Exact bits-per-byte accounting (SPEC §1.5): the ONLY bpb code in pgolf.

Per token id three tables are built from the SentencePiece model:
  base_bytes[t]         0 for control/unknown/unused ids (and ids past the tokenizer), 1 for byte-fallback
                        pieces, else the UTF-8 length of the piece with one leading "▁" removed;
  has_leading_space[t]  the (normal) piece starts with "▁";
  is_boundary[t]        true only for control/unknown/unused ids and ids past the tokenizer.
A scored target y after input token x costs  base_bytes[y] + (has_leading_space[y] and not is_boundary[x]):
the "▁" space byte is counted once, and never right after BOS. Immune to the bugs of SPEC §9.4: no "+1" in
base_bytes for ▁-pieces, byte pieces count 1 byte (not 6), unused ids are boundaries, sums are float64.
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

    def to(self, device: torch.device | str) -> ByteTables:
        return ByteTables(
            self.base_bytes.to(device), self.has_leading_space.to(device), self.is_boundary.to(device)
        )

    def target_bytes(self, prev_ids: torch.Tensor, tgt_ids: torch.Tensor) -> torch.Tensor:
        """UTF-8 bytes each target stands for, given the token before it (same shapes, int64)."""
        prev_ids, tgt_ids = prev_ids.long(), tgt_ids.long()
        space = self.has_leading_space[tgt_ids] & ~self.is_boundary[prev_ids]
        return self.base_bytes[tgt_ids].long() + space.long()


def build_byte_tables(sp, vocab_size: int) -> ByteTables:
    """Tables of size max(tokenizer pieces, vocab_size); ids the tokenizer lacks are 0-byte boundaries."""
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
    return ByteTables(base, lead, boundary)


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
    ) -> None:
        """Add scored targets: `nll[i]` is the NLL of `tgt_ids[i]`, whose input token was `prev_ids[i]`."""
        if not (nll.shape == prev_ids.shape == tgt_ids.shape):
            raise ValueError(
                f"nll {tuple(nll.shape)}, prev {tuple(prev_ids.shape)}, tgt {tuple(tgt_ids.shape)} differ"
            )
        tables = (
            self.tables if self.tables.base_bytes.device == tgt_ids.device else self.tables.to(tgt_ids.device)
        )
        nbytes = tables.target_bytes(prev_ids, tgt_ids)
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
