"""Causal n-gram hints (SPEC §5.5): one left-to-right pass over the val stream, one hint per position.

At position p every expert reads tables that hold only tokens < p; only afterwards are the tables updated
with token p. All hashing is unsigned 64-bit with wrap-around, PRIME is SPEC §5.5's table of 32 primes.

Token expert. Context orders ngram_min_order..ngram_max_order step ngram_order_stride; order k's context
hash is XOR_{j<k} tokens[p-1-j]·PRIME[j]. Per order two open-addressing tables of 2^ngram_table_bits slots
(slot = (key·0x9E3779B97F4A7C15) & mask, at most 16 linear probes, count 0 = empty): contexts {key, count,
best_tok, best_count} and pairs {key = (ctx·1000003) XOR (tok·PRIME[order]), count}. The lookup goes from
the highest order down and takes the first context with best_count/count >= threshold and count >=
min_count (orders <= 10: 0.70, 3; 11-13: 0.60, 2; >= 14: 0.50, 2; thresholds × ngram_token_threshold_scale);
β = ngram_base_beta · best_count/count.

Within-word and word experts (eval.ngram_experts; #1557 runs them with β = 0, so they only feed the
agreement bonus). Same tables and update rule, 2^ngram_expert_table_bits slots each. Their gates read the
byte tables' flags (boundary, leading space) of token p-1 for the hint and of token p for the update.
  within: state (H, L), three tables by prefix length 1, 2, >=3; context H XOR (L·LEN_MIX); hint when
          token p-1 is neither a boundary nor word-initial and L > 0 (conf >= ngram_within_threshold,
          count >= 1); update: boundary resets, a word-initial token restarts H = extend(0, t, 0), L = 1,
          any other token is inserted under the context and extends H = extend(H, t, L), L += 1, with
          extend(h, t, i) = (h·PREFIX_BASE) XOR ((t + 1)·PRIME[i mod 32]).
  word:   a ring of the last 4 completed word hashes (w = w·31 + t over a word's tokens); context XOR_j
          ring[j]·PRIME[j], oldest first; hint when token p-1 is word-initial and the ring is full (conf >=
          ngram_word_threshold, count >= 3); update: a boundary completes the current word; a word-initial
          token completes it, then (ring full) is inserted under the new context with pair multiplier
          PRIME[4], and starts the next word.
Selection: candidates in the order token, within, word; one whose hint another candidate repeats gets
+ngram_agree_bonus once; the largest β wins, the first on ties.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from pgolf.config.schema import EvalConfig

MAX_PROBES = 16
SLOT_MULT = 0x9E3779B97F4A7C15
PAIR_MULT = 1000003
PREFIX_BASE = 1099511628211
LEN_MIX = 0x9E3779B185EBCA87
MASK64 = (1 << 64) - 1
PRIMES = (
    36313, 27191, 51647, 81929, 131071, 196613, 262147, 393241, 524309, 655373, 786433, 917521, 1048583,
    1179653, 1310729, 1441801, 1572869, 1703941, 1835017, 1966087, 2097169, 2228243, 2359319, 2490389,
    2621471, 2752549, 2883617, 3014687, 3145757, 3276833, 3407903, 3538973,
)  # fmt: skip
WITHIN_TABLES = 3  # prefix lengths 1, 2, >= 3
WORD_ORDER = 4  # completed words in the word expert's context
# Bytes per slot and table: context {key u64, count, best_tok, best_count u32} + pair {key u64, count u32}.
BYTES_PER_SLOT = 20 + 12


@dataclass(frozen=True)
class HintParams:
    orders: tuple[int, ...]  # ascending
    thresholds: tuple[float, ...]  # per order
    min_counts: tuple[int, ...]  # per order
    base_beta: float
    table_bits: int
    experts: bool  # the within-word and word experts
    within_threshold: float
    within_beta: float
    word_threshold: float
    word_beta: float
    agree_bonus: float
    expert_table_bits: int

    @classmethod
    def from_config(cls, cfg: EvalConfig) -> HintParams:
        if not 1 <= cfg.ngram_min_order <= cfg.ngram_max_order < len(PRIMES):
            raise ValueError(
                f"eval.ngram_min_order={cfg.ngram_min_order}, eval.ngram_max_order={cfg.ngram_max_order} must "
                f"satisfy 1 <= min <= max < {len(PRIMES)}"
            )
        if cfg.ngram_order_stride <= 0:
            raise ValueError(f"eval.ngram_order_stride={cfg.ngram_order_stride} must be positive")
        for name in ("ngram_table_bits", "ngram_expert_table_bits"):
            if not 4 <= getattr(cfg, name) <= 40:
                raise ValueError(f"eval.{name}={getattr(cfg, name)} must be in [4, 40]")
        orders = tuple(range(cfg.ngram_min_order, cfg.ngram_max_order + 1, cfg.ngram_order_stride))
        bands = [_band(k) for k in orders]
        return cls(
            orders=orders,
            thresholds=tuple(t * cfg.ngram_token_threshold_scale for t, _ in bands),
            min_counts=tuple(m for _, m in bands),
            base_beta=cfg.ngram_base_beta,
            table_bits=cfg.ngram_table_bits,
            experts=cfg.ngram_experts,
            within_threshold=cfg.ngram_within_threshold,
            within_beta=cfg.ngram_within_beta,
            word_threshold=cfg.ngram_word_threshold,
            word_beta=cfg.ngram_word_beta,
            agree_bonus=cfg.ngram_agree_bonus,
            expert_table_bits=cfg.ngram_expert_table_bits,
        )

    def table_bytes(self) -> int:
        expert_tables = WITHIN_TABLES + 1 if self.experts else 0
        return (len(self.orders) * (1 << self.table_bits) + expert_tables * (1 << self.expert_table_bits)) * (
            BYTES_PER_SLOT
        )


def _band(order: int) -> tuple[float, int]:
    """(confidence threshold, min count) of an order's band (SPEC §5.5)."""
    if order <= 10:
        return 0.70, 3
    if order <= 13:
        return 0.60, 2
    return 0.50, 2


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where that file does not exist)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_table_memory(params: HintParams, quiet: bool = False) -> int:
    """Print the tables' memory need; refuse (MemoryError) when it exceeds the available RAM."""
    need = params.table_bytes()
    have = available_memory_bytes()
    have_text = "unknown" if have is None else f"{have / 2**30:.2f} GiB"
    if not quiet:
        experts = f" + 4 expert tables × 2^{params.expert_table_bits}" if params.experts else ""
        print(
            f"ngram: {len(params.orders)} orders × 2^{params.table_bits} slots{experts} × {BYTES_PER_SLOT} B = "
            f"{need / 2**30:.2f} GiB of hint tables (available {have_text})"
        )
    if have is not None and need > have:
        raise MemoryError(
            f"n-gram hint tables need {need / 2**30:.2f} GiB but only {have / 2**30:.2f} GiB is available; "
            f"lower eval.ngram_table_bits (now {params.table_bits}) or the number of orders"
        )
    return need


