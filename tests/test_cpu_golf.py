"""cpu-golf v2 (SPEC §11.0, issue 14): the preset's invariants, a reserve that covers the encode and the
fit, `pgolf run --preset cpu-golf` never leaving an over-cap model.ptz, and the scheme table benchmark."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from pgolf.cli import main as pgolf_main
from pgolf.config import preset, to_dict
from pgolf.model import GPT
from pgolf.quant import budget
from pgolf.quant.codecs import CODECS

ROOT = Path(__file__).resolve().parents[1]

# cpu-golf at smoke size: 1 layer x 32, 8 sequences of 128 per step, fp32, a few hundred val tokens
SMOKE_SETS = (
    "model.num_layers=1",
    "model.model_dim=32",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.xsa_last_n=1",
    "model.parallel_start=0",
    "data.train_seq_len=128",
    "data.train_batch_tokens=1024",
    "data.max_val_tokens=1025",
    "eval.seq_len=128",
    "eval.stride=64",
    "train.autocast=off",
    "optim.muon_ns_dtype=fp32",
    "train.max_wallclock_seconds=0",
    "train.val_every=0",
    "train.log_every=2",
    "quant.calibration_batches=2",
)


def test_v2_preset_is_the_byte_bound_track():
    c = preset("cpu-golf")
    q = c.quant
    assert (q.cap_bytes, q.fit_to_cap, q.cap_counts_code, q.compressor) == (100_000, True, False, "pergroup")
    assert q.method == "gptq" and q.calibration_batches == 16 and (q.matrix_bits, q.embed_bits) == (6, 8)
    assert q.embed_method == "rtn"  # GPTQ for the matrices only (docs/quantization.md)
    assert set(q.codecs) <= set(CODECS) and "ans" in q.codecs
    assert c.train.quant_reserve_seconds == -1.0  # estimated, encode and fit included
    assert (c.model.num_layers, c.model.model_dim, c.model.vocab_size) == (4, 64, 1024)
    # the v1 recipe stays as cpu-golf-2mb; v2 keeps its sequence, batch, optimizer, training and eval
    v1, v2 = to_dict(preset("cpu-golf-2mb")), to_dict(c)
    assert v1["quant"]["cap_bytes"] == 2_000_000 and v1["quant"]["matrix_bits"] == 16
    for section in ("data", "optim", "train"):
        assert v1[section] == v2[section], section
    changed = {k for k in v1["eval"] if v1["eval"][k] != v2["eval"][k]}
    assert changed == {"plan", "lora_ttt_context", "lora_ttt_chunk"}
    assert (c.eval.plan, c.eval.lora_ttt_context, c.eval.lora_ttt_chunk) == (["quant", "sliding", "lora_ttt"], 512, 192)
    assert {k for k in v1["model"] if v1["model"][k] != v2["model"][k]} == {"model_dim", "smear_gate"}
    assert sum(p.numel() for p in GPT(c.model).parameters()) == 214_325  # 214,312 + the smear gate's 12 + 1


def test_the_estimated_reserve_covers_the_encode_and_the_fit(monkeypatch):
    monkeypatch.setattr(budget, "measure_encode_seconds", lambda cfg, state: 3.0)
    monkeypatch.setattr(budget, "measure_calibration_seconds_per_token", lambda cfg, model, device: 1e-6)
    cfg = preset("cpu-golf")
    est = budget.estimate_quant_seconds(cfg)
    fit = (1 + budget.FIT_ENCODES) * 3.0 + budget.FIT_GPTQ_PASSES * est.gptq_seconds
    assert est.compress_seconds == pytest.approx(fit) and est.gptq_seconds > 0
    expected = budget.RESERVE_SAFETY * (est.calibration_seconds + est.gptq_seconds + fit) + 2.0
    assert budget.quant_reserve_seconds(cfg) == pytest.approx(expected)
    cfg.quant.fit_to_cap = False  # pergroup alone: one encode
    assert budget.estimate_quant_seconds(cfg).compress_seconds == pytest.approx(3.0)
    cfg.quant.compressor = "brotli"  # a version-1 container without fitting: as before, nothing reserved
    assert budget.estimate_quant_seconds(cfg).compress_seconds == 0.0
    assert budget.quant_reserve_seconds(preset("cpu-golf-2mb")) == budget.RESERVE_FIXED_SECONDS  # unchanged


def test_measured_encode_seconds_time_a_real_encode(monkeypatch):
    calls = []
    import pgolf.quant.artifact as artifact

    real = artifact.encode_configured
    monkeypatch.setattr(artifact, "encode_configured", lambda q, c, m=None: calls.append(c) or real(q, c, m))
    cfg = preset("cpu-golf")
    shape = {"num_layers": 1, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1, "xsa_last_n": 1, "parallel_start": 0}
    for key, value in shape.items():
        setattr(cfg.model, key, value)
    from pgolf.model import GPT

    seconds = budget.measure_encode_seconds(cfg, GPT(cfg.model).state_dict())
    assert seconds > 0 and len(calls) == 1
    assert calls[0].method == "rtn" and calls[0].codecs == cfg.quant.codecs  # the run's container and codecs


def smoke_run(out: Path, data: Path, *sets: str) -> int:
    args = ["run", "--preset", "cpu-golf", "--data", str(data), "--out", str(out)]
    for s in (*SMOKE_SETS, *sets):
        args += ["--set", s]
    return pgolf_main(args)


@pytest.fixture(scope="module")
def smoke_runs(sp1024_shards, tmp_path_factory):
    """Two cpu-golf runs at smoke size, of 2 and 6 steps, under a cap that makes the fit work."""
    root = tmp_path_factory.mktemp("cpu_golf")
    runs = {}
    for steps in (2, 6):
        run = root / f"steps{steps}"
        assert smoke_run(run, sp1024_shards, f"train.iterations={steps}", "quant.cap_bytes=16000") == 0
        runs[steps] = run
    return runs


@pytest.mark.parametrize("steps", [2, 6])
def test_cpu_golf_run_never_writes_an_over_cap_artifact(smoke_runs, steps):
    run = smoke_runs[steps]
    q = json.loads((run / "quant.json").read_text())
    size = (run / "model.ptz").stat().st_size
    assert q["artifact_bytes"] == size <= 16_000 == q["cap_bytes"] and q["fits"]
    assert q["fit"]["changes"], "the cap was meant to bind"
    assert q["cap_counts_code"] is False and q["code_bytes"] > 0 and q["total_bytes"] == size + q["code_bytes"]
    assert not (run / "model.over_cap.ptz").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_bpb"] > 0 and summary["artifact_bytes"] == size


def test_an_unfittable_cap_stops_before_eval_with_no_artifact(sp1024_shards, tmp_path, capsys):
    rc = smoke_run(tmp_path / "run", sp1024_shards, "train.iterations=2", "quant.cap_bytes=1000")
    assert rc != 0
    assert "cannot fit the artifact under quant.cap_bytes=1,000" in capsys.readouterr().err
    run = tmp_path / "run"
    assert not (run / "model.ptz").exists() and not (run / "model.over_cap.ptz").exists()
    assert not (run / "eval.json").exists()


def load_benchmark():
    spec = importlib.util.spec_from_file_location("cpu_golf_schemes", ROOT / "benchmarks" / "cpu_golf_schemes.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def digest(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir()) if p.is_file()}


def test_scheme_table_on_two_models_under_a_tiny_cap(smoke_runs, tmp_path, capsys):
    bench = load_benchmark()
    runs = [smoke_runs[2], smoke_runs[6]]
    before = [digest(r) for r in runs]
    out = tmp_path / "rows.json"
    cap = 16_000
    assert bench.main([*map(str, runs), "--cap", str(cap), "--calibration-batches", "2", "--json", str(out)]) == 0
    assert [digest(r) for r in runs] == before  # the run directories are never written
    data = json.loads(out.read_text())
    rows = {(Path(r["run"]).name, r["scheme"]): r for r in data["rows"]}
    assert set(rows) == {(r.name, s.name) for r in runs for s in bench.SCHEMES}
    for r in data["rows"]:
        if r["fits"]:
            assert r["bytes"] <= cap and r["quant_bpb"] > 0
            assert r["entropy_bound"] > 0 or r["scheme"] == "fp16"
        else:
            assert r.get("bytes", cap + 1) > cap or "error" in r
    for run in runs:
        assert rows[(run.name, "mixed")]["fits"] and rows[(run.name, "mixed")]["fit"]  # the fit chose the bits
        assert not rows[(run.name, "fp16")]["fits"]  # ~40k parameters in fp16 cannot fit 16,000 B
        r = rows[(run.name, "int4")]
        assert r["bits_per_weight"] == pytest.approx(8 * r["bytes"] / r["params"])
    table = capsys.readouterr().out
    best = table.split("| scheme | best model")[1]
    assert "| mixed bits per group" in best and "| fp16 | none fits |" in best


def test_the_1855_ablation_preset_is_cpu_golf_plus_the_1855_switches():
    base, c = to_dict(preset("cpu-golf")), to_dict(preset("cpu-golf-1855"))
    assert base["data"] == c["data"] and base["train"] == c["train"] and base["eval"] == c["eval"]
    changed = {f"{s}.{k}" for s in ("model", "optim", "quant") for k in c[s] if c[s][k] != base[s][k]}
    assert changed == {
        "model.qk_gain_init", "model.sparse_attn_gate", "model.sparse_attn_gate_scale",
        "model.doc_attention", "model.fused_ce", "model.parallel_mode", "model.parallel_final_lane",
        "optim.muon_ns_coeffs", "optim.min_lr", "optim.beta2", "optim.warmdown_frac", "optim.ema_decay",
        "quant.embed_bits", "quant.embed_clip_sigmas", "quant.gate_int8", "quant.embed_method",
        "quant.attn_clip_sigmas", "quant.mlp_clip_sigmas", "quant.lqer_top_k",
    }  # fmt: skip
    cfg = preset("cpu-golf-1855")
    m, o, q = cfg.model, cfg.optim, cfg.quant
    assert (m.qk_gain_init, m.sparse_attn_gate_scale, m.gate_window) == (5.0, 0.5, 12)
    assert (o.min_lr, o.beta2, o.warmdown_frac, o.ema_decay) == (0.1, 0.99, 0.85, 0.9965)  # SPEC-1855 §6
    assert (q.embed_bits, q.embed_clip_sigmas, q.cap_bytes, q.fit_to_cap) == (7, 14.0, 100_000, True)
    assert (q.attn_clip_sigmas, q.mlp_clip_sigmas, q.matrix_clip_sigmas) == (13.0, 11.5, 12.85)  # SPEC-1855 §4.1
    assert (q.lqer_top_k, q.lqer_rank, q.lqer_group) == (3, 4, 64)  # SPEC-1855 §4.4
