"""The lora_ttt eval mode (phased score-first TTT with per-document LoRA, SPEC-1855 part B §3.2-3.5):
documents and schedule, chunk tiling, a per-document sliding reference, determinism, per-document
independence, C1-C4 with its two planted violations, and 2 gloo processes against 1."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from dist_common import run_two_ranks
from test_eval_common import tiny_eval_cfg, tiny_model, tiny_tables  # noqa: F401
from test_eval_run import artifact_is_model_pt, make_run  # noqa: F401

from pgolf.cli import main
from pgolf.config import EvalConfig, preset
from pgolf.config.env import apply_env
from pgolf.data.bytes import ByteTables
from pgolf.eval.legality import format_table, run_checks
from pgolf.eval.lora_ttt import LoraTTT, documents, eval_lora_ttt, pass_order, plan_schedule
from pgolf.eval.score import EvalTrace, ScoreOptions, eval_nonoverlap
from pgolf.model.layers import BOS_ID

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL, TABLES = tiny_model(), tiny_tables()
# chunks of 8 targets with up to 24 tokens of context, batches of 4 documents, 2 global phases over
# half of the documents, each of several 40-token SGD chunks (sequences of 24)
LORA = dict(
    lora_ttt_chunk=8, lora_ttt_context=24, lora_ttt_batch_docs=4, lora_ttt_rank=4, lora_ttt_alpha=8.0,
    lora_ttt_lr=0.05, phased_num_phases=2, phased_prefix_docs=100, phased_prefix_frac=0.5,
    phased_chunk_tokens=40, phased_lr=0.05, phased_batch_seqs=2,
)  # fmt: skip


def cfg(**kw) -> EvalConfig:
    return tiny_eval_cfg(**{**LORA, **kw})


def doc_stream(n: int = 400, seed: int = 0, head: bool = False) -> torch.Tensor:
    """Documents of 1 to ~40 tokens (a BOS at ~6% of positions), each repeating its own random 5-token
    motif of ids 2..63: something a document's adapter can learn from its earlier chunks."""
    gen = torch.Generator().manual_seed(seed)
    toks = torch.randint(2, 64, (n,), generator=gen)
    toks[torch.rand(n, generator=gen) < 0.06] = BOS_ID
    toks[0] = 7 if head else BOS_ID
    for s, p in documents(toks):
        start = s + int(toks[s] == BOS_ID)
        toks[start : s + p] = torch.randint(2, 64, (5,), generator=gen).repeat(p // 5 + 1)[: s + p - start]
    return toks


def run(toks, c: EvalConfig, trace: EvalTrace | None = None, tables: ByteTables = TABLES, model=MODEL):
    return eval_lora_ttt(model, toks, tables, c, autocast_mode="off", trace=trace)[0]


# ----------------------------------------------------------------------------- documents and schedule
@pytest.mark.parametrize("head", [False, True])
def test_documents_run_from_bos_through_the_next_bos_and_tile_the_targets(head: bool) -> None:
    toks = doc_stream(300, seed=2, head=head)
    toks[-1] = BOS_ID  # a BOS as the last token starts no document
    docs = documents(toks)
    assert docs[0, 0] == 0 and docs[:, 1].sum() == toks.numel() - 1 and (docs[:, 1] > 0).all()
    assert np.array_equal(docs[1:, 0], docs[:-1, 0] + docs[:-1, 1])  # doc i ends on doc i+1's BOS
    bos = np.flatnonzero(toks[:-1].numpy() == BOS_ID)
    assert np.array_equal(docs[int(head) :, 0], bos)


def test_schedule_runs_length_sorted_batches_longest_first_and_phases_at_the_spec_boundaries() -> None:
    lengths = np.random.default_rng(0).integers(1, 3000, 50_000)
    docs = np.stack([np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths], 1)
    full = EvalConfig()  # the §3.6 run values
    s = plan_schedule(docs, full, world=8)
    assert len(s.batches) == 782 and len(s.batches[0]) == 16  # the 16 longest run first
    maxima = [lengths[b].max() for b in s.batches]
    assert maxima == sorted(maxima, reverse=True) and lengths[s.batches[0]].min() >= lengths[s.batches[1]].max()
    # D = min(50,000, 2,500, 5% of 50,000) = 2,500: b_k = 833 / 1666 / 2500
    assert sorted(sum(s.phases.values(), [])) == [833, 1666, 2500]
    for rnd, targets in s.phases.items():
        for b in targets:  # after the first round whose documents reach b_k
            assert len(s.scored_after(rnd)) >= b > (len(s.scored_after(rnd - 1)) if rnd else 0)
    assert plan_schedule(docs[:1000], full, 1).phases == {0: [16, 33], 1: [50]}  # 5% of 1,000 docs


def test_defaults_are_the_run_values_of_spec_1855_b_3_6_and_the_pr1855_plan_runs_the_mode() -> None:
    e = EvalConfig()
    assert (e.lora_ttt_rank, e.lora_ttt_alpha, e.lora_ttt_lr, e.lora_ttt_chunk, e.lora_ttt_context) == (
        80, 144.0, 1e-4, 48, 2048)  # fmt: skip
    assert (e.lora_ttt_batch_docs, e.lora_ttt_beta1, e.lora_ttt_beta2, e.lora_ttt_eps) == (64, 0.0, 0.99, 1e-10)
    assert e.lora_ttt_weight_decay == 0.5
    assert (e.phased_num_phases, e.phased_prefix_docs, e.phased_lr, e.phased_momentum) == (3, 2500, 1e-3, 0.9)
    assert (e.phased_chunk_tokens, e.phased_batch_seqs, e.phased_grad_clip) == (32_768, 32, 1.0)
    assert preset("pr1855").eval.plan[-1] == "lora_ttt"
    c = preset("pr1855")
    apply_env(c, {"TTT_LORA_RANK": "16", "TTT_CHUNK_SIZE": "32", "PHASED_TTT_NUM_PHASES": "1", "GLOBAL_TTT_LR": "0.01"})
    assert (c.eval.lora_ttt_rank, c.eval.lora_ttt_chunk, c.eval.phased_num_phases, c.eval.phased_lr) == (16, 32, 1, 0.01)


# ----------------------------------------------------------------------------- scoring
def test_chunks_tile_every_target_once_with_the_non_overlapping_totals() -> None:
    toks = doc_stream()
    trace = EvalTrace()
    got = run(toks, cfg(), trace)
    ref = eval_nonoverlap(MODEL, toks, TABLES, seq_len=32, batch_seqs=4, autocast_mode="off")
    assert (got.tokens, got.bytes) == (ref.tokens, ref.bytes)
    scored = np.concatenate([e[1] for e in trace.events if e[0] == "score"])
    assert np.array_equal(np.sort(scored), np.arange(1, toks.numel()))
    assert np.array_equal(np.sort(pass_order(toks, cfg())), np.arange(1, toks.numel()))


def test_sidecar_bytes_are_read_at_the_scored_positions() -> None:
    toks = doc_stream()
    side = torch.randint(0, 4, (toks.numel(),), generator=torch.Generator().manual_seed(5))
    tables = dataclasses.replace(TABLES, sidecar=side)
    got = run(toks, cfg(lora_ttt_lr=0.0, phased_num_phases=0), tables=tables)
    assert got.bytes == int(side[1:].sum())


@torch.no_grad()
def reference_per_document_sliding(toks: torch.Tensor, chunk: int, context: int) -> float:
    """Σ NLL of the plain model, each document alone: chunk c of targets [cC, e) from tokens
    [max(0, e - W), e) of its own document, one forward per chunk."""
    total = 0.0
    for start, p in documents(toks):
        doc = toks[start : start + p + 1]
        for lo in range(0, p, chunk):
            end = min(lo + chunk, p)
            s = max(0, end - context)
            nll = MODEL.per_token_nll(doc[None, s:end], doc[None, s + 1 : end + 1])[0]
            total += float(nll[lo - s :].double().sum())
    return total


def test_without_steps_or_phases_it_is_the_per_document_sliding_score() -> None:
    toks = doc_stream()
    got = run(toks, cfg(lora_ttt_lr=0.0, phased_num_phases=0))
    ref = reference_per_document_sliding(toks, 8, 24)
    assert math.isclose(got.loss * got.tokens, ref, rel_tol=1e-6)


def test_adaptation_changes_the_score_and_two_runs_are_bitwise_equal() -> None:
    toks = doc_stream()
    plain = run(toks, cfg(lora_ttt_lr=0.0, phased_num_phases=0))
    lora_only = run(toks, cfg(phased_num_phases=0))
    traces = [EvalTrace(), EvalTrace()]
    a, b = (run(toks, cfg(), t) for t in traces)
    assert a == b and traces[0].scores == traces[1].scores
    assert len({plain.loss, lora_only.loss, a.loss}) == 3  # the steps and the phases both act
    assert lora_only.loss < plain.loss  # the tiny random model adapts to its documents


def test_documents_of_one_batch_do_not_see_each_other() -> None:
    toks = doc_stream()
    c = cfg(phased_num_phases=0)
    sched = plan_schedule(documents(toks), c, 1)
    first = sched.docs[sched.batches[0]]  # the longest four, scored together
    (sa, pa), (sb, pb) = first[0], first[1]
    other = toks.clone()
    other[sb + 1 : sb + pb] = (other[sb + 1 : sb + pb] - 2 + 5) % 62 + 2  # doc b changed, BOS kept
    traces = [EvalTrace(), EvalTrace()]
    run(toks, c, traces[0])
    run(other, c, traces[1])
    doc_a = range(sa + 1, sa + pa + 1)
    assert all(traces[0].scores[p] == traces[1].scores[p] for p in doc_a)
    assert any(traces[0].scores[p] != traces[1].scores[p] for p in range(sb + 2, sb + pb + 1))


# ----------------------------------------------------------------------------- legality
class TrainBeforeScoring(LoraTTT):
    """Planted violation: each chunk's step is taken before the chunk is scored (then it is scored)."""

    def score_and_step(self, lora, opt, windows, train):
        if train.any():
            nll, _, _, mask, _, _ = self.forward(lora, windows, True)
            self.step(lora, opt, nll, mask, windows, train)
        nll, x, y, mask, pos, logits = self.forward(lora, windows, False)
        self.scorer.record(x, y, mask, pos, nll, logits)


class PhaseOnUnscoredDocuments(LoraTTT):
    """Planted violation: each global phase takes the shortest documents of the whole stream."""

    def phase_documents(self, scored, count):
        return super().phase_documents(np.arange(len(self.schedule.docs)), count)


def outcome(name: str, kind=LoraTTT) -> dict[str, bool]:
    toks, c = doc_stream(), cfg()

    def runner(t: torch.Tensor, trace: EvalTrace) -> None:
        kind(MODEL, t, TABLES, c, ScoreOptions(autocast_mode="off", trace=trace)).run()

    results = run_checks(name, runner, toks, 64, num_probes=8, order=pass_order(toks, c))
    print(format_table(results))
    return {r.check: r.passed for r in results}


def test_lora_ttt_passes_c1_to_c4() -> None:
    assert outcome("lora_ttt") == {"C1": True, "C2": True, "C3": True, "C4": True}


def test_a_step_before_its_chunk_is_scored_is_caught() -> None:
    got = outcome("bad-order", TrainBeforeScoring)
    assert not got["C3"] and not got["C1"] and got["C4"]


def test_a_global_phase_on_unscored_documents_is_caught() -> None:
    got = outcome("bad-phase", PhaseOnUnscoredDocuments)
    assert not got["C3"] and got["C4"]


# ----------------------------------------------------------------------------- 2 gloo processes
N_DIST = 300


def dist_results() -> dict:
    toks = doc_stream(N_DIST, seed=4)
    # adapters without steps: the global phases (gradients averaged over ranks) are all that adapts,
    # so 2 processes must give the 1-process score; with steps, the warm A of a rank depends on the
    # batches that rank ran (as in the record), so only the totals must agree
    phases = run(toks, cfg(lora_ttt_lr=0.0))
    steps = run(toks, cfg())
    plain = run(toks, cfg(lora_ttt_lr=0.0, phased_num_phases=0))
    return {key: dataclasses.asdict(r) for key, r in (("phases", phases), ("steps", steps), ("plain", plain))}



@pytest.mark.distributed
def test_two_gloo_processes_give_the_one_process_score(tmp_path) -> None:
    single = dist_results()
    out = tmp_path / "res.json"
    double = run_two_ranks(dist_results, out, "lora_ttt")
    for key in ("phases", "steps"):
        assert (single[key]["tokens"], single[key]["bytes"]) == (double[key]["tokens"], double[key]["bytes"])
    assert math.isclose(single["phases"]["loss"], double["phases"]["loss"], rel_tol=1e-6)
    assert single["phases"]["loss"] != single["plain"]["loss"]  # the phases did train


# ----------------------------------------------------------------------------- end to end
@pytest.mark.usefixtures("artifact_is_model_pt")
def test_pgolf_eval_and_check_run_lora_ttt_on_real_val(tmp_path, sp1024_shards, capsys):
    run_dir, _ = make_run(tmp_path, sp1024_shards, ["quant", "lora_ttt"])
    sets = ["eval.lora_ttt_context=128", "eval.lora_ttt_batch_docs=2", "eval.lora_ttt_rank=8",
            "eval.lora_ttt_lr=0.01", "eval.phased_prefix_frac=0.5", "eval.phased_chunk_tokens=256"]  # fmt: skip
    assert main(["eval", str(run_dir), *sum((["--set", s] for s in sets), [])]) == 0
    by = {r["mode"]: r for r in json.loads((run_dir / "eval.json").read_text())["results"]}
    assert (by["lora_ttt"]["tokens"], by["lora_ttt"]["bytes"]) == (by["quant"]["tokens"], by["quant"]["bytes"])
    assert by["lora_ttt"]["bpb"] != by["quant"]["bpb"]
    capsys.readouterr()
    assert main(["check", str(run_dir), *sum((["--set", s] for s in sets), [])]) == 0
    lines = capsys.readouterr().out.splitlines()
    for check in ("C1", "C2", "C3", "C4"):
        assert any(line.split()[:3] == ["lora_ttt", check, "pass"] for line in lines), check
