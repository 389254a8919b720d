"""The causal n-gram tilt: numba hints equal the Python reference on real val tokens, causality of the
hints, and the exact normalisation of the tilt."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from oracles import reference_hints, select_hint
from test_eval_common import tiny_eval_cfg, tiny_model, tiny_stream, tiny_tables  # noqa: F401

from pgolf.config import EvalConfig, preset
from pgolf.data.bytes import build_byte_tables, load_tokenizer
from pgolf.data.val import load_val_tokens
from pgolf.eval.ngram_hints import (
    LEN_MIX,
    PAIR_MULT,
    PREFIX_BASE,
    PRIMES,
    HintParams,
    check_table_memory,
    compute_hints,
    token_flags,
)
from pgolf.eval.ngram_tilt import NgramTilt
from pgolf.eval.score import eval_sliding

pytestmark = pytest.mark.usefixtures("one_thread")


def params(**kw) -> HintParams:
    cfg = EvalConfig(ngram_table_bits=14, ngram_expert_table_bits=12)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return HintParams.from_config(cfg)


@pytest.fixture(scope="module")
def val_tokens(sp8192_shards) -> np.ndarray:
    return load_val_tokens(sp8192_shards, 2048, max_tokens=30_000).numpy()


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(ngram_min_order=2, ngram_max_order=6, ngram_order_stride=1, ngram_table_bits=10)],
    ids=["record-orders", "low-orders-crowded-table"],
)
def test_numba_hints_equal_reference_on_real_val_tokens(val_tokens, kw):
    prm = params(**kw)
    # real tokens, a 3,000-token slice four times over so that orders 8-16 find recurring contexts too
    toks = np.concatenate([val_tokens[:3_000]] * 4)
    hints, betas = compute_hints(toks, prm)
    ref_h, ref_b = reference_hints(toks, prm)
    assert np.array_equal(hints, ref_h) and np.array_equal(betas, ref_b)
    assert (hints >= 0).sum() > 50  # the test exercises real hints
    assert ((betas > 0) == (hints >= 0)).all() and betas.max() <= prm.base_beta


@pytest.fixture(scope="module")
def val_flags(sp8192_shards) -> tuple[np.ndarray, np.ndarray]:
    return token_flags(build_byte_tables(load_tokenizer(sp8192_shards / "tokenizer.model", 8192), 8192))


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(
            ngram_min_order=2,
            ngram_max_order=6,
            ngram_order_stride=1,
            ngram_table_bits=10,
            ngram_expert_table_bits=7,
        ),
        dict(ngram_within_beta=0.9, ngram_word_beta=0.5, ngram_word_threshold=0.3),
    ],
    ids=["record", "low-orders-crowded-tables", "expert-betas"],
)
def test_numba_expert_hints_equal_reference_on_real_val_tokens(val_tokens, val_flags, kw):
    prm = params(**{"ngram_experts": True, "ngram_expert_table_bits": 14, **kw})
    toks = np.concatenate([val_tokens[:3_000]] * 3)
    hints, betas = compute_hints(toks, prm, val_flags)
    ref_h, ref_b = reference_hints(toks, prm, val_flags)
    assert np.array_equal(hints, ref_h) and np.array_equal(betas, ref_b)
    plain_h, plain_b = compute_hints(toks, params(**{k: v for k, v in kw.items() if "expert" not in k}))
    if prm.within_beta == prm.word_beta == 0.0:
        # β = 0 experts never move a token hint; they add lone β-0 hints and the agreement bonus
        tok = plain_h >= 0
        assert np.array_equal(hints[tok], plain_h[tok])
        bonus = betas[tok] - plain_b[tok]
        assert np.isin(np.round(bonus, 12), [0.0, 0.1]).all() and (bonus > 0.05).sum() > 10
        assert (betas[~tok & (hints >= 0)] == 0.0).all() and (~tok & (hints >= 0)).sum() > 100
    else:
        assert ((hints >= 0) & (plain_h < 0)).sum() > 100


def stream_flags() -> tuple[np.ndarray, np.ndarray]:
    """Ids 0 BOS (boundary), 1 '▁a' and 4 '▁d' (word-initial), 2 'b', 3 'c', 5 'e' (continuations)."""
    boundary = np.array([1, 0, 0, 0, 0, 0], np.uint8)
    lead = np.array([0, 1, 0, 0, 1, 0], np.uint8)
    return boundary, lead


def hand_stream() -> np.ndarray:
    """BOS, then the words A = [1 2 3 5] and B = [4 5] six times: A at positions 1+6k.., B at 5+6k.."""
    return np.array([0] + [1, 2, 3, 5, 4, 5] * 6, np.int64)


def test_expert_hints_on_a_hand_checkable_stream():
    # orders of 31 tokens: the token expert never finds a repeated context in 37 tokens
    prm = params(
        ngram_min_order=31, ngram_max_order=31, ngram_experts=True, ngram_within_beta=0.5, ngram_word_beta=0.7
    )
    hints, betas = compute_hints(hand_stream(), prm, stream_flags())
    # within: after "1 2" (L=2) comes 3, after "1 2 3" (L=3) comes 5; first seen at 3 and 4, hinted from the
    # next A on. Positions after a word-initial token get no within hint (the gate reads token p-1).
    # word: the ring of 4 words A B A B is first full at 13 (inserting 1, the next word-initial token);
    # its third insertion is at 25, so position 26 (after the word-initial 1) is hinted 1, at β_word.
    expected = {p: (3, 0.5) for p in (9, 15, 21, 27, 33)} | {p: (5, 0.5) for p in (10, 16, 22, 28, 34)}
    expected |= {26: (1, 0.7), 30: (4, 0.7), 32: (1, 0.7), 36: (4, 0.7)}
    got = {p: (int(h), float(b)) for p, (h, b) in enumerate(zip(hints, betas)) if h >= 0}
    assert got == expected
    ref_h, ref_b = reference_hints(hand_stream(), prm, stream_flags())
    assert np.array_equal(hints, ref_h) and np.array_equal(betas, ref_b)


def test_zero_beta_experts_add_the_agreement_bonus_to_the_token_hint():
    """#1557: experts at β 0. Order-2 token hints need 3 sightings (from position 21 for '1 2 -> 3'); where
    the within expert agrees the token hint's β becomes 2.0·conf + 0.1, a lone within hint has β 0, and the
    word expert's β-0 guess (1 at 26) loses to the token hint (2 at β 2.0)."""
    kw = dict(ngram_min_order=2, ngram_max_order=2)
    off_h, off_b = compute_hints(hand_stream(), params(**kw))
    on_h, on_b = compute_hints(hand_stream(), params(ngram_experts=True, **kw), stream_flags())
    agree = [21, 22, 27, 28, 33, 34]
    assert (
        (off_b[agree] == 2.0).all() and np.allclose(on_b[agree], 2.1) and (on_h[agree] == off_h[agree]).all()
    )
    assert on_h[[9, 10, 15, 16]].tolist() == [3, 5, 3, 5] and (on_b[[9, 10, 15, 16]] == 0.0).all()
    assert (off_h[[9, 10, 15, 16]] == -1).all()
    assert (on_h[26], on_b[26]) == (off_h[26], off_b[26]) == (2, 2.0)
    rest = np.setdiff1d(np.arange(37), agree + [9, 10, 15, 16])
    assert np.array_equal(on_h[rest], off_h[rest]) and np.array_equal(on_b[rest], off_b[rest])


