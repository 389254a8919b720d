"""Scoring the validation stream: non-overlapping and sliding-window evaluation (SPEC §5.1, §5.2).

Conventions used by every eval module:
  * `tokens` is the whole val stream (1-D int64, CPU). A *target index* j (0 <= j < N-1) names the
    prediction of tokens[j+1] from tokens[:j+1]; its *position* is the token index p = j + 1 (the n-gram
    hints and the legality trace speak in positions, as SPEC §5.5 does).
  * A window plan is an int64 array [n, 3] of (ws, wlen, s): the window reads x = tokens[ws : ws+wlen],
    y = tokens[ws+1 : ws+wlen+1] and scores its targets at offsets [s, wlen).
Every plan scores every target exactly once; the windows are split into contiguous per-rank slices and
all sums go through BpbMeter (float64, all-reduced), the only bpb code in pgolf.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from pgolf.data.bytes import BpbMeter, BpbResult, ByteTables
from pgolf.runtime import all_reduce_, autocast, dist_info

# nll_transform(nll [n], logits [n, V], targets [n], positions [n]) -> new nll [n]. It must return, for
# every row, -log q(target) of a distribution q that depends only on the logits and the position: the
# legality checks call it with substituted targets to read q back.
NllTransform = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class EvalBudgetExceeded(RuntimeError):
    """The eval time budget ran out in the middle of a mode (raised on every rank at the same batch)."""


class Budget:
    """Wall-clock budget for all eval modes together: warns once at 90%, stops at 100%.

    `check()` is collective when distributed (max over ranks) so that every rank stops at the same batch
    and no rank is left waiting in an all-reduce.
    """

    def __init__(self, seconds: float | None, start: float | None = None):
        self.seconds = seconds if seconds and seconds > 0 else None
        self.start = time.monotonic() if start is None else start
        self.warned = False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def check(self) -> None:
        if self.seconds is None:
            return
        elapsed = self.elapsed()
        flag = torch.tensor([1.0 if elapsed >= self.seconds else 0.0], dtype=torch.float64)
        all_reduce_(flag, "max")
        if flag.item() > 0:
            raise EvalBudgetExceeded(
                f"eval time budget of {self.seconds:.0f} s reached after {elapsed:.1f} s"
            )
        if not self.warned and elapsed >= 0.9 * self.seconds:
            self.warned = True
            if dist_info().is_main:
                print(f"warning: eval has used {elapsed:.1f} s of its {self.seconds:.0f} s budget (90%)")


@dataclass
class EvalTrace:
    """What an eval pass did, in order, for the legality checks (single process).

    events: ("score", positions ndarray) for every scored batch (after any tilt) and ("train", lo, hi) for
    every parameter update, [lo, hi) being the token positions the update read.
    probes: position -> log-probabilities [V] of the (tilted) predictive distribution the pass used there.
    """

    probe_positions: frozenset[int] = frozenset()
    events: list[tuple] = field(default_factory=list)
    scores: dict[int, list[float]] = field(default_factory=dict)
    probes: dict[int, torch.Tensor] = field(default_factory=dict)

    def on_score(self, positions: torch.Tensor, nll: torch.Tensor) -> None:
        pos = positions.detach().cpu().numpy().astype(np.int64)
        values = nll.detach().double().cpu().numpy()
        self.events.append(("score", pos))
        for p, v in zip(pos.tolist(), values.tolist()):
            self.scores.setdefault(p, []).append(v)

    def on_train(self, lo: int, hi: int) -> None:
        self.events.append(("train", int(lo), int(hi)))


@dataclass(frozen=True)
class ScoreOptions:
    """How a scoring pass runs, the same for every eval mode (passed whole, never field by field)."""

    device: torch.device | None = None  # None: the model's device
    autocast_mode: str = "auto"
    nll_transform: NllTransform | None = None  # e.g. the n-gram tilt; its NLL feeds a second meter
    trace: EvalTrace | None = None  # legality checks
    budget: Budget | None = None
    compile: bool = False

    def merged(self, **overrides) -> ScoreOptions:
        """These options with the given fields replaced (callers may pass fields as keywords)."""
        return replace(self, **overrides) if overrides else self


def nonoverlap_windows(total_targets: int, seq_len: int) -> np.ndarray:
    """Windows of seq_len targets side by side, each fully scored (the last one may be short)."""
    if total_targets <= 0 or seq_len <= 0:
        raise ValueError(f"need total_targets > 0 and seq_len > 0, got {total_targets}, {seq_len}")
    starts = np.arange(0, total_targets, seq_len, dtype=np.int64)
    lens = np.minimum(seq_len, total_targets - starts)
    return np.stack([starts, lens, np.zeros_like(starts)], axis=1)


def sliding_windows(total_targets: int, seq_len: int, stride: int) -> np.ndarray:
    """SPEC §5.2: starts 0, stride, 2·stride, … while ws + (seq_len - stride) < total_targets; the first
    window is scored whole, every later one only at offsets [seq_len - stride, wlen)."""
    if not 0 < stride <= seq_len:
        raise ValueError(f"eval.stride={stride} must be in [1, eval.seq_len={seq_len}]")
    if total_targets <= 0:
        raise ValueError(f"need at least one target, got total_targets={total_targets}")
    context = seq_len - stride
    starts = np.arange(0, max(total_targets - context, 1), stride, dtype=np.int64)
    lens = np.minimum(seq_len, total_targets - starts)
    first = np.full_like(starts, context)
    first[0] = 0
    return np.stack([starts, lens, first], axis=1)


def rank_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous share [lo, hi) of n items for `rank` (the first n % world ranks get one more)."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def window_batch(tokens: torch.Tensor, windows: np.ndarray, seq_len: int) -> tuple[torch.Tensor, ...]:
    """(x, y, mask, positions) [B, seq_len] for a batch of windows; short windows are zero-padded so every
    forward has the same shape, and the padding is masked out."""
    win = torch.from_numpy(np.ascontiguousarray(windows))
    offs = torch.arange(seq_len, dtype=torch.int64)
    idx = win[:, :1] + offs  # token index of each input
    valid = offs < win[:, 1:2]
    mask = valid & (offs >= win[:, 2:3])
    last = tokens.numel() - 1
    x = torch.where(valid, tokens[idx.clamp(max=last)], 0)
    y = torch.where(valid, tokens[(idx + 1).clamp(max=last)], 0)
    return x, y, mask, idx + 1


@dataclass
class Scorer:
    """Runs the model over window batches and feeds BpbMeter(s). One per eval pass.

    With `nll_transform`, the plain NLL goes to `meter` and the transformed NLL to `tilt_meter`, so a single
    pass measures both (the tilt never changes what TTT trains on). Without a transform or probes the model's
    own `per_token_nll` is used (bounded memory); with them one batch of logits is materialised.
    """

    model: torch.nn.Module
    tables: ByteTables
    seq_len: int
    batch_seqs: int
    opts: ScoreOptions = ScoreOptions()

    def __post_init__(self) -> None:
        if self.batch_seqs <= 0:
            raise ValueError(f"eval.batch_seqs={self.batch_seqs} must be positive")
        self.device = self.opts.device or next(self.model.parameters()).device
        self.nll_transform, self.trace = self.opts.nll_transform, self.opts.trace
        self.meter = BpbMeter(self.tables)
        self.tilt_meter = BpbMeter(self.tables) if self.nll_transform is not None else None
        self._nll_fn = self.model.per_token_nll
        self._logits_fn = self.model.tail_logits
        if self.opts.compile:
            self._nll_fn = torch.compile(self.model.per_token_nll, dynamic=False)
            self._logits_fn = torch.compile(self.model.tail_logits, dynamic=False)

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, windows: np.ndarray, total_windows: int | None = None) -> None:
        """Score `windows` (this rank's share of `total_windows`) in batches of batch_seqs.

        Every rank runs as many batch steps as the largest share needs (idle steps score nothing) so that
        the collective budget check is issued the same number of times on every rank.
        """
        self.model.eval()
        world = dist_info().world_size
        largest = -(-(total_windows if total_windows is not None else len(windows)) // world)
        for i in range(0, max(largest, len(windows)), self.batch_seqs):
            if self.opts.budget is not None:
                self.opts.budget.check()
            if i < len(windows):
                batch = windows[i : i + self.batch_seqs]
                # Windows are run in groups of equal scored start (a sliding plan's first window is scored
                # whole, every other one only in its tail), so a group's forward skips its unscored part.
                for first in np.unique(batch[:, 2]).tolist():
                    self._score_batch(tokens, batch[batch[:, 2] == first], first)

    def _score_batch(self, tokens: torch.Tensor, windows: np.ndarray, first: int) -> None:
        """Score windows whose scored offsets all start at or after `first`: the last layer and the head
        run on positions first.. only, and every per-position tensor is cut to those columns."""
        x, y, mask, pos = (t.to(self.device) for t in window_batch(tokens, windows, self.seq_len))
        mask, pos = mask[:, first:], pos[:, first:]
        need_logits = self.wants_logits(pos, mask)
        logits = nll = None
        with autocast(self.device, self.opts.autocast_mode):
            if need_logits:
                logits = self._logits_fn(x, first).float()
            else:
                nll = self._nll_fn(x, y, first).float()
        self.record(x[:, first:], y[:, first:], mask, pos, nll, logits)

    def wants_logits(self, pos: torch.Tensor, mask: torch.Tensor) -> bool:
        """Whether `record` needs the batch's logits (a transform, or a probe position among the scored)."""
        return self.nll_transform is not None or bool(self._probes_in(pos, mask))

    def record(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
               nll: torch.Tensor | None, logits: torch.Tensor | None = None) -> None:  # fmt: skip
        """Feed the meters and the trace with the targets under `mask` ([B, T] inputs, targets, positions;
        nll [B, T], or fp32 logits [B, T, V] from which it is computed; logits are required when
        `wants_logits`). Other scoring loops (pgolf.eval.lora_ttt) record through here too."""
        probes = self._probes_in(pos, mask)
        if nll is None:
            nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        sel_nll, sel_x, sel_y, sel_pos = nll[mask], x[mask], y[mask], pos[mask]
        self.meter.update(sel_nll, sel_x, sel_y, positions=sel_pos)
        final = sel_nll
        if self.nll_transform is not None:
            final = self.nll_transform(sel_nll, logits[mask], sel_y, sel_pos)
            self.tilt_meter.update(final, sel_x, sel_y, positions=sel_pos)
        if self.trace is not None:
            self.trace.on_score(sel_pos, final)
            for b, t, p in probes:
                self.trace.probes[p] = self._distribution(logits[b, t], p)

    def _probes_in(self, pos: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, int, int]]:
        if self.trace is None or not self.trace.probe_positions:
            return []
        hits = []
        for b, t in mask.nonzero().tolist():
            p = int(pos[b, t])
            if p in self.trace.probe_positions:
                hits.append((b, t, p))
        return hits

    def _distribution(self, logits_row: torch.Tensor, position: int) -> torch.Tensor:
        """log q(v) for every v, read back through the scoring path with each v as the target."""
        vocab = logits_row.numel()
        candidates = torch.arange(vocab, device=logits_row.device)
        nll = torch.logsumexp(logits_row, 0) - logits_row
        if self.nll_transform is not None:
            rows = logits_row.unsqueeze(0).expand(vocab, vocab)
            nll = self.nll_transform(nll, rows, candidates, torch.full_like(candidates, position))
        return (-nll).double().cpu()

    def results(self) -> tuple[BpbResult, BpbResult | None]:
        """(plain, tilted or None), all-reduced across ranks."""
        plain = self.meter.result()
        return plain, (self.tilt_meter.result() if self.tilt_meter is not None else None)


