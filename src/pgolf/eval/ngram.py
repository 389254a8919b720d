"""Causal n-gram tilt (SPEC §5.5, §9.3, §9.8): hints from one left-to-right pass, an exactly normalised tilt.

Hint precompute. One pass over the val stream; at position p the hint comes from tables that hold only
tokens < p, and only afterwards are the tables updated with token p. Context orders ngram_min_order..
ngram_max_order step ngram_order_stride; order k's context hash is XOR_{j<k} tokens[p-1-j]·PRIME[j] (uint64).
Per order two open-addressing tables of 2^ngram_table_bits slots (slot = (key·0x9E3779B97F4A7C15) & mask,
at most 16 linear probes, count 0 = empty): contexts {key, count, best_tok, best_count} and pairs
{key = (ctx·1000003) XOR (tok·PRIME[order]), count}. The lookup goes from the highest order down and takes
the first context with best_count/count >= threshold and count >= min_count (orders <= 10: 0.70, 3;
11-13: 0.60, 2; >= 14: 0.50, 2; thresholds × ngram_token_threshold_scale); hint = best_tok,
β = ngram_base_beta · best_count/count.

Only the token expert is implemented. The records' within-word and word-start experts run with β = 0
(SPEC §5.5), so they never win the hint themselves; their one effect on the score is the agree bonus
(+ngram_agree_bonus to a candidate whose hint another candidate repeats), and SPEC does not specify those
experts well enough to rebuild them. With a single expert no candidate can agree with another, so
ngram_agree_bonus has no effect here (`select_hint` applies it for any number of candidates).

Tilt. p_tilt(v) = p(v)·exp(β·[v = h]) / Z with Z = 1 + p_h·(e^β − 1), exactly normalised over the vocab;
the scored NLL becomes nll + ln Z − β·[y = h] at hinted positions (`NgramTilt`, an NllTransform).
"""

from __future__ import annotations

import os
import time
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
MASK64 = (1 << 64) - 1
# Bytes per slot and order: context {key u64, count, best_tok, best_count u32} + pair {key u64, count u32}.
BYTES_PER_SLOT = 20 + 12


def _primes(n: int) -> tuple[int, ...]:
    """The 4 multipliers SPEC §5.5 quotes, then primes spread above 100,000 (the rest of the record's
    table is not given; any fixed odd multipliers give a valid hash)."""
    out = [36313, 27191, 51647, 81929]
    candidate = 100_003
    while len(out) < n:
        if all(candidate % d for d in range(3, int(candidate**0.5) + 1, 2)):
            out.append(candidate)
            candidate += 7_919 * 2  # spread them out
        candidate += 2
    return tuple(out)


PRIMES = _primes(32)