def test_record_hint_constants_and_pr1557_knobs():
    assert PRIMES == (
        36313, 27191, 51647, 81929, 131071, 196613, 262147, 393241, 524309, 655373, 786433, 917521, 1048583,
        1179653, 1310729, 1441801, 1572869, 1703941, 1835017, 1966087, 2097169, 2228243, 2359319, 2490389,
        2621471, 2752549, 2883617, 3014687, 3145757, 3276833, 3407903, 3538973,
    )  # fmt: skip
    assert (PAIR_MULT, PREFIX_BASE, LEN_MIX) == (1000003, 1099511628211, 0x9E3779B185EBCA87)
    prm = HintParams.from_config(preset("pr1557").eval)
    assert prm.orders == (8, 10, 12, 14, 16) and prm.table_bits == 26 and prm.expert_table_bits == 20
    assert prm.thresholds == (0.7, 0.7, 0.6, 0.5, 0.5) and prm.min_counts == (3, 3, 2, 2, 2)
    assert (prm.base_beta, prm.agree_bonus, prm.experts) == (2.0, 0.1, True)
    assert (prm.within_threshold, prm.within_beta, prm.word_threshold, prm.word_beta) == (0.25, 0.0, 0.8, 0.0)
    assert not HintParams.from_config(preset("pr1541").eval).experts
    with pytest.raises(ValueError, match="byte-table flags"):
        compute_hints(hand_stream(), prm)


def test_tilted_nll_equals_reference_on_real_val_tokens(val_tokens):
    prm = params(ngram_min_order=2, ngram_max_order=6, ngram_order_stride=2)
    toks = torch.from_numpy(val_tokens[:1500])
    hints, betas = compute_hints(toks.numpy(), prm)
    tilt = NgramTilt(hints, betas)
    gen = torch.Generator().manual_seed(0)
    pos = torch.arange(1, 1500)
    logits = torch.randn(pos.numel(), 8192, generator=gen) * 3
    y = toks[pos]
    nll = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    out = tilt(nll, logits, y, pos).double()
    # reference: the tilted distribution written out over the whole vocab
    logp = torch.log_softmax(logits.double(), -1)
    h = torch.from_numpy(hints)[pos]
    b = torch.from_numpy(betas)[pos]
    boost = torch.zeros_like(logp)
    has = h >= 0
    boost[has.nonzero().flatten(), h[has]] = b[has]
    ref = -torch.log_softmax(logp + boost, -1).gather(1, y.unsqueeze(1)).squeeze(1)
    assert has.sum() > 20
    assert torch.allclose(out, ref, atol=2e-5)
    assert torch.equal(out[~has], nll[~has].double())


