"""Row reordering by similarity (SPEC-1855 §5) and the exact cost of storing the permutation.

A greedy L1 nearest-neighbour chain puts similar rows next to each other, so that the column-major code
bytes of a group (adjacent bytes = one input column across neighbouring rows) carry context a PPM / LZ
coder can use; an order-0 coder gains nothing from it. The permutation is stored as its Lehmer code,
ANS-coded with a uniform model per position: log2(n!) bits plus at most one 32-bit word per stream, the
irreducible cost of an arbitrary order (uint16 storage would cost 16·n bits).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pgolf.quant.codecs import CodecError


def similarity_order(codes: torch.Tensor) -> np.ndarray:
    """Greedy chain from row 0: append the unused row with the smallest L1 distance to the last appended
    one (ties: the lowest index). Returns int64 [rows], order[i] = the original row stored at position i."""
    x = codes.detach().cpu().to(torch.int16).numpy()
    n = x.shape[0]
    order = np.empty(n, dtype=np.int64)
    if n == 0:
        return order
    remaining = np.arange(1, n)  # kept in index order, so argmin's first minimum is the lowest index
    rest = x[1:]
    last = 0
    for i in range(n):
        order[i] = last
        if i + 1 == n:
            break
        dist = np.abs(rest - x[last]).sum(axis=1, dtype=np.int64)
        j = int(np.argmin(dist))
        last = int(remaining[j])
        remaining = np.delete(remaining, j)
        rest = np.delete(rest, j, axis=0)
    return order


def lehmer_code(order: np.ndarray) -> np.ndarray:
    """code[i] = how many of the elements not yet placed are smaller than order[i] (0 <= code[i] < n-i)."""
    n = len(order)
    placed = np.zeros(n, dtype=bool)
    code = np.empty(n, dtype=np.int64)
    for i, v in enumerate(order):
        code[i] = v - int(placed[:v].sum())
        placed[v] = True
    return code


def from_lehmer(code: Sequence[int]) -> np.ndarray:
    left = list(range(len(code)))
    return np.array([left.pop(int(c)) for c in code], dtype=np.int64)


def encode_orders(orders: Sequence[np.ndarray]) -> bytes:
    """One uniform-ANS stream of the Lehmer codes of every permutation (the row counts come from the
    header, so the stream stores no lengths). Empty bytes when there is nothing to store."""
    import constriction

    codes, sizes = [], []
    for order in orders:
        n = len(order)
        if n >= 2:  # the last position of each code is always 0 and a size-1 alphabet is not codable
            codes.append(lehmer_code(order)[: n - 1])
            sizes.append(np.arange(n, 1, -1))
    if not codes:
        return b""
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(
        np.concatenate(codes).astype(np.int32),
        constriction.stream.model.Uniform(),
        np.concatenate(sizes).astype(np.int32),
    )
    return coder.get_compressed().astype("<u4").tobytes()


def decode_orders(data: bytes, rows: Sequence[int]) -> list[np.ndarray]:
    """Inverse of encode_orders for permutations of the given lengths."""
    import constriction

    sizes = [np.arange(n, 1, -1) for n in rows if n >= 2]
    flat = np.zeros(0, dtype=np.int64)
    if sizes:
        if len(data) % 4 or not data:
            raise CodecError("permutations: the stream is not a whole number of 32-bit words")
        words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
        all_sizes = np.concatenate(sizes).astype(np.int32)
        coder = constriction.stream.stack.AnsCoder(words)
        flat = coder.decode(constriction.stream.model.Uniform(), all_sizes).astype(np.int64)
    out, pos = [], 0
    for n in rows:
        if n < 2:
            out.append(np.arange(n, dtype=np.int64))
            continue
        out.append(from_lehmer(list(flat[pos : pos + n - 1]) + [0]))
        pos += n - 1
    return out


def permutation_bits(n: int) -> float:
    """log2(n!): the information in an arbitrary order of n rows."""
    return float(sum(np.log2(np.arange(2, n + 1)))) if n > 1 else 0.0
