"""The codec table: every codec round-trips any byte string exactly; ANS meets the entropy bound; the
similarity order and its permutation stream invert exactly and cost log2(n!) bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgolf.config.schema import QuantConfig
from pgolf.quant.codecs import (
    CODECS,
    CodecError,
    check_codec_names,
    decode_with,
    encode_best,
    encode_with,
    entropy_bound_bytes,
    get_varint,
    put_varint,
)
from pgolf.quant.reorder import decode_orders, encode_orders, permutation_bits, similarity_order

EDGE_CASES = [b"", b"\x00", b"\xff", b"a" * 1000, b"ab", bytes(range(256)), bytes([0, 255] * 300)]


def gaussian_codes(n: int, sigma: float, bits: int = 6, seed: int = 0) -> bytes:
    r = 2 ** (bits - 1) - 1
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.normal(0, sigma, n)), -r, r).astype(np.int8).tobytes()


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("data", EDGE_CASES, ids=lambda d: f"len{len(d)}")
def test_edge_cases_round_trip(name, data):
    assert decode_with(encode_with(data, name), CODECS[name].id) == data


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.binary(max_size=3000),
        st.lists(st.integers(-31, 31), max_size=3000).map(lambda v: np.array(v, np.int8).tobytes()),
        st.tuples(st.integers(0, 255), st.integers(0, 5000)).map(lambda t: bytes([t[0]]) * t[1]),
    )
)
def test_every_codec_round_trips_random_symbol_arrays(data):
    for name, codec in CODECS.items():
        assert decode_with(codec.encode(data), codec.id) == data, name


def test_ans_is_within_one_percent_of_the_entropy_bound():
    for sigma in (0.7, 3.0, 12.0):
        data = gaussian_codes(50_000, sigma)
        bound = entropy_bound_bytes(data)
        assert bound < len(encode_with(data, "ans")) <= 1.01 * bound + 40, sigma


def test_entropy_bound_of_known_streams():
    assert entropy_bound_bytes(b"") == 0.0 and entropy_bound_bytes(b"x" * 99) == 0.0
    assert entropy_bound_bytes(bytes(range(256)) * 4) == pytest.approx(1024.0)  # 8 bits per byte
    assert entropy_bound_bytes(b"ab" * 400) == pytest.approx(100.0)  # 1 bit per byte


def test_encode_best_picks_the_smallest_and_reports_every_codec():
    data = gaussian_codes(20_000, 2.0)
    name, blob, tried = encode_best(data, list(CODECS))
    assert set(tried) == set(CODECS) and len(blob) == min(tried.values()) == tried[name]
    assert decode_with(blob, CODECS[name].id) == data
    assert encode_best(data, ["raw"])[0] == "raw"


def test_unknown_codecs_are_refused_by_name():
    with pytest.raises(CodecError, match="unknown codec id 200"):
        decode_with(b"abc", 200)
    with pytest.raises(CodecError, match=r"quant.codecs=\['gzip'\]"):
        check_codec_names(["gzip"])
    with pytest.raises(CodecError, match="does not decode"):
        decode_with(b"garbage", CODECS["brotli"].id)
    assert QuantConfig().codecs == list(CODECS)  # the default tries the whole table
    assert sorted(c.id for c in CODECS.values()) == list(range(len(CODECS)))  # stable, dense ids


def test_varint_round_trip():
    for n in (0, 1, 127, 128, 300, 2**31, 2**40 + 5):
        assert get_varint(put_varint(n) + b"tail") == (n, len(put_varint(n)))


def test_similarity_order_is_the_greedy_l1_chain():
    codes = torch.tensor([[0, 0], [5, 5], [1, 0], [4, 5], [1, 1], [9, 9]], dtype=torch.int8)
    # from row 0: nearest (0,0)->(1,0) d1 -> (1,1) d1 -> (4,5) d7 -> (5,5) d1 -> (9,9)
    assert similarity_order(codes).tolist() == [0, 2, 4, 3, 1, 5]
    ties = torch.zeros(4, 3, dtype=torch.int8)
    assert similarity_order(ties).tolist() == [0, 1, 2, 3]  # ties go to the lowest index


def test_permutations_cost_log2_n_factorial():
    rng = np.random.default_rng(1)
    orders = [rng.permutation(n) for n in (0, 1, 2, 3, 96, 1000, 384)]
    blob = encode_orders(orders)
    back = decode_orders(blob, [len(o) for o in orders])
    assert all(np.array_equal(a, b) for a, b in zip(orders, back))
    bound = sum(permutation_bits(len(o)) for o in orders) / 8
    assert bound <= len(blob) <= bound + 8  # at most the last 32-bit word of slack (plus rounding)
    assert encode_orders([np.arange(1)]) == b"" and decode_orders(b"", [1, 0])[0].tolist() == [0]