@pytest.mark.parametrize("experts", [False, True])
def test_hints_use_only_the_strict_prefix(experts):
    """Perturbing tokens >= t leaves the hints <= t unchanged; with the experts too, whose gates read the
    flags of token p-1 (#1420 read those of the target and leaked it)."""
    prm = params(ngram_min_order=2, ngram_max_order=4, ngram_order_stride=1, ngram_experts=experts)
    prm = replace(prm, within_beta=0.9, word_beta=0.5, word_threshold=0.3)  # let the experts win hints
    rng = np.random.default_rng(0)
    flags = (np.arange(20) == 0).astype(np.uint8), (np.arange(20) % 3 == 1).astype(np.uint8)
    toks = np.tile(rng.integers(0, 20, size=40), 25)
    hints, betas = compute_hints(toks, prm, flags)
    if experts:  # the experts do produce winning hints here
        tok_only, _ = compute_hints(toks, replace(prm, experts=False))
        assert ((hints >= 0) & (tok_only < 0)).sum() > 10
    for t in (300, 512, 777):
        pert = toks.copy()
        pert[t:] = (pert[t:] + 1 + rng.integers(0, 19, size=pert.size - t)) % 20
        h2, b2 = compute_hints(pert, prm, flags)
        assert np.array_equal(h2[: t + 1], hints[: t + 1]) and np.array_equal(b2[: t + 1], betas[: t + 1])
    assert (hints >= 0).mean() > 0.5  # the periodic stream is mostly hinted, and correctly
    assert (hints[hints >= 0] == toks[hints >= 0]).mean() > 0.9


def test_tilt_distribution_sums_to_one():
    gen = torch.Generator().manual_seed(1)
    vocab = 512
    logits = torch.randn(vocab, generator=gen) * 4
    for beta in (0.0, 0.7, 2.0, 5.0):
        for h in (0, 17, int(logits.argmax()), int(logits.argmin())):
            tilt = NgramTilt(np.array([-1, h]), np.array([0.0, beta]))
            cand = torch.arange(vocab)
            nll = torch.logsumexp(logits, 0) - logits
            q = torch.exp(
                -tilt(nll, logits.expand(vocab, vocab), cand, torch.ones(vocab, dtype=torch.long)).double()
            )
            assert math.isclose(float(q.sum()), 1.0, abs_tol=1e-5)
            assert q[h] >= torch.softmax(logits.double(), 0)[h] - 1e-7  # the hint gains mass


def test_tilt_inside_sliding_eval_zero_beta_is_identity_and_hints_help():
    model, tables = tiny_model(), tiny_tables()
    toks = tiny_stream(40)
    toks = torch.cat([toks] * 6)[:225]  # a repeating stream the n-gram expert learns
    cfg = tiny_eval_cfg()
    prm = params(ngram_min_order=2, ngram_max_order=4, ngram_order_stride=1)
    hints, betas = compute_hints(toks.numpy(), prm)
    kw = dict(seq_len=cfg.seq_len, stride=cfg.stride, batch_seqs=cfg.batch_seqs, autocast_mode="off")
    plain, tilted = eval_sliding(model, toks, tables, nll_transform=NgramTilt(hints, betas), **kw)
    _, zero = eval_sliding(model, toks, tables, nll_transform=NgramTilt(hints, betas * 0), **kw)
    ref, _ = eval_sliding(model, toks, tables, **kw)
    assert math.isclose(plain.loss, ref.loss, rel_tol=1e-6) and math.isclose(
        zero.loss, ref.loss, rel_tol=1e-6
    )
    assert tilted.tokens == plain.tokens and tilted.bytes == plain.bytes
    assert tilted.bpb < plain.bpb - 0.1  # correct hints on a repeating stream pay


def test_select_hint_agree_bonus():
    assert select_hint([], 0.1) == (-1, 0.0)
    assert select_hint([(5, 1.2)], 0.1) == (5, 1.2)
    assert select_hint([(5, 1.2), (7, 0.0), (7, 0.0)], 0.1) == (5, 1.2)
    hint, beta = select_hint([(5, 1.2), (5, 0.0)], 0.1)
    assert hint == 5 and math.isclose(beta, 1.3)


def test_table_memory_refused_when_too_large(capsys):
    with pytest.raises(MemoryError, match="ngram_table_bits"):
        check_table_memory(params(ngram_table_bits=40))
    assert "GiB of hint tables" in capsys.readouterr().out


def test_bad_orders_rejected():
    with pytest.raises(ValueError, match="ngram_min_order"):
        params(ngram_min_order=9, ngram_max_order=8)