@dataclass(frozen=True)
class HintParams:
    orders: tuple[int, ...]  # ascending
    thresholds: tuple[float, ...]  # per order
    min_counts: tuple[int, ...]  # per order
    base_beta: float
    table_bits: int

    @classmethod
    def from_config(cls, cfg: EvalConfig) -> HintParams:
        if not 1 <= cfg.ngram_min_order <= cfg.ngram_max_order < len(PRIMES):
            raise ValueError(
                f"eval.ngram_min_order={cfg.ngram_min_order}, eval.ngram_max_order={cfg.ngram_max_order} must "
                f"satisfy 1 <= min <= max < {len(PRIMES)}"
            )
        if cfg.ngram_order_stride <= 0:
            raise ValueError(f"eval.ngram_order_stride={cfg.ngram_order_stride} must be positive")
        if not 4 <= cfg.ngram_table_bits <= 40:
            raise ValueError(f"eval.ngram_table_bits={cfg.ngram_table_bits} must be in [4, 40]")
        orders = tuple(range(cfg.ngram_min_order, cfg.ngram_max_order + 1, cfg.ngram_order_stride))
        bands = [_band(k) for k in orders]
        return cls(
            orders=orders,
            thresholds=tuple(t * cfg.ngram_token_threshold_scale for t, _ in bands),
            min_counts=tuple(m for _, m in bands),
            base_beta=cfg.ngram_base_beta,
            table_bits=cfg.ngram_table_bits,
        )

    def table_bytes(self) -> int:
        return len(self.orders) * (1 << self.table_bits) * BYTES_PER_SLOT


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
        print(
            f"ngram: {len(params.orders)} orders × 2^{params.table_bits} slots × {BYTES_PER_SLOT} B = "
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
def _hints_kernel(tokens, orders, thresholds, min_counts, base_beta, ctx, pairs, primes, hints, betas):
    n_orders = orders.shape[0]
    slots = np.int64(ctx.shape[1])
    mask = np.uint64(slots - 1)
    ctx_flat = ctx.reshape(-1)
    pairs_flat = pairs.reshape(-1)
    # ring of context keys: those of position q are computed (and its slots prefetched) at q - AHEAD
    ring = PREFETCH_AHEAD + 1
    keys = np.zeros((ring, n_orders), np.uint64)
    usable_at = np.zeros(ring, np.int64)
    ctx_slots = np.zeros(n_orders, np.int64)
    n = tokens.shape[0]
    for q in range(min(PREFETCH_AHEAD, n)):
        usable_at[q % ring] = _context_keys(tokens, q, orders, primes, keys[q % ring])
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
        ctx_keys = keys[p % ring]  # strict prefix only: hashed from tokens[p-1], tokens[p-2], ...
        usable = usable_at[p % ring]
        hints[p] = -1
        betas[p] = 0.0
        for o in range(usable):
            ctx_slots[o] = _find_slot(ctx, o, ctx_keys[o], mask)
        for o in range(usable - 1, -1, -1):
            s = ctx_slots[o]
            if s < 0 or ctx[o, s, COUNT] == 0 or ctx[o, s, BEST_COUNT] == 0:
                continue
            count = ctx[o, s, COUNT]
            conf = ctx[o, s, BEST_COUNT] / count
            if conf >= thresholds[o] and count >= min_counts[o]:
                hints[p] = np.int64(ctx[o, s, BEST])
                betas[p] = base_beta * conf
                break
        # only now does token p enter the tables
        tok_id = tokens[p]
        tok = np.uint64(tok_id)
        for o in range(usable):
            s = ctx_slots[o]
            if s < 0:
                continue
            key = ctx_keys[o]
            new_ctx = ctx[o, s, COUNT] == 0
            if new_ctx:
                ctx[o, s, KEY_LO] = np.uint32(key & np.uint64(0xFFFFFFFF))
                ctx[o, s, KEY_HI] = np.uint32(key >> np.uint64(32))
                ctx[o, s, BEST] = np.uint32(NO_TOKEN)
            pkey = (key * np.uint64(PAIR_MULT)) ^ (tok * primes[orders[o]])
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


def compute_hints(
    tokens: np.ndarray | torch.Tensor, params: HintParams, quiet: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(hints int64 [N] with -1 = none, betas float64 [N]) for every position of the stream (numba)."""
    toks = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64))
    check_table_memory(params, quiet)
    hints = np.empty(toks.shape[0], np.int64)
    betas = np.empty(toks.shape[0], np.float64)
    # numpy's zeros come from calloc: pages are zeroed lazily by the OS, only where the pass writes
    slots, n_orders = 1 << params.table_bits, len(params.orders)
    _hints_kernel(
        toks,
        np.asarray(params.orders, np.int64),
        np.asarray(params.thresholds, np.float64),
        np.asarray(params.min_counts, np.int64),
        float(params.base_beta),
        np.zeros((n_orders, slots, 5), np.uint32),
        np.zeros((n_orders, slots, 3), np.uint32),
        np.asarray(PRIMES, np.uint64),
        hints,
        betas,
    )
    return hints, betas


def reference_hints(tokens, params: HintParams) -> tuple[np.ndarray, np.ndarray]:
    """Plain-Python implementation of the same algorithm (same tables, probing and update rule), written
    for clarity; the tests hold the numba kernel to it."""
    toks = [int(t) for t in np.asarray(tokens)]
    slots, mask = 1 << params.table_bits, (1 << params.table_bits) - 1
    ctx = [[None] * slots for _ in params.orders]  # slot -> [key, count, best_tok, best_count]
    pairs = [[None] * slots for _ in params.orders]  # slot -> [key, count]

    def find(table, key):
        slot = (key * SLOT_MULT) & mask
        for _ in range(MAX_PROBES):
            if table[slot] is None or table[slot][0] == key:
                return slot
            slot = (slot + 1) & mask
        return -1

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
        found = [find(ctx[o], key) for o, key in enumerate(keys)]
        for o in reversed(range(len(keys))):
            entry = ctx[o][found[o]] if found[o] >= 0 else None
            if entry is None or entry[3] == 0:
                continue
            conf = entry[3] / entry[1]
            if conf >= params.thresholds[o] and entry[1] >= params.min_counts[o]:
                hints[p], betas[p] = entry[2], params.base_beta * conf
                break
        for o, key in enumerate(keys):
            s = found[o]
            if s < 0:
                continue
            pkey = ((key * PAIR_MULT) & MASK64) ^ ((tok * PRIMES[params.orders[o]]) & MASK64)
            ps = find(pairs[o], pkey)
            pc = 0
            if ps >= 0:
                if pairs[o][ps] is None:
                    pairs[o][ps] = [pkey, 0]
                pairs[o][ps][1] += 1
                pc = pairs[o][ps][1]
            entry = ctx[o][s]
            if entry is None:
                entry = ctx[o][s] = [key, 0, -1, 0]
                entry[1] = 1
                if pc > 0:
                    entry[2], entry[3] = tok, pc
                continue
            entry[1] += 1
            if entry[2] == tok:
                entry[3] += 1
            elif pc > entry[3]:
                entry[2], entry[3] = tok, pc
    return hints, betas


def select_hint(candidates: list[tuple[int, float]], agree_bonus: float) -> tuple[int, float]:
    """SPEC §5.5 selection among expert candidates (hint, β): a candidate whose hint another candidate
    repeats gets +agree_bonus; the largest β wins. (-1, 0.0) when there is no candidate."""
    best = (-1, 0.0)
    for i, (hint, beta) in enumerate(candidates):
        if any(h == hint for j, (h, _) in enumerate(candidates) if j != i):
            beta += agree_bonus
        if best[0] < 0 or beta > best[1]:
            best = (hint, beta)
    return best


class NgramTilt:
    """The NllTransform of the tilt: nll' = nll + has_hint·(ln Z − β·[y = h]), Z = 1 + p_h·(e^β − 1),
    p_h = exp(logit_h − lse) with lse = nll + logit_y (SPEC §5.5). Hints are indexed by token position."""

    def __init__(self, hints: np.ndarray | torch.Tensor, betas: np.ndarray | torch.Tensor):
        self.hints = torch.as_tensor(np.asarray(hints), dtype=torch.int64)
        self.betas = torch.as_tensor(np.asarray(betas), dtype=torch.float64)
        self.coverage = float((self.hints >= 0).double().mean()) if self.hints.numel() else 0.0

    def __call__(
        self, nll: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        device = nll.device
        pos = positions.long().cpu()
        hint = self.hints[pos].to(device)
        beta = self.betas[pos].to(device)
        has = hint >= 0
        safe = hint.clamp(min=0)
        nll64 = nll.double()
        lse = nll64 + logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1).double()
        log_ph = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1).double() - lse
        log_z = torch.log1p(torch.exp(log_ph) * torch.expm1(beta))
        bonus = beta * (targets.long() == hint).double()
        return torch.where(has, nll64 + log_z - bonus, nll64).to(nll.dtype)


def build_tilt(tokens: torch.Tensor, cfg: EvalConfig) -> tuple[NgramTilt, float]:
    """Hints for the whole stream (rank 0 computes, every rank receives them) and the seconds it took."""
    import torch.distributed as dist

    from pgolf.runtime import dist_info

    start = time.perf_counter()
    info = dist_info()
    n = tokens.numel()
    if info.is_main:
        hints, betas = compute_hints(tokens.cpu().numpy(), HintParams.from_config(cfg))
        h = torch.from_numpy(hints)
        b = torch.from_numpy(betas)
    else:
        h = torch.empty(n, dtype=torch.int64)
        b = torch.empty(n, dtype=torch.float64)
    if info.distributed:
        # NCCL needs device tensors; gloo takes CPU ones
        dev = info.device if dist.get_backend() == "nccl" else torch.device("cpu")
        h, b = h.to(dev), b.to(dev)
        dist.broadcast(h, src=0)
        dist.broadcast(b, src=0)
        h, b = h.cpu(), b.cpu()
    return NgramTilt(h, b), time.perf_counter() - start
