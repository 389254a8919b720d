"""Cap fitting (quant/fit.py): the artifact always ends at or under the cap, the changes are logged and
ordered by cost, an impossible cap is a clear error and never an over-cap artifact."""

from __future__ import annotations

import json

import pytest
import torch
from test_quant_pipeline import make_run_dir

from pgolf.cli import main as pgolf_main
from pgolf.config import to_toml
from pgolf.config.schema import QuantConfig
from pgolf.fileio import atomic_write_text
from pgolf.quant import load_artifact_model, quantize_run, read_artifact
from pgolf.quant.artifact import encode_configured
from pgolf.quant.fit import (
    FitError,
    GroupSetting,
    base_settings,
    fit_to_cap,
    proxy_cost,
    quantize_with_overrides,
)
from pgolf.quant.gptq import dequantize
from pgolf.quant.pergroup import group_of
from pgolf.quant.scheme import (
    dequantize_state_dict,
    dequantize_tensor,
    lqer_entries,
    lqer_tensors,
    plan_tensors,
    quantize_state_dict,
)

# SPEC-1855 §4.1: per-class clips (attention 13.0, MLP 11.5, embedding 14.0, other 12.85) and int7 embedding
PR1855_QUANT = dict(
    attn_clip_sigmas=13.0, mlp_clip_sigmas=11.5, embed_clip_sigmas=14.0, matrix_clip_sigmas=12.85, embed_bits=7
)


def fit_run(tmp_path, **quant):
    """A smoke run dir quantized by round-to-nearest without calibration (the Hessian-weighted proxy is
    tested on synthetic tensors below), per-group artifact, fitting on, cap on model.ptz alone."""
    run, cfg, model = make_run_dir(tmp_path)
    quant = dict(compressor="pergroup", codecs=["ans"], fit_to_cap=True, cap_counts_code=False, **quant)
    for key, value in dict(quant, method="rtn", calibration_batches=0).items():
        setattr(cfg.quant, key, value)
    atomic_write_text(run / "config.toml", to_toml(cfg))
    return run, cfg, model


def test_fit_brings_a_smoke_run_under_a_tiny_cap_and_logs_each_change(tmp_path, capsys):
    from pgolf.model import param_role

    run, cfg, model = fit_run(tmp_path)
    free = len(
        encode_configured(quantize_state_dict(model.state_dict(), {}, cfg.quant, param_role), cfg.quant)[0]
    )
    cap = int(free * 0.9)
    report = quantize_run(run, sets=[f"quant.cap_bytes={cap}"], code_bytes=0)
    size = (run / "model.ptz").stat().st_size
    assert report["artifact_bytes"] == size <= cap < free and report["fits"]
    saved = json.loads((run / "quant.json").read_text())
    changes = saved["fit"]["changes"]
    assert changes and saved["fit"]["budget_bytes"] == cap
    out = capsys.readouterr().out
    assert out.count("quant fit: ") == len(changes)
    for c in changes:
        assert c["group"] in saved["classes"] and c["bytes_saved"] > 0 and c["change"] in ("bits", "clip")
        assert c["bits"][1] < c["bits"][0] or c["clip_sigmas"][1] > c["clip_sigmas"][0]
    assert changes[-1]["artifact_bytes"] == size
    qts, header = read_artifact(run / "model.ptz")  # the file holds what the overrides say
    for g, s in saved["fit"]["overrides"].items():
        assert {qt.bits for qt in qts.values() if header_group(header, qt.name) == g} == {s["bits"]}
    loaded = load_artifact_model(run / "model.ptz", cfg)  # the eval path reads the per-group file
    expected = dequantize_tensor(qts["blocks.0.mlp.fc.weight"]).float()
    assert torch.equal(loaded.blocks[0].mlp.fc.weight.detach(), expected)


def header_group(header, name):
    return next(e["group"] for e in header["tensors"] if e["name"] == name)


