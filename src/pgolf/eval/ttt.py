"""Legal score-first test-time training (SPEC §5.3, §5.4 condition 3; §9.7 momentum spans chunks).

The sliding windows are grouped into chunks of `ttt_chunk_tokens` targets (a window belongs to the chunk
of its first scored target). For chunk c = 0..C-1: (1) score all its windows with no_grad in eval mode;
(2) unless c is the last chunk, train on exactly the targets just scored: sequences of seq_len split across
ranks, for `ttt_epochs` epochs one SGD step per mini-batch of `ttt_batch_seqs` sequences per rank (as the
records do), gradients averaged across ranks by hand, clipped, cosine lr over chunks. Training always happens on a deep copy: the caller's (dequantized) model is never changed.

The loop is built from `plan_chunks`, `score_chunk` and `train_chunk` so that the legality tests can
assemble deliberately illegal variants (train before scoring, rescoring) from the same pieces.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from pgolf.config.schema import EvalConfig
from pgolf.data.bytes import BpbResult, ByteTables
from pgolf.eval.score import EvalTrace, ScoreOptions, Scorer, rank_slice, sliding_windows, window_batch
from pgolf.runtime import all_reduce_, autocast, dist_info


@dataclass
class Chunk:
    index: int
    windows: np.ndarray  # [n, 3] (ws, wlen, s) of the windows whose first scored target is in this chunk
    lo: int  # first target index scored in this chunk
    hi: int  # one past the last


def plan_chunks(windows: np.ndarray, chunk_tokens: int) -> list[Chunk]:
    """Group windows by ⌊(ws + s) / chunk_tokens⌋; each chunk's scored targets form one contiguous range
    [lo, hi) (the union of its windows' scored ranges, which tile the stream)."""
    if chunk_tokens <= 0:
        raise ValueError(f"eval.ttt_chunk_tokens={chunk_tokens} must be positive")
    ids = (windows[:, 0] + windows[:, 2]) // chunk_tokens  # non-decreasing along the plan
    cuts = np.flatnonzero(np.diff(ids)) + 1
    chunks = []
    for win in np.split(windows, cuts):
        lo = int(win[0, 0] + win[0, 2])
        hi = int(win[-1, 0] + win[-1, 1])
        chunks.append(Chunk(len(chunks), win, lo, hi))
    return chunks


def chunk_lr(base_lr: float, c: int, num_chunks: int) -> float:
    """Cosine over chunks, base_lr at chunk 0 reaching 0 at the last chunk."""
    if num_chunks <= 1:
        return base_lr
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * c / (num_chunks - 1)))


def trainable_parameters(model: torch.nn.Module, freeze_blocks: int) -> list[torch.nn.Parameter]:
    """All parameters except those of blocks.0 .. blocks.{freeze_blocks-1} (which get requires_grad False)."""
    frozen = tuple(f"blocks.{i}." for i in range(freeze_blocks))
    params = []
    for name, p in model.named_parameters():
        if name.startswith(frozen):
            p.requires_grad_(False)
        else:
            params.append(p)
    return params


class TTTState:
    """The adapted model copy and its SGD (momentum persists across chunks)."""

    def __init__(self, model: torch.nn.Module, cfg: EvalConfig, num_chunks: int, copy_model: bool = True):
        """copy_model False adapts `model` itself (a caller that already holds its own copy)."""
        self.model = copy.deepcopy(model) if copy_model else model
        self.params = trainable_parameters(self.model, cfg.ttt_freeze_blocks)
        self.opt = torch.optim.SGD(self.params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum)
        self.cfg = cfg
        self.num_chunks = num_chunks


def score_chunk(scorer: Scorer, tokens: torch.Tensor, chunk: Chunk) -> None:
    """Step (1): this rank's contiguous share of the chunk's windows, scored under no_grad in eval mode."""
    info = dist_info()
    lo, hi = rank_slice(len(chunk.windows), info.rank, info.world_size)
    scorer.score(tokens, chunk.windows[lo:hi], len(chunk.windows))


