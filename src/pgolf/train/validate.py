"""Validation during training: non-overlapping windows of the (truncated) val stream, bpb via BpbMeter.

The val stream is split into contiguous per-rank slices of whole sequences; loss and bytes are summed
over ranks by the meter. Without a tokenizer model (synthetic data) only the loss is reported.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from pgolf.config.schema import RunConfig
from pgolf.data.bytes import BpbMeter, ByteTables, build_byte_tables, load_tokenizer
from pgolf.data.val import load_val_stream
from pgolf.runtime import DistInfo, all_reduce_, autocast


def tokenizer_path(cfg: RunConfig) -> Path:
    return Path(cfg.data.tokenizer) if cfg.data.tokenizer else Path(cfg.data.dir) / "tokenizer.model"


class Validator:
    def __init__(
        self,
        tokens: Tensor,
        seq_len: int,
        tables: ByteTables | None,
        batch_seqs: int,
        dist: DistInfo,
        autocast_mode: str = "auto",
    ) -> None:
        num_seqs = (tokens.numel() - 1) // seq_len
        if num_seqs < 1:
            raise ValueError(f"validation stream of {tokens.numel()} tokens has no window of {seq_len} + 1")
        lo, hi = num_seqs * dist.rank // dist.world_size, num_seqs * (dist.rank + 1) // dist.world_size
        self.tokens = tokens[lo * seq_len : hi * seq_len + 1]
        self.seq_len, self.num_seqs = seq_len, hi - lo
        self.tables = None if tables is None else tables.narrow(lo * seq_len, hi * seq_len + 1)
        self.batch_seqs, self.dist = max(1, batch_seqs), dist
        self.autocast_mode = autocast_mode

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> tuple[float, float | None]:
        """(mean val loss in nats, bpb or None) of `model` (a raw GPT) over this rank's share, all ranks."""
        device = self.dist.device
        was_training = model.training
        model.eval()
        meter = BpbMeter(self.tables) if self.tables is not None else None
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, tokens (loss-only path)
        L = self.seq_len
        for start in range(0, self.num_seqs, self.batch_seqs):
            n = min(self.batch_seqs, self.num_seqs - start)
            chunk = self.tokens[start * L : (start + n) * L + 1].to(device)
            x, y = chunk[:-1].view(n, L), chunk[1:].view(n, L)
            with autocast(device, self.autocast_mode):
                nll = model.per_token_nll(x, y)
            if meter is not None:
                positions = torch.arange(start * L + 1, (start + n) * L + 1, device=device)
                meter.update(nll.reshape(-1), x.reshape(-1), y.reshape(-1), positions=positions)
            else:
                sums[0] += nll.double().sum()
                sums[1] += nll.numel()
        model.train(was_training)
        if meter is not None:
            res = meter.result(distributed=self.dist.distributed)
            return res.loss, res.bpb
        all_reduce_(sums, "sum")
        return float(sums[0] / sums[1]), None


def build_validator(cfg: RunConfig, dist: DistInfo, batch_seqs: int) -> tuple[Validator | None, str]:
    """The training-time validator and a one-line note (why it is missing, or what it scores)."""
    caps = [n for n in (cfg.train.val_max_tokens, cfg.data.max_val_tokens) if n > 0]
    try:
        tokens, sidecar = load_val_stream(cfg.data.dir, cfg.data.train_seq_len, min(caps) if caps else 0)
    except FileNotFoundError as err:
        return None, f"validation skipped: {err}"
    tables = None
    tok = tokenizer_path(cfg)
    if tok.is_file():
        tables = build_byte_tables(load_tokenizer(tok, cfg.model.vocab_size), cfg.model.vocab_size, sidecar)
    validator = Validator(tokens, cfg.data.train_seq_len, tables, batch_seqs, dist, cfg.train.autocast)
    note = f"val_tokens:{tokens.numel() - 1}" + (
        "" if tables is not None else f" val_bpb:na (no tokenizer at {tok})"
    )
    return validator, note
