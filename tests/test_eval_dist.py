"""2-process gloo sliding eval and TTT give the 1-process results (windows and TTT sequences split by rank)."""

from __future__ import annotations

import math

import pytest
from dist_common import run_two_ranks
from test_eval_common import tiny_eval_cfg, tiny_model, tiny_stream, tiny_tables  # noqa: F401

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]

N_TOKENS = 301
# 3 TTT sequences per chunk, one mini-batch (one step per epoch) in 1 and 2 processes alike; the records'
# step per mini-batch groups sequences by rank, so smaller mini-batches depend on the world size by design
CFG = dict(ttt_lr=0.3, ttt_epochs=2, ttt_chunk_tokens=96, ttt_batch_seqs=4)


def run_modes() -> dict:
    from pgolf.eval.score import Budget, eval_sliding
    from pgolf.eval.ttt import eval_ttt

    model, tables, toks = tiny_model(), tiny_tables(), tiny_stream(N_TOKENS)
    cfg = tiny_eval_cfg(**CFG)
    # a budget makes every batch step a collective check: ranks with unequal window shares must still
    # issue the same number of them (a mismatch would hang until the timeout)
    budget = Budget(3600.0)
    # 35 windows: shares of 18 and 17, i.e. 2 and 1 batches of 17 (TTT's first chunk: 5 and 4 windows, batch 4)
    slid, _ = eval_sliding(
        model, toks, tables, seq_len=32, stride=8, batch_seqs=17, autocast_mode="off", budget=budget
    )
    ttt, _ = eval_ttt(model, toks, tables, cfg, autocast_mode="off", budget=budget)
    # mini-batches of 1: rank shares of 2 and 1 sequences, so rank 1 sits out (zero gradient) the second
    # step; every rank must still take both steps (a mismatch would hang in the gradient all-reduce)
    cfg.ttt_batch_seqs = 1
    small, _ = eval_ttt(model, toks, tables, cfg, autocast_mode="off", budget=budget)
    return {"sliding": slid.to_dict(), "ttt": ttt.to_dict(), "ttt_b1": small.to_dict()}



def test_two_process_gloo_equals_one_process(tmp_path):
    single = run_modes()
    out = tmp_path / "res.json"
    double = run_two_ranks(run_modes, out, "eval")
    for mode in ("sliding", "ttt"):
        a, b = single[mode], double[mode]
        assert (a["tokens"], a["bytes"]) == (b["tokens"], b["bytes"])
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6), mode
        assert math.isclose(a["bpb"], b["bpb"], rel_tol=1e-6), mode
    assert single["ttt"]["loss"] != single["sliding"]["loss"]  # TTT did train
    assert double["ttt_b1"]["tokens"] == single["ttt"]["tokens"]
    assert double["ttt_b1"]["loss"] not in (double["ttt"]["loss"], double["sliding"]["loss"])