def train_chunk(
    state: TTTState,
    tokens: torch.Tensor,
    chunk: Chunk,
    *,
    seq_len: int,
    device: torch.device,
    autocast_mode: str = "auto",
    trace: EvalTrace | None = None,
) -> None:
    """Step (2) on the chunk's targets [lo, hi): sequences of seq_len split across ranks; every epoch takes
    one SGD step per mini-batch, mini-batch i being each rank's sequences [i·b, (i+1)·b) with
    b = ttt_batch_seqs (the records' loop; one step per epoch when a rank holds <= b sequences). Every rank
    takes as many steps as the largest share needs. A step's loss is the sum over all ranks' targets of the
    mini-batch divided by their total count (each rank scales by world/total, the gradients are averaged),
    so a step does not depend on how its targets are spread over the ranks."""
    cfg, model = state.cfg, state.model
    info = dist_info()
    starts = np.arange(chunk.lo, chunk.hi, seq_len, dtype=np.int64)
    lens = np.minimum(seq_len, chunk.hi - starts)
    shares = [rank_slice(len(starts), r, info.world_size) for r in range(info.world_size)]
    lo, hi = shares[info.rank]
    mine = np.stack([starts[lo:hi], lens[lo:hi], np.zeros(hi - lo, dtype=np.int64)], axis=1)
    b = cfg.ttt_batch_seqs
    steps = -(-max(h - lo_ for lo_, h in shares) // b)
    # targets of mini-batch i over all ranks (known to every rank without communication)
    step_targets = [
        sum(int(lens[lo_ + i * b : min(h, lo_ + (i + 1) * b)].sum()) for lo_, h in shares)
        for i in range(steps)
    ]
    for group in state.opt.param_groups:
        group["lr"] = chunk_lr(cfg.ttt_lr, chunk.index, state.num_chunks)
    model.train()
    for _ in range(cfg.ttt_epochs):
        for i in range(steps):
            batch = mine[i * b : (i + 1) * b]
            state.opt.zero_grad(set_to_none=False)
            if len(batch):
                if trace is not None:
                    trace.on_train(int(batch[0, 0]), int(batch[-1, 0] + batch[-1, 1] + 1))
                x, y, mask, _ = (t.to(device) for t in window_batch(tokens, batch, seq_len))
                count = int(mask.sum())
                with autocast(device, autocast_mode):
                    if count == mask.numel():  # full sequences: the model's fused mean loss
                        loss_sum = model(x, y).float() * count
                    else:  # a short last sequence: padded, masked
                        loss_sum = (model.per_token_nll(x, y).float() * mask).sum()
                (loss_sum * (info.world_size / step_targets[i])).backward()
            _average_gradients(state.params, info.world_size)
            if cfg.ttt_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(state.params, cfg.ttt_grad_clip)
            state.opt.step()
    model.eval()


def _average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Manual AVG all-reduce (no DDP): one flat buffer, so every rank issues the same single collective."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world_size <= 1:
        return
    flat = torch.cat([p.grad.reshape(-1).float() for p in params])
    all_reduce_(flat, "sum")
    flat /= world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def eval_ttt(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    tables: ByteTables,
    cfg: EvalConfig,
    opts: ScoreOptions | None = None,
    **options,
) -> tuple[BpbResult, BpbResult | None]:
    """Score-first TTT over sliding windows (SPEC §5.3). Returns (plain, tilted); tilted is None without
    opts.nll_transform. `model` is left untouched (a deep copy is adapted). Keyword `options` are
    ScoreOptions fields that override `opts`."""
    opts = (opts or ScoreOptions()).merged(**options)
    device = opts.device or next(model.parameters()).device
    windows = sliding_windows(tokens.numel() - 1, cfg.seq_len, cfg.stride)
    chunks = plan_chunks(windows, cfg.ttt_chunk_tokens)
    state = TTTState(model, cfg, len(chunks))
    scorer = Scorer(state.model, tables, cfg.seq_len, cfg.batch_seqs, opts)
    for chunk in chunks:
        score_chunk(scorer, tokens, chunk)
        if chunk.index < len(chunks) - 1:
            if opts.budget is not None:
                opts.budget.check()
            train_chunk(
                state,
                tokens,
                chunk,
                seq_len=cfg.seq_len,
                device=device,
                autocast_mode=opts.autocast_mode,
                trace=opts.trace,
            )
    return scorer.results()
