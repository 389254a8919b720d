"""Calibration, quantize_run on a tiny run dir, over-cap behaviour, code bytes and the time reserve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pgolf.cli import main as pgolf_main
from pgolf.config import preset, to_toml
from pgolf.data.shards import shard_name, write_shard
from pgolf.fileio import atomic_write_text
from pgolf.model import GPT, param_role
from pgolf.quant import (
    calibration_batches,
    collect_hessians,
    estimate_quant_seconds,
    load_artifact_model,
    quant_reserve_seconds,
    quantize_run,
)
from pgolf.quant.budget import gptq_cost_seconds
from pgolf.quant.scheme import plan_tensors
from pgolf.runtime import dist_info

VOCAB = 512


def tiny_config(data_dir: Path):
    cfg = preset("smoke")
    cfg.data.dir = str(data_dir)
    cfg.model.vocab_size = VOCAB
    cfg.data.train_seq_len, cfg.data.train_batch_tokens = 64, 256
    return cfg


def make_run_dir(tmp_path: Path) -> tuple[Path, object, GPT]:
    """Train shards hold ids < 256, the val shard ids >= 256, so calibration data is recognisable."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for i in range(2):
        write_shard(data / shard_name("train", i), rng.integers(0, 256, 5000))
    write_shard(data / shard_name("val", 0), rng.integers(256, VOCAB, 5000))
    cfg = tiny_config(data)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.02)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(model.state_dict(), run / "model.pt")
    atomic_write_text(run / "config.toml", to_toml(cfg))
    return run, cfg, model


def test_calibration_batches_come_from_train_shards(tmp_path):
    _, cfg, _ = make_run_dir(tmp_path)
    cfg.quant.calibration_batches = 3
    batches = list(calibration_batches(cfg, dist_info()))
    assert len(batches) == 3
    assert all(b.shape == (4, 64) for b in batches)  # one micro-batch: 256 tokens / 64
    assert all(int(b.max()) < 256 for b in batches)  # never val tokens
    cfg.quant.calibration_batch_tokens = 128
    assert next(iter(calibration_batches(cfg, dist_info()))).shape == (2, 64)


