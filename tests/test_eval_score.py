"""Non-overlapping, sliding and score-first TTT eval on a tiny GPT: exactness and totals."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from oracles import plain_sliding_nll
from test_eval_common import stream_totals, tiny_eval_cfg, tiny_model, tiny_stream, tiny_tables  # noqa: F401

from pgolf.eval.score import EvalTrace, eval_nonoverlap, eval_sliding, sliding_windows
from pgolf.eval.ttt import chunk_lr, eval_ttt, plan_chunks

DEV = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sliding_with_stride_window_equals_nonoverlap_exactly():
    model, tables, toks = tiny_model(), tiny_tables(), tiny_stream(32 * 6 + 1)
    plain = eval_nonoverlap(model, toks, tables, seq_len=32, batch_seqs=4, autocast_mode="off")
    slid, tilted = eval_sliding(model, toks, tables, seq_len=32, stride=32, batch_seqs=3, autocast_mode="off")
    assert tilted is None
    assert slid == plain
    assert (plain.tokens, plain.bytes) == stream_totals(toks, tables)


def test_sliding_matches_unbatched_definition_and_totals():
    model, tables, toks = tiny_model(), tiny_tables(), tiny_stream(200)
    res, _ = eval_sliding(model, toks, tables, seq_len=32, stride=8, batch_seqs=5, autocast_mode="off")
    assert (res.tokens, res.bytes) == stream_totals(toks, tables)
    expected = plain_sliding_nll(model, toks, 32, 8)
    assert math.isclose(res.loss, expected, rel_tol=1e-5)
    assert math.isclose(res.bpb, res.loss * res.tokens / (math.log(2) * res.bytes), rel_tol=1e-12)
    # more context helps nothing for a random model, but the numbers must differ from non-overlap
    no = eval_nonoverlap(model, toks, tables, seq_len=32, batch_seqs=4, autocast_mode="off")
    assert no.tokens == res.tokens and no.loss != res.loss
    # the plain reference honours autocast like the scorer (the benchmark compares them at equal precision)
    bf16, _ = eval_sliding(model, toks, tables, seq_len=32, stride=8, batch_seqs=5, autocast_mode="bf16")
    plain_bf16 = plain_sliding_nll(model, toks, 32, 8, autocast_mode="bf16")
    assert plain_bf16 != expected and math.isclose(bf16.loss, plain_bf16, rel_tol=2e-3)


def test_bf16_autocast_close_to_fp32():
    model, tables, toks = tiny_model(), tiny_tables(), tiny_stream(129)
    fp32 = eval_nonoverlap(model, toks, tables, seq_len=32, batch_seqs=4, autocast_mode="off")
    bf16 = eval_nonoverlap(model, toks, tables, seq_len=32, batch_seqs=4, autocast_mode="bf16")
    assert fp32.tokens == bf16.tokens and abs(fp32.loss - bf16.loss) < 0.05


def test_ttt_with_lr_zero_equals_sliding_exactly():
    model, tables, toks = tiny_model(), tiny_tables(), tiny_stream(300)
    cfg = tiny_eval_cfg(ttt_lr=0.0)
    slid, _ = eval_sliding(model, toks, tables, seq_len=32, stride=8, batch_seqs=4, autocast_mode="off")
    ttt, _ = eval_ttt(model, toks, tables, cfg, autocast_mode="off")
    assert ttt == slid


def test_ttt_adapts_a_copy_and_changes_the_score():
    model, tables, toks = tiny_model(), tiny_tables(), tiny_stream(300)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = tiny_eval_cfg(ttt_lr=0.5, ttt_epochs=2)
    trace = EvalTrace()
    ttt, _ = eval_ttt(model, toks, tables, cfg, autocast_mode="off", trace=trace)
    slid, _ = eval_sliding(model, toks, tables, seq_len=32, stride=8, batch_seqs=4, autocast_mode="off")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # caller's model untouched
    assert (ttt.tokens, ttt.bytes) == (slid.tokens, slid.bytes) == stream_totals(toks, tables)
    assert ttt.loss != slid.loss
    chunks = plan_chunks(sliding_windows(299, 32, 8), 64)
    trains = [e for e in trace.events if e[0] == "train"]
    # one update per epoch (2 sequences, mini-batches of 2), never after the last chunk; each reads exactly
    # the positions its chunk scored (plus the context token before them)
    assert [(lo, hi) for _, lo, hi in trains] == [(c.lo, c.hi + 1) for c in chunks[:-1] for _ in range(2)]


@pytest.mark.parametrize("batch_seqs", [2, 8])
def test_ttt_steps_once_per_mini_batch_as_the_records(batch_seqs):
    """A chunk of 5 sequences (the last one short): with ttt_batch_seqs=2 every epoch takes 3 SGD steps on
    sequences [0,2), [2,4), [4,5), each on the mean loss of its own targets; with 8, one step on all."""
    from pgolf.eval.ttt import TTTState, train_chunk

    model, toks = tiny_model(), tiny_stream(300)
    cfg = tiny_eval_cfg(ttt_lr=0.3, ttt_epochs=2, ttt_batch_seqs=batch_seqs, ttt_chunk_tokens=152)
    chunk = plan_chunks(sliding_windows(299, 32, 8), 152)[0]
    assert (chunk.lo, chunk.hi) == (0, 152)  # 4 sequences of 32 targets and one of 24
    state = TTTState(model, cfg, 3)
    trace = EvalTrace()
    train_chunk(state, toks, chunk, seq_len=32, device=DEV, autocast_mode="off", trace=trace)

    ref = copy.deepcopy(model).train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=cfg.ttt_momentum)  # chunk 0: the full lr
    starts = list(range(0, 152, 32))
    batches = [starts[i : i + batch_seqs] for i in range(0, len(starts), batch_seqs)]
    for _ in range(2):
        for batch in batches:
            opt.zero_grad()
            nll = torch.cat(
                [
                    ref.per_token_nll(toks[s : s + 32][None], toks[s + 1 : s + 33][None])[0, : 152 - s]
                    for s in batch
                ]
            )
            nll.mean().backward()
            torch.nn.utils.clip_grad_norm_(list(ref.parameters()), cfg.ttt_grad_clip)
            opt.step()
    assert len([e for e in trace.events if e[0] == "train"]) == 2 * len(batches)
    for (name, p), q in zip(state.model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_ttt_freeze_blocks_keeps_first_block_fixed():
    from pgolf.eval.ttt import TTTState, train_chunk

    model, toks = tiny_model(), tiny_stream(300)
    cfg = tiny_eval_cfg(ttt_lr=0.5, ttt_freeze_blocks=1)
    chunks = plan_chunks(sliding_windows(299, 32, 8), 64)
    state = TTTState(model, cfg, len(chunks))
    train_chunk(state, toks, chunks[0], seq_len=32, device=DEV, autocast_mode="off")
    new = dict(state.model.named_parameters())
    for name, p in model.named_parameters():
        same = torch.equal(p, new[name])
        assert same == name.startswith("blocks.0."), name


def test_chunk_plan_and_cosine_lr():
    win = sliding_windows(40_540_160 // 64, 2048 // 64, 1)  # scaled-down §5.3 geometry
    chunks = plan_chunks(win, 512)
    assert chunks[0].lo == 0 and chunks[-1].hi == 40_540_160 // 64
    assert all(a.hi == b.lo for a, b in zip(chunks, chunks[1:]))
    assert len(chunks) == math.ceil(40_540_160 / 32_768)  # 1238 as in SPEC §5.3
    assert chunk_lr(0.005, 0, 10) == 0.005 and abs(chunk_lr(0.005, 9, 10)) < 1e-15
    assert math.isclose(chunk_lr(0.005, 5, 11), 0.0025)


def test_trace_records_each_position_once():
    model, tables, toks = tiny_model(), tiny_tables(), tiny_stream(150)
    trace = EvalTrace(probe_positions=frozenset({5, 100}))
    eval_sliding(model, toks, tables, seq_len=32, stride=8, batch_seqs=4, autocast_mode="off", trace=trace)
    assert sorted(trace.scores) == list(range(1, 150)) and all(len(v) == 1 for v in trace.scores.values())
    for p, logq in trace.probes.items():
        assert math.isclose(float(torch.logsumexp(logq, 0)), 0.0, abs_tol=1e-5)
        assert math.isclose(-float(logq[toks[p]]), trace.scores[p][0], rel_tol=1e-5)
    assert np.allclose(sorted(trace.probes), [5, 100])
