"""Phased score-first TTT with per-document LoRA (SPEC-1855 part B §3.2-3.5): the eval mode `lora_ttt`.

Documents: document i runs from its BOS through the next BOS inclusive (P_i = len_i − 1 targets; the
stream's head before its first BOS, if any, is a document too), so documents tile the targets.
Schedule (`plan_schedule`, a function of the document lengths alone, the same in every run): documents
sorted by length (ties: stream order) are cut into batches of `lora_ttt_batch_docs`; the batches run
longest first; with several ranks batch k of the run order goes to rank k mod world, and the ranks move
in rounds of `world` batches.
Per batch (one adapter per document, `pgolf.model.lora`; B and the AdamW state reset, A warm from the
rank's previous batch of the same size): chunk c of every document scores its targets [cC, e_c) with
e_c = min((c+1)C, P) from the window [max(0, e_c − W), e_c) of its own tokens; the chunk's forward is
recorded first (float64 NLL and bytes, sidecar positions when present), then, for the documents that
have chunks left, one AdamW step on Σ_docs mean chunk NLL. Documents already finished sit out of the
forward (the adapters of the remaining rows are gathered: `LoraSet.rows`).
Global SGD phases: D = min(#docs, phased_prefix_docs, ⌊phased_prefix_frac·#docs⌋), boundaries
b_k = ⌊D·k/K⌋. After the round that brings the count of scored documents to b_k, ALL base parameters
are trained by SGD on the b_k shortest documents scored so far (the record's rule; the sort order of the
schedule, so every run selects the same ones), concatenated as [BOS … last token] spans plus one closing
BOS (no BOS,BOS pairs, unlike the record): chunks of phased_chunk_tokens targets, one step each, cosine
lr, the last chunk skipped (pgolf.eval.ttt.train_chunk, gradients averaged over ranks).
The one thing read ahead is the document segmentation (lengths, hence each document's opening BOS), as
in the record; `pass_order` gives the left-to-right order in which the pass consumes targets, the order
the legality check C1 is stated in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import torch

from pgolf.config.schema import EvalConfig
from pgolf.data.bytes import BpbResult, ByteTables
from pgolf.eval.score import ScoreOptions, Scorer, window_batch
from pgolf.eval.ttt import Chunk, TTTState, train_chunk
from pgolf.model.layers import BOS_ID
from pgolf.model.lora import Adapters, LoraSet
from pgolf.runtime import autocast, dist_info


def documents(tokens: torch.Tensor) -> np.ndarray:
    """[n, 2] int64 (start position, target count P) of the stream's documents in stream order."""
    n = tokens.numel()
    if n < 2:
        raise ValueError(f"the val stream needs at least 2 tokens, got {n}")
    starts = torch.nonzero(tokens[:-1] == BOS_ID).squeeze(1).numpy().astype(np.int64)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([np.zeros(1, np.int64), starts])
    ends = np.append(starts[1:], n - 1)
    return np.stack([starts, ends - starts], axis=1)


def prefix_documents(num_docs: int, cfg: EvalConfig) -> int:
    """D: how many documents the global phases reach in all."""
    d = min(num_docs, cfg.phased_prefix_docs)
    if cfg.phased_prefix_frac > 0:
        d = min(d, int(cfg.phased_prefix_frac * num_docs))
    return d