def eval_windows(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    tables: ByteTables,
    windows: np.ndarray,
    *,
    seq_len: int,
    batch_seqs: int,
    opts: ScoreOptions | None = None,
    **options,
) -> tuple[BpbResult, BpbResult | None]:
    """Score a window plan; each rank takes a contiguous slice of the windows. Returns (plain, tilted).
    Keyword `options` are ScoreOptions fields that override `opts`."""
    info = dist_info()
    lo, hi = rank_slice(len(windows), info.rank, info.world_size)
    scorer = Scorer(model, tables, seq_len, batch_seqs, (opts or ScoreOptions()).merged(**options))
    scorer.score(tokens, windows[lo:hi], len(windows))
    return scorer.results()


def eval_nonoverlap(
    model: torch.nn.Module, tokens: torch.Tensor, tables: ByteTables, *, seq_len: int, batch_seqs: int, **kw
) -> BpbResult:
    """Non-overlapping windows of seq_len (SPEC §5.1 items 1-2): every target scored once."""
    windows = nonoverlap_windows(tokens.numel() - 1, seq_len)
    return eval_windows(model, tokens, tables, windows, seq_len=seq_len, batch_seqs=batch_seqs, **kw)[0]


def eval_sliding(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    tables: ByteTables,
    *,
    seq_len: int,
    stride: int,
    batch_seqs: int,
    **kw,
) -> tuple[BpbResult, BpbResult | None]:
    """Sliding-window eval (SPEC §5.2). Returns (plain, tilted); tilted is None without nll_transform."""
    windows = sliding_windows(tokens.numel() - 1, seq_len, stride)
    return eval_windows(model, tokens, tables, windows, seq_len=seq_len, batch_seqs=batch_seqs, **kw)


# The eval modes' entry points (pgolf.eval.modes): (model, tokens, tables, EvalConfig, ScoreOptions).


def nonoverlap_mode(model, tokens, tables, cfg, opts: ScoreOptions) -> tuple[BpbResult, None]:
    return eval_nonoverlap(
        model, tokens, tables, seq_len=cfg.seq_len, batch_seqs=cfg.batch_seqs, opts=opts
    ), None


def sliding_mode(model, tokens, tables, cfg, opts: ScoreOptions) -> tuple[BpbResult, BpbResult | None]:
    kw = dict(seq_len=cfg.seq_len, stride=cfg.stride, batch_seqs=cfg.batch_seqs, opts=opts)
    return eval_sliding(model, tokens, tables, **kw)
