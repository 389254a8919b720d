"""The codec table of the per-group artifact: byte codecs by stable u8 id, and the choice of the smallest.

Each codec maps bytes to bytes and back exactly; the artifact stores the id of the codec of each frame
(ids never change meaning: a new codec gets a new id). Codecs that cannot find the end of their stream by
themselves (PPMd, the ANS coder) start with the decoded length as a LEB128 varint, counted in their bytes.

* `raw`       stored as is (wins on incompressible data, e.g. an ANS-coded permutation);
* `brotli`    quality 11, window 2^24; `lzma` xz container, preset 9|extreme; `lzma_raw` the same LZMA2
  stream without the xz container (~60 B less); `zstd` level 22 with a 2^27 window and long-distance
  matching;
* `ppmd{o}`   PPMd var. I (pyppmd Ppmd8, 16 MiB model, restart when full; var. H did not round-trip
  random bytes in pyppmd 1.3.1) of order o: context modelling of the byte stream;
* `ans`       order-0 rANS (constriction) with the stream's exact byte histogram stored in front: within a
  few bytes of the entropy bound n·H/8 plus the histogram, whatever the symbol distribution.

The ANS model's probabilities are the stored counts as float64; constriction quantizes them the same
way when encoding and decoding (perfect=False), so an artifact decodes with the constriction version that
wrote it (pinned in pyproject.toml).
"""

from __future__ import annotations

import lzma
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np


class CodecError(ValueError):
    """A codec id or name is unknown, or a stream does not decode."""