@dataclass
class Schedule:
    docs: np.ndarray  # [n, 2] (start, P) in stream order
    sort_rank: np.ndarray  # [n] each document's place in the ascending-length order
    batches: list[np.ndarray]  # document ids of each batch, in run order (longest first)
    world: int
    phases: dict[int, list[int]]  # round -> the b_k of the phases run after it

    def rounds(self) -> int:
        return -(-len(self.batches) // self.world)

    def scored_after(self, rnd: int) -> np.ndarray:
        """Ids of the documents scored once round `rnd` is done (every rank)."""
        return np.concatenate(self.batches[: (rnd + 1) * self.world])


def plan_schedule(docs: np.ndarray, cfg: EvalConfig, world: int) -> Schedule:
    """Length-sorted batches, longest first, and the rounds after which the global phases run."""
    order = np.argsort(docs[:, 1], kind="stable")
    sort_rank = np.empty_like(order)
    sort_rank[order] = np.arange(order.size)
    b = cfg.lora_ttt_batch_docs
    batches = [order[i : i + b] for i in range(0, order.size, b)][::-1]
    phases: dict[int, list[int]] = {}
    d, k_max = prefix_documents(len(docs), cfg), cfg.phased_num_phases
    if k_max > 0 and d > 0:
        sizes = np.cumsum([len(x) for x in batches])
        for k in range(1, k_max + 1):
            target = d * k // k_max
            if target > 0:
                rnd = int(np.searchsorted(sizes, target)) // world  # the batch whose docs reach b_k
                phases.setdefault(rnd, []).append(target)
    return Schedule(docs, sort_rank, batches, world, phases)


def pass_order(tokens: torch.Tensor, cfg: EvalConfig) -> np.ndarray:
    """Every target position once, in the order a 1-process pass consumes them: batch by batch, document
    slot by slot (documents of one batch are independent), position by position."""
    sched = plan_schedule(documents(tokens), cfg, 1)
    out = [np.arange(s + 1, s + p + 1) for batch in sched.batches for s, p in sched.docs[batch]]
    return np.concatenate(out)


def chunk_windows(docs: np.ndarray, c: int, chunk: int, context: int) -> np.ndarray:
    """Windows [n, 3] (ws, wlen, first scored offset) of chunk c of each document (all have one)."""
    start, p = docs[:, 0], docs[:, 1]
    end = np.minimum((c + 1) * chunk, p)
    s = np.maximum(0, end - context)
    return np.stack([start + s, end - s, c * chunk - s], axis=1)


class LoraTTT:
    """One pass: the adapted base copy, one rank's adapters, the scorer and the schedule."""

    def __init__(self, model: torch.nn.Module, tokens: torch.Tensor, tables: ByteTables, cfg: EvalConfig,
                 opts: ScoreOptions) -> None:  # fmt: skip
        self.cfg, self.opts, self.tokens = cfg, opts, tokens
        self.device = opts.device or next(model.parameters()).device
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        self.scorer = Scorer(self.model, tables, cfg.lora_ttt_context, 1, opts.merged(compile=False))
        self.info = dist_info()
        self.schedule = plan_schedule(documents(tokens), cfg, self.info.world_size)
        self.loras: dict[int, LoraSet] = {}
        self._nll = self.model.per_token_nll
        self._logits = self.model.tail_logits
        if opts.compile:
            self._nll = torch.compile(self.model.per_token_nll, dynamic=True)
            self._logits = torch.compile(self.model.tail_logits, dynamic=True)

    def run(self) -> BpbResult:
        sched, world, rank = self.schedule, self.info.world_size, self.info.rank
        for rnd in range(sched.rounds()):
            if self.opts.budget is not None:
                self.opts.budget.check()
            k = rnd * world + rank
            if k < len(sched.batches):
                self.run_batch(sched.batches[k])
            for target in sched.phases.get(rnd, []):
                self.global_phase(self.phase_documents(sched.scored_after(rnd), target))
        return self.scorer.results()[0]

    # ------------------------------------------------------------------ per-document LoRA
    def lora_for(self, batch: int) -> LoraSet:
        """The rank's adapters for batches of this size (A stays warm), with B zeroed."""
        cfg = self.cfg
        if batch not in self.loras:
            self.loras[batch] = LoraSet(self.model, batch, cfg.lora_ttt_rank, cfg.lora_ttt_alpha,
                                        seed=cfg.lora_ttt_seed).to(self.device)  # fmt: skip
        lora = self.loras[batch]
        lora.reset_B()
        return lora

    def run_batch(self, ids: np.ndarray) -> None:
        cfg = self.cfg
        docs = self.schedule.docs[ids]
        lora = self.lora_for(len(ids))
        opt = torch.optim.AdamW(
            lora.parameters(), lr=cfg.lora_ttt_lr, betas=(cfg.lora_ttt_beta1, cfg.lora_ttt_beta2),
            eps=cfg.lora_ttt_eps, weight_decay=cfg.lora_ttt_weight_decay,
        )  # fmt: skip
        num_chunks = -(-docs[:, 1] // cfg.lora_ttt_chunk)
        for c in range(int(num_chunks.max())):
            # the documents with a chunk c, alone in the forward (finished ones sit out)
            rows = np.flatnonzero(c < num_chunks)
            windows = chunk_windows(docs[rows], c, cfg.lora_ttt_chunk, cfg.lora_ttt_context)
            adapters = lora.rows(torch.from_numpy(rows).to(self.device))
            self.score_and_step(adapters, opt, windows, c < num_chunks[rows] - 1)

    def forward(self, lora: Adapters, windows: np.ndarray, grad: bool):
        """(nll [B, T'] fp32, x, y, mask, pos cut to the scored tail, logits or None) of one chunk."""
        width = int(windows[:, 1].max())
        x, y, mask, pos = (t.to(self.device) for t in window_batch(self.tokens, windows, width))
        first = int(windows[:, 2].min())
        mask, pos = mask[:, first:], pos[:, first:]
        logits = None
        with torch.set_grad_enabled(grad), autocast(self.device, self.opts.autocast_mode):
            if self.scorer.wants_logits(pos, mask):
                logits = self._logits(x, first, lora).float()
                nll = torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), y[:, first:].flatten(), reduction="none"
                ).view(pos.shape)
            else:
                nll = self._nll(x, y, first, lora).float()
        return nll, x[:, first:], y[:, first:], mask, pos, logits

    def score_and_step(self, lora: Adapters, opt: torch.optim.Optimizer, windows: np.ndarray,
                       train: np.ndarray) -> None:  # fmt: skip
        """Record the chunk's scores, then (documents with chunks left only) one AdamW step on them."""
        nll, x, y, mask, pos, logits = self.forward(lora, windows, bool(train.any()))
        self.scorer.record(x, y, mask, pos, nll.detach(), None if logits is None else logits.detach())
        if train.any():
            self.step(lora, opt, nll, mask, windows, train)

    def step(self, lora: Adapters, opt: torch.optim.Optimizer, nll: torch.Tensor, mask: torch.Tensor,
             windows: np.ndarray, train: np.ndarray) -> None:  # fmt: skip
        maskf = mask.float()
        per_doc = (nll * maskf).sum(1) / maskf.sum(1).clamp(min=1.0)
        loss = (per_doc * torch.from_numpy(train).to(per_doc.device).float()).sum()
        if self.opts.trace is not None:
            for ws, wlen, _ in windows[train]:
                # the window's opening BOS (when it is the document's) is the segmentation read ahead
                lo = int(ws) if self.tokens[int(ws)] != BOS_ID else int(ws) + 1
                self.opts.trace.on_train(lo, int(ws + wlen + 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # ------------------------------------------------------------------ global SGD phases
    def phase_documents(self, scored: np.ndarray, count: int) -> np.ndarray:
        """The `count` shortest of the scored documents, in ascending-length order."""
        ranked = scored[np.argsort(self.schedule.sort_rank[scored], kind="stable")]
        return ranked[:count]

    def global_phase(self, ids: np.ndarray) -> None:
        """SGD on every base parameter over the documents `ids` (each already scored)."""
        cfg, docs = self.cfg, self.schedule.docs[ids]
        spans = [self.tokens[s : s + p] for s, p in docs]
        cat = torch.cat([*spans, torch.tensor([BOS_ID], dtype=self.tokens.dtype)])
        if self.opts.trace is not None:
            for s, p in docs:
                self.opts.trace.on_train(int(s) + 1, int(s + p + 1))
        targets = cat.numel() - 1
        n = -(-targets // cfg.phased_chunk_tokens)
        sgd = replace(cfg, ttt_lr=cfg.phased_lr, ttt_momentum=cfg.phased_momentum, ttt_epochs=1,
                      ttt_batch_seqs=cfg.phased_batch_seqs, ttt_grad_clip=cfg.phased_grad_clip,
                      ttt_freeze_blocks=0)  # fmt: skip
        self.model.requires_grad_(True)
        state = TTTState(self.model, sgd, n, copy_model=False)
        for c in range(n - 1):  # the last chunk is skipped
            lo = c * cfg.phased_chunk_tokens
            chunk = Chunk(c, np.zeros((0, 3), np.int64), lo, min(lo + cfg.phased_chunk_tokens, targets))
            train_chunk(state, cat, chunk, seq_len=cfg.lora_ttt_context, device=self.device,
                        autocast_mode=self.opts.autocast_mode)  # fmt: skip
        self.model.requires_grad_(False)
        self.model.eval()


def eval_lora_ttt(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    tables: ByteTables,
    cfg: EvalConfig,
    opts: ScoreOptions | None = None,
    **options,
) -> tuple[BpbResult, None]:
    """The `lora_ttt` eval mode. `model` is left untouched (a deep copy is adapted)."""
    for key in ("lora_ttt_chunk", "lora_ttt_context", "lora_ttt_batch_docs", "lora_ttt_rank"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"eval.{key}={getattr(cfg, key)} must be positive")
    if cfg.lora_ttt_chunk > cfg.lora_ttt_context:
        raise ValueError(f"eval.lora_ttt_chunk={cfg.lora_ttt_chunk} must be <= eval.lora_ttt_context")
    opts = (opts or ScoreOptions()).merged(**options)
    return LoraTTT(model, tokens, tables, cfg, opts).run(), None