class LoopedToy(nn.Module):
    """A block applied twice (like a looped layer) and a final norm feeding a tied head."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8, bias=False)])
        self.final_norm = nn.Identity()
        self.looping = False

    def set_looping(self, on: bool) -> None:
        self.looping = on

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(ids)
        for _ in range(2 if self.looping else 1):
            x = self.blocks[0](x)
        return self.final_norm(x)


def test_hessians_accumulate_every_looped_pass_and_the_head():
    torch.manual_seed(0)
    toy = LoopedToy()
    batches = [torch.randint(0, 16, (2, 5)) for _ in range(3)]
    H = collect_hessians(toy, batches, "cpu", "off")
    exp_lin = torch.zeros(8, 8, dtype=torch.float64)
    exp_head = torch.zeros(8, 8, dtype=torch.float64)
    with torch.no_grad():
        for ids in batches:
            x1 = toy.tok_emb(ids).reshape(-1, 8).double()
            x2 = toy.blocks[0](toy.tok_emb(ids)).reshape(-1, 8).double()
            exp_lin += x1.T @ x1 + x2.T @ x2  # both passes of the looped block
            out = toy.blocks[0](toy.blocks[0](toy.tok_emb(ids))).reshape(-1, 8).double()
            exp_head += out.T @ out
    torch.testing.assert_close(H["blocks.0.weight"].double(), exp_lin / 3, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(H["tok_emb.weight"].double(), exp_head / 3, rtol=1e-5, atol=1e-6)
    assert toy.looping is False and toy.training  # the model's modes are restored


def test_quantize_run_writes_artifact_and_report(tmp_path, capsys):
    run, cfg, model = make_run_dir(tmp_path)
    report = quantize_run(run, code_bytes=1234)
    assert (run / "model.ptz").is_file() and not (run / "model.over_cap.ptz").exists()
    saved = json.loads((run / "quant.json").read_text())
    assert saved == json.loads(json.dumps(report))
    for key in (
        "artifact_bytes",
        "code_bytes",
        "total_bytes",
        "cap_bytes",
        "compressor",
        "classes",
        "hessian_seconds",
        "gptq_seconds",
    ):
        assert key in saved, key
    assert saved["artifact_bytes"] == (run / "model.ptz").stat().st_size
    assert saved["code_bytes"] == 1234  # the caller's number: quantization builds no bundle
    assert saved["total_bytes"] == saved["artifact_bytes"] + saved["code_bytes"]
    classes = saved["classes"]
    assert set(classes) == {"matrix", "embed", "control"}
    assert sum(c["bytes"] for c in classes.values()) + saved["header_bytes"] == saved["artifact_bytes"]
    assert classes["matrix"]["bits"] == 6 and classes["embed"]["bits"] == 8
    assert classes["embed"]["params"] == VOCAB * cfg.model.model_dim
    assert saved["hessians"] == 6 * cfg.model.num_layers + 1  # 6 matrices per block + the tied embedding
    assert "bits/weight" in capsys.readouterr().out

    loaded = load_artifact_model(run / "model.ptz", cfg)
    assert loaded.looping and not loaded.training
    assert loaded.tok_emb.weight.dtype == torch.bfloat16
    assert loaded.blocks[0].attn_scale.dtype == torch.float32
    ids = torch.randint(0, 256, (2, 32))
    model.set_looping(True)
    model.eval()
    with torch.no_grad():
        ref, got = model(ids, ids).item(), loaded(ids, ids).item()
    assert abs(ref - got) < 0.05 * abs(ref)  # int6/int8 weights: close to, not equal to, the original


def test_over_cap_exits_non_zero_and_keeps_the_file(tmp_path, capsys):
    run, _, _ = make_run_dir(tmp_path)
    (run / "model.ptz").write_bytes(b"stale")
    rc = pgolf_main(["quantize", str(run), "--set", "quant.cap_bytes=1000", "--set", "quant.compressor=zlib"])
    assert rc != 0
    assert (run / "model.over_cap.ptz").is_file() and not (run / "model.ptz").exists()
    err = capsys.readouterr().err
    assert "exceeds quant.cap_bytes=1,000" in err
    saved = json.loads((run / "quant.json").read_text())
    assert saved["fits"] is False and saved["compressor"] == "zlib"


def test_code_bytes_are_the_bundle_size(tmp_path):
    from pgolf.config import to_toml
    from pgolf.singlefile import build_bundle_source, bundle_code_bytes, bundle_title, collect_modules

    cfg = tiny_config(tmp_path)
    modules = collect_modules()
    assert {"pgolf.quant.gptq", "pgolf.quant.artifact", "pgolf.model.gpt", "pgolf.runtime", "pgolf.eval.ttt"} <= set(modules)
    assert not any(m.endswith(".cli") or m in ("pgolf.singlefile", "pgolf.data.build") for m in modules)
    for packed in (True, False):
        cfg.quant.packed_code = packed
        source = build_bundle_source(to_toml(cfg), bundle_title(cfg.preset), packed=packed)
        assert bundle_code_bytes(cfg) == len(source.encode("utf-8"))
    cfg.quant.packed_code = True
    packed_size = bundle_code_bytes(cfg)
    cfg.quant.packed_code = False
    assert packed_size < bundle_code_bytes(cfg) / 2


def test_quant_reserve_seconds(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.train.quant_reserve_seconds = 7.5
    assert quant_reserve_seconds(cfg) == 7.5
    cfg.train.quant_reserve_seconds = -1.0
    fixed = estimate_quant_seconds(cfg, seconds_per_token=1e-3)
    assert fixed.calibration_seconds == pytest.approx(1e-3 * 256 * cfg.quant.calibration_batches)
    assert fixed.gptq_seconds > 0
    assert fixed.total > fixed.calibration_seconds + fixed.gptq_seconds
    cfg.quant.calibration_batches *= 4
    assert estimate_quant_seconds(cfg, seconds_per_token=1e-3).calibration_seconds == pytest.approx(
        4 * fixed.calibration_seconds
    )
    measured = estimate_quant_seconds(cfg)  # times a real forward with hooks on this machine
    assert measured.calibration_seconds > 0
    assert measured.total > measured.calibration_seconds + measured.gptq_seconds
    assert quant_reserve_seconds(cfg) > 0  # a second timing: comparing two timings fails on a loaded machine
    assert gptq_cost_seconds([(512, 2048)]) > gptq_cost_seconds([(512, 512)]) > 0


def test_the_gptq_reserve_counts_only_the_tensors_gptq_quantizes(tmp_path):
    """quant.embed_method=rtn: the tied embedding leaves the GPTQ estimate, the matrices stay in it."""
    cfg = tiny_config(tmp_path)
    state = GPT(cfg.model).state_dict()
    plans = plan_tensors(state, cfg.quant, param_role)
    shapes = {p.cls: [] for p in plans}
    for p in plans:
        if p.scheme.startswith("int"):
            shapes[p.cls].append(tuple(state[p.name].shape))
    everything = estimate_quant_seconds(cfg, seconds_per_token=1e-3).gptq_seconds
    assert everything == pytest.approx(gptq_cost_seconds(shapes["matrix"] + shapes["embed"]))
    cfg.quant.embed_method = "rtn"
    assert estimate_quant_seconds(cfg, seconds_per_token=1e-3).gptq_seconds == pytest.approx(
        gptq_cost_seconds(shapes["matrix"])
    )
    assert shapes["embed"] and gptq_cost_seconds(shapes["matrix"]) < everything


@pytest.mark.slow
def test_gptq_beats_rtn_on_real_activations(sp1024_shards):
    from pgolf.model import param_role
    from pgolf.quant import dequantize, gptq_quantize, quant_error, rtn_quantize, sdclip_scales

    cfg = tiny_config(sp1024_shards)
    cfg.model.vocab_size = 1024
    cfg.quant.calibration_batches = 2
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.distributions.StudentT(4.0).sample(p.shape).to(p.dtype) * 0.02)
    H = collect_hessians(model, calibration_batches(cfg, dist_info()), "cpu", "bf16")
    for name, W in model.state_dict().items():
        if param_role(name, W) != "matrix":
            continue
        s = sdclip_scales(W, 6, 12.85)
        gptq = quant_error(W, dequantize(gptq_quantize(W, H[name], s, 6), s), H[name])
        rtn = quant_error(W, dequantize(rtn_quantize(W, s, 6), s), H[name])
        assert gptq <= rtn, name


def test_hessian_is_fp32_accurate_under_bf16_autocast():
    torch.manual_seed(0)
    toy = LoopedToy()
    ids = torch.randint(0, 16, (4, 50))
    H = collect_hessians(toy, [ids], "cpu", "bf16", looping=False)
    x = toy.tok_emb(ids).reshape(-1, 8).double()  # the Linear's input (embedding output stays fp32)
    # a bf16 matmul would be off by ~1e-2 relative; XᵀX must be computed outside autocast
    torch.testing.assert_close(H["blocks.0.weight"].double(), x.T @ x, rtol=1e-5, atol=1e-5)