PREFETCH_AHEAD = 8  # positions whose table slots are prefetched ahead of their turn


@intrinsic
def _prefetch(typingctx, arr, idx):
    """llvm.prefetch of arr[idx] (1-D array): the hint pass is bound by cache misses into tables far larger
    than the caches, and the slots of a later position are known in advance (tables never steer hashing)."""
    if not isinstance(arr, types.Array) or arr.ndim != 1:
        return None

    def codegen(context, builder, signature, args):
        aryty, idxty = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        ind = context.cast(builder, args[1], idxty, types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [ind])
        i8p = builder.bitcast(ptr, ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [i8p, i32(1), i32(3), i32(1)])  # for write, keep in all caches, data
        return context.get_dummy_value()

    return types.void(arr, idx), codegen


# numba's on-disk cache needs a real source file; a bundled train_gpt.py serves this module from memory.
_CACHE = os.path.isfile(globals().get("__file__") or "")


# Slot records, packed so that one probe touches one cache line: contexts u32[5], pairs u32[3].
KEY_LO, KEY_HI, COUNT, BEST, BEST_COUNT = 0, 1, 2, 3, 4
NO_TOKEN = 0xFFFFFFFF


@numba.njit(cache=_CACHE, nogil=True)
def _find_slot(table, o, key, mask):
    """Slot holding `key` in table[o], else the first empty slot on its probe path, else -1."""
    klo = np.uint32(key & np.uint64(0xFFFFFFFF))
    khi = np.uint32(key >> np.uint64(32))
    slot = (key * np.uint64(SLOT_MULT)) & mask
    for _ in range(MAX_PROBES):
        s = np.int64(slot)
        if table[o, s, COUNT] == 0:
            return s
        if table[o, s, KEY_LO] == klo and table[o, s, KEY_HI] == khi:
            return s
        slot = (slot + np.uint64(1)) & mask
    return np.int64(-1)


@numba.njit(cache=_CACHE, nogil=True)
def _prefetch_slot(table, o, key, mask):
    rec = table.shape[2]
    _prefetch(table.reshape(-1), (o * table.shape[1] + np.int64((key * np.uint64(SLOT_MULT)) & mask)) * rec)