def test_a_cap_below_the_smallest_artifact_is_an_error_naming_the_cap(tmp_path, capsys):
    run, _, _ = fit_run(tmp_path)
    (run / "model.ptz").write_bytes(b"stale")
    rc = pgolf_main(["quantize", str(run), "--set", "quant.cap_bytes=2000"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "cannot fit the artifact under quant.cap_bytes=2,000" in err
    assert not (run / "model.ptz").exists() and not (run / "model.over_cap.ptz").exists()


def synthetic(seed: int = 0):
    """Two 64x64 matrices; the Hessian of `blocks.0.attn.c_q` weighs its error 100x more."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "blocks.0.attn.c_q.weight": torch.randn(64, 64, generator=g) * 0.02,
        "blocks.0.mlp.fc.weight": torch.randn(64, 64, generator=g) * 0.02,
    }
    x = torch.randn(256, 64, generator=g)
    hessians = {"blocks.0.attn.c_q.weight": 100 * x.T @ x / 256, "blocks.0.mlp.fc.weight": x.T @ x / 256}
    return state, hessians


def role(name, t):
    return "matrix"


def test_fit_coarsens_the_group_whose_error_costs_least_first():
    state, hessians = synthetic()
    qcfg = QuantConfig(method="gptq", compressor="pergroup", codecs=["ans"], calibration_batches=1)
    qts = quantize_state_dict(state, hessians, qcfg, role)
    encode = lambda q: encode_configured(q, qcfg)
    free = len(encode(qts)[0])
    logs = []
    qts2, encoded, summary = fit_to_cap(state, hessians, qts, qcfg, free - 300, encode, role, log=logs.append)
    assert len(encoded[0]) <= free - 300 and len(logs) == len(summary["changes"])
    assert summary["changes"][0]["group"] == "mlp.fc"  # the 100x cheaper error goes first
    assert proxy_cost(list(qts2.values()), state, hessians) > proxy_cost(list(qts.values()), state, hessians)
    # the overrides reproduce the fitted tensors exactly through the public override path
    overrides = {g: GroupSetting(**s) for g, s in summary["overrides"].items()}
    again = quantize_with_overrides(state, hessians, qcfg, role, overrides)
    assert all(torch.equal(again[n].data, qts2[n].data) for n in qts2)
    with pytest.raises(ValueError, match="no such group"):
        quantize_with_overrides(state, hessians, qcfg, role, {"mlp.proj": GroupSetting(4, 12.0)})


def test_an_artifact_under_the_cap_is_left_alone():
    state, hessians = synthetic(1)
    qcfg = QuantConfig(method="rtn", compressor="brotli")
    qts = quantize_state_dict(state, hessians, qcfg, role)
    encode = lambda q: encode_configured(q, qcfg)
    blob = encode(qts)[0]
    out, encoded, summary = fit_to_cap(state, hessians, qts, qcfg, len(blob), encode, role)
    assert encoded[0] == blob and summary["changes"] == [] and out == qts


def test_impossible_fit_raises_fit_error():
    state, hessians = synthetic(2)
    qcfg = QuantConfig(method="rtn", compressor="pergroup", codecs=["ans"], cap_bytes=50)
    qts = quantize_state_dict(state, hessians, qcfg, role)
    with pytest.raises(FitError, match="quant.cap_bytes=50 "):
        fit_to_cap(
            state, hessians, qts, qcfg, 50, lambda q: encode_configured(q, qcfg), role, log=lambda _: None
        )


def test_fit_holds_the_cap_with_a_version_1_container_too():
    """With brotli frames per class the search's ANS estimate is only a guide; the real size decides."""
    state, hessians = synthetic(3)
    qcfg = QuantConfig(method="rtn", compressor="brotli", shuffle="bshf2")
    qts = quantize_state_dict(state, hessians, qcfg, role)
    encode = lambda q: encode_configured(q, qcfg)
    budget = len(encode(qts)[0]) - 400
    _, encoded, summary = fit_to_cap(state, hessians, qts, qcfg, budget, encode, role, log=lambda _: None)
    assert len(encoded[0]) <= budget and summary["changes"][-1]["artifact_bytes"] == len(encoded[0])


def smoke_state(seed: int = 0):
    """The smoke model's state_dict (vocab 256) with random Hessians for its matrices."""
    from pgolf.config import preset
    from pgolf.model import GPT, param_role

    cfg = preset("smoke")
    cfg.model.vocab_size = 256
    torch.manual_seed(seed)
    state = GPT(cfg.model).state_dict()
    g = torch.Generator().manual_seed(seed)
    hessians = {}
    for name, t in state.items():
        if param_role(name, t) == "matrix":
            state[name] = t + torch.randn(t.shape, generator=g) * 0.02
            x = torch.randn(128, t.shape[1], generator=g)
            hessians[name] = x.T @ x / 128
    return state, hessians


@pytest.mark.parametrize("clip_mode", ["sigma", "step", "search"])
def test_every_group_at_its_rule_setting_requantizes_to_the_configured_codes(clip_mode):
    """The fit's base setting of a group is its rule's bits and clip (per-class clips, int7 embedding, the
    clip mode's scaled k), and requantizing by the rule at that setting reproduces every code and scale."""
    from pgolf.model import param_role

    state, hessians = smoke_state()
    qcfg = QuantConfig(method="gptq", calibration_batches=1, clip_mode=clip_mode, **PR1855_QUANT)
    plain = quantize_state_dict(state, hessians, qcfg, param_role)
    base = base_settings(plain, {p.name: p for p in plan_tensors(state, qcfg, param_role)})
    if clip_mode == "sigma":
        assert base["attn.c_q"] == base["attn.proj"] == GroupSetting(6, 13.0)
        assert base["mlp.fc"] == base["mlp.proj"] == GroupSetting(6, 11.5) and base["embed"] == GroupSetting(7, 14.0)
    if clip_mode == "step":  # k follows the width: 14.0 tuned at int8 is 14·63/127 at int7
        assert base["embed"] == GroupSetting(7, pytest.approx(14.0 * 63 / 127))
    again = quantize_with_overrides(state, hessians, qcfg, param_role, base)
    for name, qt in plain.items():
        assert torch.equal(again[name].data, qt.data), name
        assert qt.scale is None or torch.equal(again[name].scale, qt.scale), name


def test_per_class_clips_with_the_fit_on_a_model_that_fits_are_the_same_artifact(tmp_path):
    run, _, _ = fit_run(tmp_path, **PR1855_QUANT)
    quantize_run(run, sets=["quant.fit_to_cap=false"], verbose=False, code_bytes=0)
    without = (run / "model.ptz").read_bytes()
    report = quantize_run(run, sets=["quant.cap_bytes=10000000"], verbose=False, code_bytes=0)
    assert (run / "model.ptz").read_bytes() == without and "fit" not in report


def test_a_binding_cap_with_lqer_and_per_class_clips(tmp_path):
    """The artifact with its LQER factors is under the cap and loads; the factors are those of the fitted
    codes (recomputed, never stale), they still reduce the error of their tensors, and the groups the fit
    left alone keep the codes of the per-class plan."""
    from pgolf.model import param_role

    run, cfg, model = fit_run(tmp_path, lqer_top_k=3, **PR1855_QUANT)
    state = model.state_dict()
    plain = quantize_state_dict(state, {}, cfg.quant, param_role)
    free = len(encode_configured(plain, cfg.quant)[0])
    cap = int(free * 0.8)
    report = quantize_run(run, sets=[f"quant.cap_bytes={cap}"], verbose=False, code_bytes=0)
    size = (run / "model.ptz").stat().st_size
    assert report["artifact_bytes"] == size <= cap < free and report["fit"]["changes"]
    qts, _ = read_artifact(run / "model.ptz")
    assert lqer_tensors(qts) == report["lqer"] and len(report["lqer"]) == 3
    codes = {n: qt for n, qt in qts.items() if qt.cls != "lqer"}
    factors = lqer_entries(state, codes, plan_tensors(state, cfg.quant, param_role), cfg.quant)
    assert set(factors) == set(qts) - set(codes)
    assert all(torch.equal(factors[n].data, qts[n].data) for n in factors)
    overridden = report["fit"]["overrides"]
    for name, qt in codes.items():
        if qt.scheme.startswith("int") and group_of(qt) not in overridden:
            assert torch.equal(qt.data, plain[name].data) and torch.equal(qt.scale, plain[name].scale), name
    assert any(group_of(codes[n]) in overridden for n in report["lqer"]), "meant to correct a fitted tensor"
    corrected = dequantize_state_dict(qts)
    loaded = load_artifact_model(run / "model.ptz", cfg).state_dict()
    for name in report["lqer"]:
        W, fitted = state[name].float(), dequantize(codes[name].data, codes[name].scale)
        assert torch.linalg.matrix_norm(W - corrected[name].float()) < torch.linalg.matrix_norm(W - fitted)
        assert torch.equal(loaded[name].float(), corrected[name].float())
