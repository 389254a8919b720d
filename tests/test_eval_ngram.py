"""The causal n-gram tilt: numba hints equal the Python reference on real val tokens, causality of the
hints, and the exact normalisation of the tilt."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_eval_common import tiny_eval_cfg, tiny_model, tiny_stream, tiny_tables  # noqa: F401

from pgolf.config import EvalConfig
from pgolf.data.val import load_val_tokens
from pgolf.eval.ngram import (
    HintParams,
    NgramTilt,
    check_table_memory,
    compute_hints,
    reference_hints,
    select_hint,
)
from pgolf.eval.score import eval_sliding

pytestmark = pytest.mark.usefixtures("one_thread")


def params(**kw) -> HintParams:
    cfg = EvalConfig(ngram_table_bits=14)
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


def test_hints_use_only_the_strict_prefix():
    prm = params(ngram_min_order=2, ngram_max_order=4, ngram_order_stride=1)
    rng = np.random.default_rng(0)
    toks = np.tile(rng.integers(0, 20, size=40), 25)
    hints, betas = compute_hints(toks, prm)
    for t in (300, 512, 777):
        pert = toks.copy()
        pert[t:] = (pert[t:] + 1 + rng.integers(0, 19, size=pert.size - t)) % 20
        h2, b2 = compute_hints(pert, prm)
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