def put_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def get_varint(data: bytes, pos: int = 0) -> tuple[int, int]:
    """(value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise CodecError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def entropy_bound_bytes(data: bytes) -> float:
    """n·H/8 of the byte stream under its own order-0 distribution (the bound an order-0 coder meets)."""
    if not data:
        return 0.0
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    p = counts[counts > 0] / len(data)
    return max(0.0, float(-(counts[counts > 0] * np.log2(p)).sum() / 8.0))


# ------------------------------------------------------------------------------------------ library codecs
_LZMA_RAW = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
_ZSTD_WINDOW_LOG = 27  # 128 MiB: the largest window a default zstd decoder accepts
_PPMD_MEM = 16 << 20


def _brotli_enc(data: bytes) -> bytes:
    import brotli

    return brotli.compress(data, quality=11, lgwin=24)


def _brotli_dec(data: bytes) -> bytes:
    import brotli

    return brotli.decompress(data)


def _zstd_enc(data: bytes) -> bytes:
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(22, window_log=_ZSTD_WINDOW_LOG, enable_ldm=True)
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


def _zstd_dec(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor(max_window_size=1 << _ZSTD_WINDOW_LOG).decompress(data)


def _ppmd_enc(order: int) -> Callable[[bytes], bytes]:
    def enc(data: bytes) -> bytes:
        import pyppmd

        coder = pyppmd.Ppmd8Encoder(order, _PPMD_MEM, pyppmd.PPMD8_RESTORE_METHOD_RESTART)
        return put_varint(len(data)) + coder.encode(data) + coder.flush(endmark=False)

    return enc


def _ppmd_dec(order: int) -> Callable[[bytes], bytes]:
    def dec(data: bytes) -> bytes:
        import pyppmd

        n, pos = get_varint(data)
        # the range decoder reads 4 bytes ahead at start; a stream of 1-2 symbols is shorter than that
        decoder = pyppmd.Ppmd8Decoder(order, _PPMD_MEM, pyppmd.PPMD8_RESTORE_METHOD_RESTART)
        out = decoder.decode(data[pos:] + bytes(4), n) if n else b""
        if len(out) != n:
            raise CodecError(f"ppmd{order}: decoded {len(out)} bytes, expected {n}")
        return out

    return dec


# ------------------------------------------------------------------------------------------ order-0 ANS
# Counts are stored as one byte each, round(LOG_STEPS·log2 c) + 1 (c scaled down so the largest fits):
# a relative error of at most 2^(1/32) in each probability costs ~1e-4 bit per symbol, against ~1 more
# byte per symbol for exact varint counts, which mattered on groups of ~10^4 codes.
_LOG_STEPS = 16
_SET_LIST, _SET_MAP, _SET_RANGE = 0, 1, 2


def _symbol_set(present: np.ndarray) -> bytes:
    """The smallest of: a list, a 256-bit map, or a contiguous range of int8 values (lo, hi)."""
    signed = np.sort(present.astype(np.uint8).view(np.int8).astype(np.int64))
    options = [bytes([_SET_LIST, len(present) - 1]) + present.astype(np.uint8).tobytes()]
    options.append(bytes([_SET_MAP]) + np.packbits(np.isin(np.arange(256), present)).tobytes())
    if signed[-1] - signed[0] + 1 == len(present):
        options.append(bytes([_SET_RANGE]) + np.array([signed[0], signed[-1]], dtype=np.int8).tobytes())
    return min(options, key=len)


def _read_symbol_set(data: bytes, pos: int) -> tuple[np.ndarray, int]:
    mode = data[pos]
    if mode == _SET_LIST:
        k = data[pos + 1] + 1
        return np.frombuffer(data[pos + 2 : pos + 2 + k], dtype=np.uint8).astype(np.int64), pos + 2 + k
    if mode == _SET_MAP:
        bits = np.unpackbits(np.frombuffer(data[pos + 1 : pos + 33], dtype=np.uint8))
        return np.flatnonzero(bits).astype(np.int64), pos + 33
    if mode == _SET_RANGE:
        lo, hi = np.frombuffer(data[pos + 1 : pos + 3], dtype=np.int8).astype(np.int64)
        return np.sort(np.arange(lo, hi + 1).astype(np.int8).view(np.uint8)).astype(np.int64), pos + 3
    raise CodecError(f"ans: unknown symbol-set mode {mode}")


def _log_counts(counts: np.ndarray) -> np.ndarray:
    shift = max(0.0, np.log2(counts.max()) - 254 / _LOG_STEPS)
    return np.clip(np.round(_LOG_STEPS * (np.log2(counts) - shift)), 0, 254).astype(np.uint8) + 1


def _ans_model(levels: np.ndarray):
    import constriction

    probs = np.exp2((levels.astype(np.float64) - 1) / _LOG_STEPS)
    return constriction.stream.model.Categorical(probs, perfect=False)


def _ans_enc(data: bytes) -> bytes:
    """varint n | the symbol set | one log-count byte per symbol | rANS words (uint32 LE). One distinct
    symbol needs no counts and no words."""
    import constriction

    out = bytearray(put_varint(len(data)))
    if not data:
        return bytes(out)
    sym = np.frombuffer(data, dtype=np.uint8)
    counts = np.bincount(sym, minlength=256)
    present = np.flatnonzero(counts)
    out += _symbol_set(present)
    if len(present) == 1:
        return bytes(out)
    levels = _log_counts(counts[present].astype(np.float64))
    out += levels.tobytes()
    index = np.zeros(256, dtype=np.int32)
    index[present] = np.arange(len(present), dtype=np.int32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(index[sym], _ans_model(levels))
    out += coder.get_compressed().astype("<u4").tobytes()
    return bytes(out)


def _ans_dec(data: bytes) -> bytes:
    import constriction

    n, pos = get_varint(data)
    if n == 0:
        return b""
    present, pos = _read_symbol_set(data, pos)
    k = len(present)
    if k == 1:
        return bytes([int(present[0])]) * n
    levels = np.frombuffer(data[pos : pos + k], dtype=np.uint8)
    pos += k
    if len(levels) != k or (len(data) - pos) % 4:
        raise CodecError("ans: truncated histogram or a partial 32-bit word")
    words = np.frombuffer(data[pos:], dtype="<u4").astype(np.uint32)
    idx = constriction.stream.stack.AnsCoder(words).decode(_ans_model(levels), n)
    return present.astype(np.uint8)[idx].tobytes()


# ------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Codec:
    id: int
    name: str
    encode: Callable[[bytes], bytes]
    decode: Callable[[bytes], bytes]


_TABLE = [
    Codec(0, "raw", bytes, bytes),
    Codec(1, "brotli", _brotli_enc, _brotli_dec),
    Codec(2, "lzma", lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
    Codec(
        3,
        "lzma_raw",
        lambda d: lzma.compress(d, format=lzma.FORMAT_RAW, filters=_LZMA_RAW),
        lambda d: lzma.decompress(d, format=lzma.FORMAT_RAW, filters=_LZMA_RAW),
    ),
    Codec(4, "zstd", _zstd_enc, _zstd_dec),
    Codec(5, "ppmd2", _ppmd_enc(2), _ppmd_dec(2)),
    Codec(6, "ppmd4", _ppmd_enc(4), _ppmd_dec(4)),
    Codec(7, "ppmd8", _ppmd_enc(8), _ppmd_dec(8)),
    Codec(8, "ppmd16", _ppmd_enc(16), _ppmd_dec(16)),
    Codec(9, "ans", _ans_enc, _ans_dec),
]
CODECS = {c.name: c for c in _TABLE}
CODEC_IDS = {c.id: c for c in _TABLE}


def check_codec_names(names: Iterable[str], what: str = "quant.codecs") -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in CODECS]
    if unknown or not names:
        raise CodecError(f"{what}={names}: expected a non-empty list of {', '.join(CODECS)}")
    return names


def encode_with(data: bytes, name: str) -> bytes:
    return CODECS[name].encode(data)


def decode_with(data: bytes, codec_id: int) -> bytes:
    if codec_id not in CODEC_IDS:
        raise CodecError(f"unknown codec id {codec_id} (this pgolf knows {sorted(CODEC_IDS)})")
    try:
        return CODEC_IDS[codec_id].decode(data)
    except CodecError:
        raise
    except Exception as err:  # every library has its own error type
        raise CodecError(f"{CODEC_IDS[codec_id].name}: stream does not decode ({err})") from err


def encode_each(data: bytes, names: Iterable[str]) -> dict[str, int]:
    """{codec name: encoded bytes} for every codec in `names` (the per-group table of the benchmark)."""
    return {n: len(encode_with(data, n)) for n in names}


def encode_best(data: bytes, names: Iterable[str]) -> tuple[str, bytes, dict[str, int]]:
    """The smallest encoding among `names` (ties: the first listed): (codec name, bytes, {name: bytes} of
    every codec that round-tripped)."""
    best: tuple[str, bytes] | None = None
    tried: dict[str, int] = {}
    for n in names:
        blob = encode_with(data, n)
        # a library bug must cost bytes, never the artifact: a codec that does not decode its own
        # output exactly is skipped (pyppmd's PPMd var. H failed this on random bytes)
        try:
            exact = decode_with(blob, CODECS[n].id) == data
        except CodecError:
            exact = False
        if not exact:
            continue
        tried[n] = len(blob)
        if best is None or len(blob) < len(best[1]):
            best = (n, blob)
    if best is None:
        raise CodecError("encode_best: no codec to try")
    return best[0], best[1], tried