@numba.njit(cache=_CACHE, nogil=True, inline="always")
def _accepts(ctx, o, s, threshold, min_count):
    """conf of context slot s when it passes (conf >= threshold, count >= min_count), else -1."""
    if s < 0 or ctx[o, s, COUNT] == 0 or ctx[o, s, BEST_COUNT] == 0:
        return -1.0
    count = ctx[o, s, COUNT]
    conf = ctx[o, s, BEST_COUNT] / count
    if conf >= threshold and count >= min_count:
        return conf
    return -1.0


@numba.njit(cache=_CACHE, nogil=True, inline="always")
def _insert(ctx, pairs, o, s, key, tok_id, prime, mask):
    """The update rule with the true token under context slot s (pair key (key·PAIR_MULT) XOR (tok·prime)):
    pair count++, context count++; the best token's count grows, or the token becomes best once its pair
    count exceeds the best count."""
    pkey = (key * np.uint64(PAIR_MULT)) ^ (np.uint64(tok_id) * prime)
    new_ctx = ctx[o, s, COUNT] == 0
    if new_ctx:
        ctx[o, s, KEY_LO] = np.uint32(key & np.uint64(0xFFFFFFFF))
        ctx[o, s, KEY_HI] = np.uint32(key >> np.uint64(32))
        ctx[o, s, BEST] = np.uint32(NO_TOKEN)
    ps = _find_slot(pairs, o, pkey, mask)
    pc = np.uint32(0)
    if ps >= 0:
        if pairs[o, ps, COUNT] == 0:
            pairs[o, ps, KEY_LO] = np.uint32(pkey & np.uint64(0xFFFFFFFF))
            pairs[o, ps, KEY_HI] = np.uint32(pkey >> np.uint64(32))
        pairs[o, ps, COUNT] += np.uint32(1)
        pc = pairs[o, ps, COUNT]
    ctx[o, s, COUNT] += np.uint32(1)
    if not new_ctx and np.int64(ctx[o, s, BEST]) == tok_id:
        ctx[o, s, BEST_COUNT] += np.uint32(1)
    elif pc > ctx[o, s, BEST_COUNT]:
        ctx[o, s, BEST] = np.uint32(tok_id)
        ctx[o, s, BEST_COUNT] = pc


@numba.njit(cache=_CACHE, nogil=True)
def _context_keys(tokens, p, orders, primes, out):
    """Context hashes of every order at position p from tokens[p-1], tokens[p-2], ...; returns how many
    orders have a full context (orders[:n])."""
    n_orders = orders.shape[0]
    h = np.uint64(0)
    oi = 0
    for j in range(min(orders[n_orders - 1], p)):
        h ^= np.uint64(tokens[p - 1 - j]) * primes[j]
        while oi < n_orders and orders[oi] == j + 1:
            out[oi] = h
            oi += 1
    return oi


@numba.njit(cache=_CACHE, nogil=True)
def _advance_experts(state, ring, t, boundary, lead, primes):
    """Move the experts' state (H, L, current word hash, its token count, words pushed) past token t."""
    if boundary:
        state[0], state[1] = np.uint64(0), np.uint64(0)
    elif lead or state[1] == 0:
        state[0] = np.uint64(t + 1) * primes[0]
        state[1] = np.uint64(1)
    else:
        state[0] = (state[0] * np.uint64(PREFIX_BASE)) ^ (np.uint64(t + 1) * primes[state[1] % np.uint64(32)])
        state[1] += np.uint64(1)
    if boundary or lead:
        if state[3] > 0:  # complete the current word
            for j in range(WORD_ORDER - 1):
                ring[j] = ring[j + 1]
            ring[WORD_ORDER - 1] = state[2]
            state[4] += np.uint64(1)
        state[2], state[3] = np.uint64(0), np.uint64(0)
    if not boundary:
        state[2] = state[2] * np.uint64(31) + np.uint64(t)
        state[3] += np.uint64(1)


@numba.njit(cache=_CACHE, nogil=True)
def _expert_keys(state, ring, primes, within_key, word_key):
    """Contexts before the next token: within (key, table or -1 when L = 0) and word (key, ring full)."""
    length = state[1]
    within_key[0] = state[0] ^ (length * np.uint64(LEN_MIX))
    within_key[1] = np.uint64(min(length, np.uint64(WITHIN_TABLES)))  # 0 = no within context
    h = np.uint64(0)
    for j in range(WORD_ORDER):
        h ^= ring[j] * primes[j]
    word_key[0] = h
    word_key[1] = np.uint64(1 if state[4] >= WORD_ORDER else 0)


