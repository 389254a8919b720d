"""evaluate_run / `pgolf eval` / `pgolf check` on a tiny run directory with real sp1024 val shards."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

import pgolf.eval.run_eval as run_eval
from pgolf.cli import main
from pgolf.config import preset, to_toml
from pgolf.data.bytes import build_byte_tables, load_tokenizer
from pgolf.data.val import load_val_tokens
from pgolf.eval.run_eval import plan_passes

pytestmark = pytest.mark.usefixtures("one_thread")


def make_run(tmp_path, shards, plan) -> tuple:
    from pgolf.model import GPT

    cfg = preset("smoke")
    cfg.data.dir, cfg.data.max_val_tokens = str(shards), 3_000
    m = cfg.model
    m.vocab_size, m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads = 1024, 2, 32, 2, 1
    m.num_loops, m.parallel_mode, m.xsa_last_n, m.rope_dims = 0, "none", 2, 8
    e = cfg.eval
    e.plan, e.seq_len, e.stride, e.batch_seqs = plan, 128, 32, 8
    e.ttt_chunk_tokens, e.ttt_epochs, e.ttt_lr = 512, 1, 0.01
    e.ngram_min_order, e.ngram_max_order, e.ngram_order_stride, e.ngram_table_bits = 2, 4, 1, 14
    e.ngram_experts, e.ngram_expert_table_bits = True, 12  # as pr1557
    cfg.train.autocast = "off"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(cfg))
    torch.manual_seed(0)
    model = GPT(cfg.model)
    torch.save(model.state_dict(), run / "model.pt")
    return run, cfg


@pytest.fixture
def artifact_is_model_pt(monkeypatch):
    """The quant stage is another helper's; here the 'artifact' is the same weights."""
    monkeypatch.setattr(run_eval, "load_quant_model", run_eval.load_prequant_model)


def test_plan_passes_route_ngram():
    assert [(p.kind, p.plain, p.tilted) for p in plan_passes(["sliding", "ttt", "ngram"])] == [
        ("sliding", "sliding", None),
        ("ttt", "ttt", "ngram"),
    ]
    assert [(p.kind, p.plain, p.tilted) for p in plan_passes(["quant", "ngram"])] == [
        ("quant", "quant", None),
        ("sliding", None, "ngram"),
    ]
    with pytest.raises(ValueError, match="unknown eval modes"):
        plan_passes(["slide"])


def test_evaluate_run_all_modes(tmp_path, sp1024_shards, artifact_is_model_pt):
    plan = ["prequant", "quant", "sliding", "ttt", "ngram"]
    run, cfg = make_run(tmp_path, sp1024_shards, plan)
    out = run_eval.evaluate_run(run)
    saved = json.loads((run / "eval.json").read_text())
    assert saved == out and set(out) == {"results", "eval_seconds", "budget_seconds", "stopped_early"}
    assert [r["mode"] for r in out["results"]] == plan and out["stopped_early"] is False
    tokens = load_val_tokens(sp1024_shards, 128, 3_000)
    tables = build_byte_tables(load_tokenizer(sp1024_shards / "tokenizer.model", 1024), 1024)
    total_bytes = int(tables.target_bytes(tokens[:-1], tokens[1:]).sum())
    by = {r["mode"]: r for r in out["results"]}
    for r in out["results"]:
        assert (r["tokens"], r["bytes"]) == (tokens.numel() - 1, total_bytes)
        assert math.isclose(r["bpb"], r["loss"] * r["tokens"] / (math.log(2) * r["bytes"]), rel_tol=1e-9)
        assert set(r) == {"mode", "loss", "bpb", "tokens", "bytes", "seconds"}
    assert by["prequant"]["bpb"] == by["quant"]["bpb"]  # same weights here
    assert by["ttt"]["bpb"] != by["sliding"]["bpb"] and by["ngram"]["bpb"] != by["ttt"]["bpb"]


HALF_CALLS: list[int] = []


def half_stride_mode(model, tokens, tables, cfg, opts):
    """A mode written for the registry test: sliding eval at half the configured stride."""
    from pgolf.eval.score import eval_sliding

    HALF_CALLS.append(cfg.stride // 2)
    kw = dict(seq_len=cfg.seq_len, stride=cfg.stride // 2, batch_seqs=cfg.batch_seqs, opts=opts)
    return eval_sliding(model, tokens, tables, **kw)


def test_a_new_mode_is_one_function_and_one_registry_line(
    tmp_path, sp1024_shards, artifact_is_model_pt, monkeypatch
):
    from pgolf.eval.modes import MODES, EvalMode

    monkeypatch.setitem(
        MODES, "half", EvalMode("half", "half_bpb", "half stride", score="test_eval_run:half_stride_mode")
    )
    run, _ = make_run(tmp_path, sp1024_shards, ["sliding"])
    out = run_eval.evaluate_run(run, modes=["sliding", "half", "ngram"])
    by = {r["mode"]: r for r in out["results"]}
    assert list(by) == ["sliding", "half", "ngram"]
    assert (by["half"]["tokens"], by["half"]["bytes"]) == (by["sliding"]["tokens"], by["sliding"]["bytes"])
    assert HALF_CALLS == [16]
    # the tilt rides on the last mode that takes a transform (sliding), as before
    assert [(p.kind, p.plain, p.tilted) for p in plan_passes(["sliding", "half", "ngram"])] == [
        ("sliding", "sliding", "ngram"),
        ("half", "half", None),
    ]


def test_eval_seconds_count_the_artifact_load(tmp_path, sp1024_shards, monkeypatch):
    """Issue 16.4: eval_seconds is the whole eval, the artifact's load (here a slow fake) included."""
    slow = 0.4

    def slow_load(run_dir, cfg, device):
        time.sleep(slow)
        return run_eval.load_prequant_model(run_dir, cfg, device)

    monkeypatch.setattr(run_eval, "load_quant_model", slow_load)
    run, _ = make_run(tmp_path, sp1024_shards, ["quant"])
    out = run_eval.evaluate_run(run)
    assert out["results"][0]["seconds"] >= slow and out["eval_seconds"] >= out["results"][0]["seconds"]


def test_cli_mode_flags_and_budget_stop(tmp_path, sp1024_shards, artifact_is_model_pt, capsys):
    run, _ = make_run(tmp_path, sp1024_shards, ["prequant", "sliding"])
    assert main(["eval", str(run), "--quant", "--set", "eval.stride=64"]) == 0
    out = json.loads((run / "eval.json").read_text())
    assert [r["mode"] for r in out["results"]] == ["quant"]
    # a budget that is already spent: a clean stop, nothing measured, the file still written
    res = run_eval.evaluate_run(run, budget_seconds=1e-9)
    assert res["stopped_early"] is True and res["results"] == []
    assert "stopped early" in capsys.readouterr().out


def test_cli_check_passes_on_a_run(tmp_path, sp1024_shards, artifact_is_model_pt, capsys):
    run, _ = make_run(tmp_path, sp1024_shards, ["quant", "sliding", "ttt", "ngram"])
    assert main(["check", str(run)]) == 0
    text = capsys.readouterr().out
    for mode in ("quant", "sliding", "ttt", "ngram"):
        for check in ("C1", "C2", "C3", "C4"):
            assert any(line.split()[:3] == [mode, check, "pass"] for line in text.splitlines()), (mode, check)


def test_missing_files_give_clear_errors(tmp_path, sp1024_shards, capsys):
    run, _ = make_run(tmp_path, sp1024_shards, ["prequant"])
    (run / "model.pt").unlink()
    assert main(["eval", str(run)]) == 2
    assert "model.pt not found" in capsys.readouterr().err
