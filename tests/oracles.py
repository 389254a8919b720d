"""Plain reference implementations the tests (and benchmarks/eval.py) hold pgolf's fast paths to.

Written for clarity, straight from SPEC: nothing here ships in a submission.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pgolf.eval.ngram_hints import (
    LEN_MIX,
    MASK64,
    MAX_PROBES,
    PAIR_MULT,
    PREFIX_BASE,
    PRIMES,
    SLOT_MULT,
    HintParams,
)
from pgolf.eval.score import sliding_windows
from pgolf.runtime import autocast


class OpenTable:
    """One context table and its pair table (SPEC §5.5): open addressing, <= 16 linear probes."""

    def __init__(self, bits: int):
        self.mask = (1 << bits) - 1
        self.ctx: list = [None] * (1 << bits)  # slot -> [key, count, best_tok, best_count]
        self.pairs: list = [None] * (1 << bits)  # slot -> [key, count]

    def find(self, table: list, key: int) -> int:
        slot = (key * SLOT_MULT) & self.mask
        for _ in range(MAX_PROBES):
            if table[slot] is None or table[slot][0] == key:
                return slot
            slot = (slot + 1) & self.mask
        return -1

    def lookup(self, key: int, threshold: float, min_count: int) -> tuple[int, float] | None:
        """(best token, conf) when the context passes its threshold and min count."""
        s = self.find(self.ctx, key)
        entry = self.ctx[s] if s >= 0 else None
        if entry is None or entry[3] == 0:
            return None
        conf = entry[3] / entry[1]
        return (entry[2], conf) if conf >= threshold and entry[1] >= min_count else None

    def insert(self, key: int, prime: int, tok: int) -> None:
        s = self.find(self.ctx, key)
        if s < 0:
            return
        pkey = ((key * PAIR_MULT) & MASK64) ^ ((tok * prime) & MASK64)
        ps = self.find(self.pairs, pkey)
        pc = 0
        if ps >= 0:
            if self.pairs[ps] is None:
                self.pairs[ps] = [pkey, 0]
            self.pairs[ps][1] += 1
            pc = self.pairs[ps][1]
        entry = self.ctx[s]
        if entry is None:
            entry = self.ctx[s] = [key, 1, -1, 0]
            if pc > 0:
                entry[2], entry[3] = tok, pc
            return
        entry[1] += 1
        if entry[2] == tok:
            entry[3] += 1
        elif pc > entry[3]:
            entry[2], entry[3] = tok, pc


def select_hint(candidates: list[tuple[int, float]], agree_bonus: float) -> tuple[int, float]:
    """SPEC §5.5 selection among expert candidates (hint, β) in the order token, within, word: a candidate
    whose hint another candidate repeats gets +agree_bonus once; the largest β wins, the first on ties.
    (-1, 0.0) when there is no candidate."""
    best = (-1, 0.0)
    for i, (hint, beta) in enumerate(candidates):
        if any(h == hint for j, (h, _) in enumerate(candidates) if j != i):
            beta += agree_bonus
        if best[0] < 0 or beta > best[1]:
            best = (hint, beta)
    return best


def reference_hints(
    tokens, params: HintParams, flags: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """SPEC §5.5's hint stream, token by token: token expert, and with params.experts the within-word and
    word experts gated on `flags` = (is_boundary, has_leading_space) per token id."""
    toks = [int(t) for t in np.asarray(tokens)]
    token_tables = [OpenTable(params.table_bits) for _ in params.orders]
    within_tables = [OpenTable(params.expert_table_bits) for _ in range(3)]
    word_table = OpenTable(params.expert_table_bits)
    boundary, lead = flags if flags is not None else (None, None)
    H, L = 0, 0  # within-word prefix hash and length
    word, word_len, ring = 0, 0, []  # current word hash, its tokens, completed words (oldest first)

    def extend(h: int, t: int, i: int) -> int:
        return ((h * PREFIX_BASE) & MASK64) ^ (((t + 1) * PRIMES[i % 32]) & MASK64)

    def word_context() -> int:
        h = 0
        for j, w in enumerate(ring[-4:]):
            h ^= (w * PRIMES[j]) & MASK64
        return h

    hints = np.full(len(toks), -1, np.int64)
    betas = np.zeros(len(toks), np.float64)
    for p, tok in enumerate(toks):
        keys = []
        for k in params.orders:
            if k > p:
                break
            h = 0
            for j in range(k):
                h ^= (toks[p - 1 - j] * PRIMES[j]) & MASK64
            keys.append(h)
        candidates = []
        for o in reversed(range(len(keys))):
            found = token_tables[o].lookup(keys[o], params.thresholds[o], params.min_counts[o])
            if found is not None:
                candidates.append((found[0], params.base_beta * found[1]))
                break
        within_key = H ^ ((L * LEN_MIX) & MASK64)
        if params.experts and p > 0:
            prev = toks[p - 1]
            if not boundary[prev] and not lead[prev] and L > 0:
                found = within_tables[min(L, 3) - 1].lookup(within_key, params.within_threshold, 1)
                if found is not None:
                    candidates.append((found[0], params.within_beta))
            if lead[prev] and len(ring) >= 4:
                found = word_table.lookup(word_context(), params.word_threshold, 3)
                if found is not None:
                    candidates.append((found[0], params.word_beta))
        hints[p], betas[p] = select_hint(candidates, params.agree_bonus)
        # token p enters the tables
        for o, key in enumerate(keys):
            token_tables[o].insert(key, PRIMES[params.orders[o]], tok)
        if not params.experts:
            continue
        if boundary[tok]:
            H, L = 0, 0
        elif lead[tok] or L == 0:
            H, L = extend(0, tok, 0), 1
        else:
            within_tables[min(L, 3) - 1].insert(within_key, PRIMES[0], tok)
            H, L = extend(H, tok, L), L + 1
        if boundary[tok] or lead[tok]:
            if word_len > 0:
                ring.append(word)
            word, word_len = 0, 0
            if lead[tok] and len(ring) >= 4:
                word_table.insert(word_context(), PRIMES[4], tok)
        if not boundary[tok]:
            word, word_len = (word * 31 + tok) & MASK64, word_len + 1
    return hints, betas


@torch.no_grad()
def plain_sliding_nll(
    model: torch.nn.Module, tokens: torch.Tensor, seq_len: int, stride: int, autocast_mode: str = "off"
) -> float:
    """Mean NLL of the SPEC §5.2 plan the plain way: each window alone, logits of the whole window, the
    scored tail cut out. Compare with `eval_sliding` under the same `autocast_mode`."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ws, wlen, s in sliding_windows(tokens.numel() - 1, seq_len, stride).tolist():
        with autocast(device, autocast_mode):
            logits = model(tokens[ws : ws + wlen].to(device).unsqueeze(0))[0].float()
        y = tokens[ws + 1 : ws + wlen + 1].to(device)
        total += F.cross_entropy(logits[s:], y[s:], reduction="sum").item()
        count += wlen - s
    return total / count