@numba.njit(cache=_CACHE, nogil=True)
def _hints_kernel(
    tokens, boundary, lead, orders, thresholds, min_counts, base_beta, ctx, pairs, primes,
    experts, expert_knobs, wctx, wpairs, dctx, dpairs, hints, betas,
):  # fmt: skip
    numba.literally(experts)  # one specialisation per value: the token-only kernel carries no expert code
    within_thr, within_beta, word_thr, word_beta, agree = expert_knobs
    n_orders = orders.shape[0]
    slots = np.int64(ctx.shape[1])
    mask = np.uint64(slots - 1)
    emask = np.uint64(wctx.shape[1] - 1)
    ctx_flat = ctx.reshape(-1)
    pairs_flat = pairs.reshape(-1)
    # rings of context keys: those of position q are computed (and their slots prefetched) at q - AHEAD
    ring = PREFETCH_AHEAD + 1
    keys = np.zeros((ring, n_orders), np.uint64)
    usable_at = np.zeros(ring, np.int64)
    wkeys = np.zeros((ring, 2), np.uint64)
    dkeys = np.zeros((ring, 2), np.uint64)
    state = np.zeros(5, np.uint64)  # H, L, word hash, word tokens, words pushed
    words = np.zeros(WORD_ORDER, np.uint64)
    ctx_slots = np.zeros(n_orders, np.int64)
    cand_h = np.zeros(3, np.int64)
    cand_b = np.zeros(3, np.float64)
    n = tokens.shape[0]
    for q in range(min(PREFETCH_AHEAD, n)):
        usable_at[q % ring] = _context_keys(tokens, q, orders, primes, keys[q % ring])
        if experts:
            if q > 0:
                t = tokens[q - 1]
                _advance_experts(state, words, t, boundary[t], lead[t], primes)
            _expert_keys(state, words, primes, wkeys[q % ring], dkeys[q % ring])
    for p in range(n):
        q = p + PREFETCH_AHEAD
        if q < n:
            r = q % ring
            usable_at[r] = _context_keys(tokens, q, orders, primes, keys[r])
            tok_q = np.uint64(tokens[q])
            for o in range(usable_at[r]):
                home = np.int64((keys[r, o] * np.uint64(SLOT_MULT)) & mask)
                _prefetch(ctx_flat, (o * slots + home) * 5)
                pkey = (keys[r, o] * np.uint64(PAIR_MULT)) ^ (tok_q * primes[orders[o]])
                _prefetch(pairs_flat, (o * slots + np.int64((pkey * np.uint64(SLOT_MULT)) & mask)) * 3)
            if experts:
                t = tokens[q - 1]
                _advance_experts(state, words, t, boundary[t], lead[t], primes)
                _expert_keys(state, words, primes, wkeys[r], dkeys[r])
                wt = np.int64(wkeys[r, 1]) - 1
                if wt >= 0:
                    _prefetch_slot(wctx, wt, wkeys[r, 0], emask)
                    if not boundary[tokens[q]] and not lead[tokens[q]]:  # position q's within update
                        pkey = (wkeys[r, 0] * np.uint64(PAIR_MULT)) ^ (tok_q * primes[0])
                        _prefetch_slot(wpairs, wt, pkey, emask)
                if dkeys[r, 1] > 0:
                    _prefetch_slot(dctx, 0, dkeys[r, 0], emask)
                    if lead[t]:  # position q-1's word update reads this context
                        _prefetch_slot(
                            dpairs,
                            0,
                            (dkeys[r, 0] * np.uint64(PAIR_MULT)) ^ (np.uint64(t) * primes[4]),
                            emask,
                        )
        r = p % ring
        ctx_keys = keys[r]  # strict prefix only: hashed from tokens[p-1], tokens[p-2], ...
        usable = usable_at[r]
        hints[p] = -1
        betas[p] = 0.0
        for o in range(usable):
            ctx_slots[o] = _find_slot(ctx, o, ctx_keys[o], mask)
        for o in range(usable - 1, -1, -1):
            conf = _accepts(ctx, o, ctx_slots[o], thresholds[o], min_counts[o])
            if conf >= 0:
                hints[p], betas[p] = np.int64(ctx[o, ctx_slots[o], BEST]), base_beta * conf
                break
        if experts and p > 0:
            n_cand = 0
            if hints[p] >= 0:
                cand_h[0], cand_b[0] = hints[p], betas[p]
                n_cand = 1
            prev = tokens[p - 1]
            wt = np.int64(wkeys[r, 1]) - 1
            if not boundary[prev] and not lead[prev] and wt >= 0:
                s = _find_slot(wctx, wt, wkeys[r, 0], emask)
                if _accepts(wctx, wt, s, within_thr, 1) >= 0:
                    cand_h[n_cand], cand_b[n_cand] = np.int64(wctx[wt, s, BEST]), within_beta
                    n_cand += 1
            if lead[prev] and dkeys[r, 1] > 0:
                s = _find_slot(dctx, 0, dkeys[r, 0], emask)
                if _accepts(dctx, 0, s, word_thr, 3) >= 0:
                    cand_h[n_cand], cand_b[n_cand] = np.int64(dctx[0, s, BEST]), word_beta
                    n_cand += 1
            for i in range(n_cand):  # the agreement bonus, then the largest β (the first on ties)
                beta = cand_b[i]
                for j in range(n_cand):
                    if j != i and cand_h[j] == cand_h[i]:
                        beta += agree
                        break
                if i == 0 or beta > betas[p]:
                    hints[p], betas[p] = cand_h[i], beta
        # only now does token p enter the tables
        tok_id = tokens[p]
        for o in range(usable):
            if ctx_slots[o] >= 0:
                _insert(ctx, pairs, o, ctx_slots[o], ctx_keys[o], tok_id, primes[orders[o]], mask)
        if experts:
            wt = np.int64(wkeys[r, 1]) - 1
            if not boundary[tok_id] and not lead[tok_id] and wt >= 0:
                s = _find_slot(wctx, wt, wkeys[r, 0], emask)
                if s >= 0:
                    _insert(wctx, wpairs, wt, s, wkeys[r, 0], tok_id, primes[0], emask)
            r1 = (p + 1) % ring  # the word context once this token has completed the previous word
            if lead[tok_id] and p + 1 < n and dkeys[r1, 1] > 0:
                s = _find_slot(dctx, 0, dkeys[r1, 0], emask)
                if s >= 0:
                    _insert(dctx, dpairs, 0, s, dkeys[r1, 0], tok_id, primes[4], emask)


