"""Legality checks C1-C4: the real modes pass, and each planted violation is caught by its check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_eval_common import tiny_eval_cfg, tiny_model, tiny_stream, tiny_tables  # noqa: F401

from pgolf.config import EvalConfig
from pgolf.eval.legality import format_table, run_checks
from pgolf.eval.ngram_hints import HintParams, compute_hints
from pgolf.eval.ngram_tilt import NgramTilt
from pgolf.eval.score import EvalTrace, ScoreOptions, Scorer, eval_nonoverlap, eval_sliding, sliding_windows
from pgolf.eval.ttt import TTTState, eval_ttt, plan_chunks, score_chunk, train_chunk

DEV = torch.device("cpu")
CFG = tiny_eval_cfg(ttt_lr=0.3, ttt_epochs=1)
MODEL, TABLES = tiny_model(), tiny_tables()
PRM = HintParams.from_config(
    EvalConfig(ngram_min_order=2, ngram_max_order=4, ngram_order_stride=1, ngram_table_bits=12)
)

pytestmark = pytest.mark.usefixtures("one_thread")


def stream() -> torch.Tensor:
    toks = tiny_stream(48, seed=3)
    return torch.cat([toks] * 5)[:225]  # repeats: the n-gram expert hints in the later copies


def good_hints(toks: torch.Tensor) -> NgramTilt:
    return NgramTilt(*compute_hints(toks.numpy(), PRM, quiet=True))


def sliding_runner(tilt_fn=None):
    def run(toks: torch.Tensor, trace: EvalTrace) -> None:
        tilt = tilt_fn(toks) if tilt_fn else None
        eval_sliding(
            MODEL, toks, TABLES, seq_len=CFG.seq_len, stride=CFG.stride, batch_seqs=CFG.batch_seqs,
            autocast_mode="off", nll_transform=tilt, trace=trace,
        )  # fmt: skip

    return run


def ttt_runner(tilt_fn=None, order="score-first", rescore=False):
    """Score-first TTT assembled from its pieces; `order`/`rescore` plant violations."""

    def run(toks: torch.Tensor, trace: EvalTrace) -> None:
        tilt = tilt_fn(toks) if tilt_fn else None
        if order == "score-first" and not rescore:
            eval_ttt(MODEL, toks, TABLES, CFG, autocast_mode="off", nll_transform=tilt, trace=trace)
            return
        chunks = plan_chunks(sliding_windows(toks.numel() - 1, CFG.seq_len, CFG.stride), CFG.ttt_chunk_tokens)
        state = TTTState(MODEL, CFG, len(chunks))
        scorer = Scorer(
            state.model, TABLES, CFG.seq_len, CFG.batch_seqs, ScoreOptions(DEV, "off", tilt, trace)
        )
        for chunk in chunks:
            if order == "train-first":
                train_chunk(
                    state, toks, chunk, seq_len=CFG.seq_len, device=DEV, autocast_mode="off", trace=trace
                )
            score_chunk(scorer, toks, chunk)
            if order == "score-first":
                train_chunk(
                    state, toks, chunk, seq_len=CFG.seq_len, device=DEV, autocast_mode="off", trace=trace
                )
                if rescore:  # a second pass over the chunk with the adapted model
                    score_chunk(scorer, toks, chunk)

    return run


def hint_candidates(toks: torch.Tensor) -> np.ndarray:
    return np.nonzero(compute_hints(toks.numpy(), PRM, quiet=True)[0] >= 0)[0]


def outcome(mode, runner, tilted=False) -> dict[str, bool]:
    toks = stream()
    cands = hint_candidates(toks) if tilted else None
    results = run_checks(mode, runner, toks, 64, candidates=cands, num_probes=8)
    print(format_table(results))
    return {r.check: r.passed for r in results}


ALL_PASS = {"C1": True, "C2": True, "C3": True, "C4": True}


def test_real_modes_pass_every_check():
    assert outcome("quant", lambda t, tr: eval_nonoverlap(
        MODEL, t, TABLES, seq_len=32, batch_seqs=4, autocast_mode="off", trace=tr)) == ALL_PASS  # fmt: skip
    assert outcome("sliding", sliding_runner()) == ALL_PASS
    assert outcome("ngram", sliding_runner(good_hints), tilted=True) == ALL_PASS
    assert outcome("ttt", ttt_runner(good_hints), tilted=True) == ALL_PASS


def test_ttt_training_before_scoring_is_caught():
    got = outcome("bad-ttt", ttt_runner(order="train-first"))
    assert not got["C3"] and not got["C1"]
    assert got["C4"]


def test_rescoring_loop_is_caught():
    got = outcome("rescore", ttt_runner(rescore=True))
    assert not got["C4"]


def test_unnormalized_tilt_is_caught():
    class Unnormalized(NgramTilt):  # drops ln Z: boosts the hint without paying for it elsewhere
        def __call__(self, nll, logits, targets, positions):
            hint = self.hints[positions.long()]
            beta = self.betas[positions.long()]
            return (nll.double() - beta * (targets.long() == hint).double()).to(nll.dtype)

    got = outcome(
        "bad-tilt", sliding_runner(lambda t: Unnormalized(*compute_hints(t.numpy(), PRM, quiet=True))), True
    )
    assert not got["C2"]
    assert got["C3"] and got["C4"]


def test_hint_reading_the_target_is_caught():
    def peeking(toks: torch.Tensor) -> NgramTilt:
        hints, betas = compute_hints(toks.numpy(), PRM, quiet=True)
        hints = np.where(hints >= 0, toks.numpy(), -1)  # the hint is whatever token comes next
        return NgramTilt(hints, betas)

    got = outcome("peek", sliding_runner(peeking), tilted=True)
    assert not got["C1"]
