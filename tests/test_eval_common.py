"""Shared helpers of the eval tests (a tiny real GPT, synthetic byte tables) and the window-plan tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.config import EvalConfig, ModelConfig
from pgolf.data.bytes import ByteTables
from pgolf.eval.score import nonoverlap_windows, rank_slice, sliding_windows, window_batch

VOCAB = 64


def tiny_model(seed: int = 0, vocab: int = VOCAB) -> torch.nn.Module:
    """A 2-layer pgolf GPT with every matrix randomised (zero-init projections too), so attention mixes
    positions and TTT has something to change."""
    from pgolf.model import GPT

    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, rope_dims=8,
        xsa_last_n=2, num_loops=0, parallel_mode="none",
    )  # fmt: skip
    model = GPT(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.eval()


def tiny_tables(vocab: int = VOCAB, seed: int = 0) -> ByteTables:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(1, 5, (vocab,), generator=gen, dtype=torch.int32)
    lead = torch.rand(vocab, generator=gen) < 0.4
    boundary = torch.zeros(vocab, dtype=torch.bool)
    base[:2] = 0
    boundary[:2] = True  # pad and BOS
    lead[:2] = False
    return ByteTables(base, lead, boundary)


def tiny_stream(n: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    toks = torch.randint(2, vocab, (n,), generator=gen)
    toks[torch.rand(n, generator=gen) < 0.02] = 1
    toks[0] = 1
    return toks


def tiny_eval_cfg(**kw) -> EvalConfig:
    cfg = EvalConfig(seq_len=32, stride=8, batch_seqs=4, ttt_chunk_tokens=64, ttt_epochs=2, ttt_batch_seqs=2)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def stream_totals(tokens: torch.Tensor, tables: ByteTables) -> tuple[int, int]:
    """(targets, bytes) of the whole stream."""
    return tokens.numel() - 1, int(tables.target_bytes(tokens[:-1], tokens[1:]).sum())


def scored_counts(windows: np.ndarray, total: int) -> np.ndarray:
    counts = np.zeros(total, np.int64)
    for ws, wlen, s in windows:
        counts[ws + s : ws + wlen] += 1
    return counts


@pytest.mark.parametrize(
    "total,seq,stride", [(1000, 64, 16), (1024, 64, 64), (100, 64, 8), (70, 64, 24), (5, 64, 8)]
)
def test_sliding_plan_scores_every_target_once(total, seq, stride):
    win = sliding_windows(total, seq, stride)
    assert (scored_counts(win, total) == 1).all()
    assert win[0, 2] == 0 and (win[1:, 2] == seq - stride).all()
    assert (win[1:, 0] + seq - stride < total).all() and win[-1, 0] + stride + seq - stride >= total
    assert (win[:, 1] == np.minimum(seq, total - win[:, 0])).all()


def test_sliding_plan_matches_spec_count():
    # SPEC §5.2: 40,540,160 targets, window 2048, stride 64 -> 633,409 windows
    assert len(sliding_windows(40_540_160, 2048, 64)) == 633_409


def test_nonoverlap_plan_and_stride_equal_window():
    win = nonoverlap_windows(200, 64)
    assert (scored_counts(win, 200) == 1).all()
    assert np.array_equal(win, sliding_windows(200, 64, 64))


def test_rank_slices_tile_contiguously():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3):
            bounds = [rank_slice(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[i][1] == bounds[i + 1][0] for i in range(world - 1))


def test_window_batch_pads_and_masks():
    toks = torch.arange(50)
    x, y, mask, pos = window_batch(toks, np.array([[40, 9, 3]]), 16)
    assert x[0, :9].tolist() == list(range(40, 49)) and (x[0, 9:] == 0).all()
    assert y[0, :9].tolist() == list(range(41, 50))
    assert mask[0].nonzero().flatten().tolist() == list(range(3, 9))
    assert pos[0, 3].item() == 44  # position of target y = tokens[44]