def token_flags(tables) -> tuple[np.ndarray, np.ndarray]:
    """(is_boundary, has_leading_space) per token id as uint8 arrays, from a ByteTables."""
    return (
        tables.is_boundary.cpu().numpy().astype(np.uint8),
        tables.has_leading_space.cpu().numpy().astype(np.uint8),
    )


def compute_hints(
    tokens: np.ndarray | torch.Tensor,
    params: HintParams,
    flags: tuple[np.ndarray, np.ndarray] | None = None,
    quiet: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(hints int64 [N] with -1 = none, betas float64 [N]) for every position of the stream (numba).
    `flags` = token_flags(byte tables) is needed when params.experts is on."""
    toks = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64))
    check_table_memory(params, quiet)
    hints = np.empty(toks.shape[0], np.int64)
    betas = np.empty(toks.shape[0], np.float64)
    if params.experts:
        if flags is None:
            raise ValueError("the within-word and word n-gram experts need the tokenizer's byte-table flags")
        boundary, lead = (np.ascontiguousarray(f, dtype=np.uint8) for f in flags)
        if toks.size and int(toks.max()) >= boundary.shape[0]:
            raise ValueError(f"token id {int(toks.max())} outside the byte tables ({boundary.shape[0]} ids)")
        eslots = 1 << params.expert_table_bits
    else:
        boundary = lead = np.zeros(1, np.uint8)
        eslots = 1
    # numpy's zeros come from calloc: pages are zeroed lazily by the OS, only where the pass writes
    slots, n_orders = 1 << params.table_bits, len(params.orders)
    p = params
    knobs = (p.within_threshold, p.within_beta, p.word_threshold, p.word_beta, p.agree_bonus)
    _hints_kernel(
        toks,
        boundary,
        lead,
        np.asarray(params.orders, np.int64),
        np.asarray(params.thresholds, np.float64),
        np.asarray(params.min_counts, np.int64),
        float(params.base_beta),
        np.zeros((n_orders, slots, 5), np.uint32),
        np.zeros((n_orders, slots, 3), np.uint32),
        np.asarray(PRIMES, np.uint64),
        bool(params.experts),
        tuple(float(k) for k in knobs),
        np.zeros((WITHIN_TABLES, eslots, 5), np.uint32),
        np.zeros((WITHIN_TABLES, eslots, 3), np.uint32),
        np.zeros((1, eslots, 5), np.uint32),
        np.zeros((1, eslots, 3), np.uint32),
        hints,
        betas,
    )
    return hints, betas
