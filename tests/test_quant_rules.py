"""The per-tensor rule table (pgolf.quant.rules): the record presets' plan and bytes unchanged, per-class
clips, int7 embedding and int8 gate of SPEC-1855 §4, clip modes that follow the width, --explain."""

from __future__ import annotations

import pytest
import torch

from pgolf.cli import main as pgolf_main
from pgolf.config import preset, to_toml
from pgolf.config.schema import QuantConfig
from pgolf.fileio import atomic_write_text
from pgolf.model import GPT, param_role
from pgolf.quant import gptq_quantize, percentile_clip_scales, quant_error, rtn_quantize, sdclip_scales
from pgolf.quant.artifact import decode_artifact, encode_artifact
from pgolf.quant.gptq import dequantize
from pgolf.quant.rules import CLIP_SEARCH_FACTORS, rules_from_config
from pgolf.quant.scheme import QuantizedTensor, plan_tensors, quantize_state_dict


def legacy_plan(state, q: QuantConfig) -> dict[str, tuple]:
    """The plan pgolf made before the rule table (one if-chain), as the oracle of the record presets."""
    out = {}
    for name, t in state.items():
        cls = param_role(name, t)
        if not t.is_floating_point():
            out[name] = (cls, "raw", t.element_size() * 8, 0.0, False)
            continue
        small = t.numel() <= 65_536
        keep = (cls == "control" or t.dim() != 2) if q.passthrough == "role" else (small or t.dim() != 2)
        bits = q.matrix_bits if cls == "matrix" else q.embed_bits
        if keep or bits == 16:
            out[name] = (cls, "fp16", 16, 0.0, False)
        elif cls == "matrix":
            out[name] = (cls, f"int{bits}", bits, q.matrix_clip_sigmas, True)
        else:
            out[name] = (cls, f"int{bits}", bits, q.embed_clip_sigmas, q.hessian_clip_embed)
    return out


def new_plan(state, q: QuantConfig) -> dict[str, tuple]:
    return {p.name: (p.cls, p.scheme, p.bits, p.clip_sigmas, p.hessian_clip) for p in plan_tensors(state, q, param_role)}


@pytest.mark.parametrize("name", ["pr1394", "pr1541", "pr1557", "cpu-golf"])
def test_record_presets_keep_their_plan_tensor_by_tensor(name):
    cfg = preset(name)
    with torch.device("meta"):  # full-size shapes without allocating them
        state = GPT(cfg.model).state_dict()
    assert new_plan(state, cfg.quant) == legacy_plan(state, cfg.quant)
    cfg.quant.passthrough = "size"
    assert new_plan(state, cfg.quant) == legacy_plan(state, cfg.quant)


def test_legacy_corners_untied_head_and_large_control_tensors():
    """An untied head takes embed_bits unless head_bits says otherwise; a large 2-D control tensor under
    passthrough=size is quantized with the embedding's settings, as before."""
    state = {
        "tok_emb.weight": torch.randn(300, 256),
        "lm_head.weight": torch.randn(300, 256),
        "skip_weights": torch.randn(300, 256),  # control, 76,800 elements
        "blocks.0.attn.c_q.weight": torch.randn(256, 256),
        "steps": torch.tensor(3),
    }
    for q in (QuantConfig(), QuantConfig(passthrough="size", embed_bits=6, hessian_clip_embed=True)):
        assert new_plan(state, q) == legacy_plan(state, q)
    plan = new_plan(state, QuantConfig(passthrough="size"))
    assert plan["skip_weights"] == ("control", "int8", 8, 20.0, False)
    plan = new_plan(state, QuantConfig(head_bits=5, head_clip_sigmas=9.0))
    assert plan["lm_head.weight"][1:4] == ("int5", 5, 9.0) and plan["tok_emb.weight"][1:4] == ("int8", 8, 20.0)


def legacy_quantize(state, hessians, q: QuantConfig) -> dict[str, QuantizedTensor]:
    """Before the rule table: one GPTQ sweep per (shape, bits, has-Hessian, class) group, SDClip scales."""
    plan = legacy_plan(state, q)
    out, groups = {}, {}
    for name, (cls, scheme, bits, _, _) in plan.items():
        t = state[name]
        if scheme == "raw":
            out[name] = QuantizedTensor(name, cls, scheme, bits, t.clone(), None, t.dtype)
        elif scheme == "fp16":
            out[name] = QuantizedTensor(name, cls, scheme, 16, t.to(torch.float16), None, t.dtype)
        else:
            groups.setdefault((tuple(t.shape), bits, name in hessians, cls), []).append(name)
    for (_, bits, use_h, _), names in groups.items():
        cls, _, _, k, hc = plan[names[0]]
        W = torch.stack([state[n].float() for n in names])
        H = torch.stack([hessians[n].float() for n in names]) if use_h else None
        lam = q.hessian_clip_lambda if hc else 0.0
        if q.clip_percentile > 0:
            S = percentile_clip_scales(W, bits, q.clip_percentile)
        else:
            S = sdclip_scales(W, bits, k, H.diagonal(dim1=-2, dim2=-1) if H is not None else None, lam)
        gptq = q.method == "gptq" and H is not None
        Q = gptq_quantize(W, H, S, bits, q.gptq_damp, q.gptq_block_size) if gptq else rtn_quantize(W, S, bits)
        for i, n in enumerate(names):
            out[n] = QuantizedTensor(n, cls, f"int{bits}", bits, Q[i], S[i], state[n].dtype)
    return {n: out[n] for n in plan}


def smoke_state_and_hessians(vocab: int = 256):
    cfg = preset("smoke")
    cfg.model.vocab_size = vocab
    torch.manual_seed(0)
    state = {
        k: v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v
        for k, v in GPT(cfg.model).state_dict().items()
    }
    g = torch.Generator().manual_seed(1)
    hessians = {}
    for k, v in state.items():
        if v.is_floating_point() and v.dim() == 2:
            X = torch.randn(512, v.shape[1], generator=g)
            X[:, :3] *= 4
            hessians[k] = X.T @ X / 512
    return state, hessians


@pytest.mark.parametrize("name", ["pr1394", "pr1557", "baseline"])
def test_record_presets_quantize_identically(name):
    """GPTQ codes and scales equal the pre-table quantizer's bit for bit (plain SDClip, Hessian-aware clip
    on the embedding too, RTN with percentile clip), so the artifact bytes are unchanged."""
    state, hessians = smoke_state_and_hessians()
    q = preset(name).quant
    new = quantize_state_dict(state, hessians, q, param_role)
    old = legacy_quantize(state, hessians, q)
    assert list(new) == list(old)
    for n, qt in new.items():
        ref = old[n]
        assert (qt.cls, qt.scheme, qt.bits, qt.dtype) == (ref.cls, ref.scheme, ref.bits, ref.dtype), n
        assert torch.equal(qt.data, ref.data), n
        assert (qt.scale is None and ref.scale is None) or torch.equal(qt.scale, ref.scale), n


def pr1855_quant() -> QuantConfig:
    """SPEC-1855 §4.2 / §6.2 run values: int7 embedding at 14σ, attention 13σ, MLP 11.5σ, other 12.85σ."""
    clips = {"embed_clip_sigmas": 14.0, "attn_clip_sigmas": 13.0, "mlp_clip_sigmas": 11.5, "matrix_clip_sigmas": 12.85}
    return QuantConfig(embed_bits=7, passthrough="size", gate_int8=True, **clips)


def pr1855_like_state() -> dict[str, torch.Tensor]:
    """The names #1855's model has (attention gate, smear gate) at small shapes; matrices above 65,536
    elements so the records' size passthrough does not keep them."""
    torch.manual_seed(0)
    return {
        "tok_emb.weight": torch.randn(1024, 128) * 0.02,
        "smear_gate.weight": torch.randn(1, 12),
        "smear_lambda": torch.zeros(1),
        "blocks.0.attn.c_q.weight": torch.randn(512, 256) * 0.02,
        "blocks.0.attn.attn_gate_w": torch.randn(8, 12),  # 96 elements: the sparse gate
        "blocks.0.mlp.fc.weight": torch.randn(1024, 256) * 0.02,
        "blocks.0.mlp.proj.weight": torch.randn(256, 1024) * 0.02,
        "blocks.0.lane.weight": torch.randn(512, 256) * 0.02,  # another matrix: "other"
        "blocks.1.attn.attn_gate_w": torch.randn(4, 4),  # 16 elements: below the gate rule's 32
        "blocks.2.attn.attn_gate_w": torch.randn(128, 128),  # 16,384 elements: above its 8,192
        "blocks.3.attn.gate_w": torch.randn(8, 12),  # does not end with .attn_gate_w
        "blocks.4.attn.attn_gate_w": torch.randn(4, 8),  # 32 elements: the lower bound, included
        "blocks.5.attn.attn_gate_w": torch.randn(64, 128),  # 8,192 elements: the upper bound, included
        "blocks.6.attn.attn_gate_w": torch.randn(1, 31),  # 31 elements: excluded
    }


def test_pr1855_rules_per_class_clips_int7_embedding_and_gate():
    state = pr1855_like_state()
    plans = {p.name: p for p in plan_tensors(state, pr1855_quant(), param_role)}
    assert (plans["tok_emb.weight"].scheme, plans["tok_emb.weight"].clip_sigmas) == ("int7", 14.0)
    assert (plans["blocks.0.attn.c_q.weight"].scheme, plans["blocks.0.attn.c_q.weight"].clip_sigmas) == ("int6", 13.0)
    assert plans["blocks.0.mlp.fc.weight"].clip_sigmas == plans["blocks.0.mlp.proj.weight"].clip_sigmas == 11.5
    assert plans["blocks.0.lane.weight"].clip_sigmas == 12.85 and plans["blocks.0.lane.weight"].rule.name == "matrix"
    gate = plans["blocks.0.attn.attn_gate_w"]
    assert (gate.scheme, gate.bits, gate.rule.method) == ("int8", 8, "int8-row")
    for name in ("blocks.1.attn.attn_gate_w", "blocks.2.attn.attn_gate_w", "blocks.3.attn.gate_w", "blocks.6.attn.attn_gate_w"):
        assert plans[name].scheme == "fp16", name
    assert plans["blocks.4.attn.attn_gate_w"].scheme == plans["blocks.5.attn.attn_gate_w"].scheme == "int8"
    assert plans["smear_gate.weight"].scheme == plans["smear_lambda"].scheme == "fp16"
    # step in σ units (SPEC-1855 §4.2): MLP 11.5/31 = 0.371σ, attention 0.419σ, embedding 14/63 = 0.222σ
    assert [round(plans[n].clip_sigmas / (2 ** (plans[n].bits - 1) - 1), 3) for n in (
        "blocks.0.mlp.fc.weight", "blocks.0.attn.c_q.weight", "tok_emb.weight")] == [0.371, 0.419, 0.222]
    from_preset = {p.name: (p.scheme, p.clip_sigmas) for p in plan_tensors(state, preset("pr1855").quant, param_role)}
    assert from_preset == {n: (p.scheme, p.clip_sigmas) for n, p in plans.items()}  # the pr1855 preset's table
    # without the switch the gate is an fp16 passthrough like the other small tensors
    off = {p.name: p for p in plan_tensors(state, QuantConfig(passthrough="size"), param_role)}
    assert off["blocks.0.attn.attn_gate_w"].scheme == "fp16"


def test_gate_int8_per_head_scale():
    """SPEC-1855 §4.3: s_h = fp16(max|W_h| / 127), q = clamp(round(W / s), -127, 127) per head (row)."""
    state = pr1855_like_state()
    out = quantize_state_dict(state, {}, QuantConfig(**{**pr1855_quant().__dict__, "method": "rtn"}), param_role)
    W = state["blocks.0.attn.attn_gate_w"]
    qt = out["blocks.0.attn.attn_gate_w"]
    back, _ = decode_artifact(encode_artifact(out, "pergroup")[0])  # the per-group container keeps it
    assert torch.equal(back["blocks.0.attn.attn_gate_w"].data, qt.data)
    assert torch.equal(back["blocks.0.attn.attn_gate_w"].scale, qt.scale)
    expected_s = (W.abs().amax(dim=1) / 127).to(torch.float16)
    assert qt.scale.dtype == torch.float16 and torch.equal(qt.scale, expected_s)
    assert torch.equal(qt.data, torch.clamp(torch.round(W / expected_s.float()[:, None]), -127, 127).to(torch.int8))
    assert int(qt.data.abs().max()) == 127
    assert (dequantize(qt.data, qt.scale) - W).abs().max() <= expected_s.float().max() / 2 + 1e-6


def test_clip_step_mode_follows_the_width():
    """clip_mode=step keeps the tuned step k/R: 20σ at int8 (0.157σ) is 4.88σ at int6; 12.85σ at int6 is
    12.85·7/31 at int4; the sigma mode (default) leaves k as given."""
    state = {"tok_emb.weight": torch.randn(64, 32), "blocks.0.attn.c_q.weight": torch.randn(32, 32)}
    q = QuantConfig(embed_bits=6, matrix_bits=4, clip_mode="step")
    plans = {p.name: p for p in plan_tensors(state, q, param_role)}
    assert plans["tok_emb.weight"].clip_sigmas == pytest.approx(20.0 * 31 / 127)
    assert plans["blocks.0.attn.c_q.weight"].clip_sigmas == pytest.approx(12.85 * 7 / 31)
    same = {p.name: p for p in plan_tensors(state, QuantConfig(clip_mode="step"), param_role)}
    assert same["tok_emb.weight"].clip_sigmas == 20.0 and same["blocks.0.attn.c_q.weight"].clip_sigmas == 12.85
    sigma = {p.name: p for p in plan_tensors(state, QuantConfig(embed_bits=6), param_role)}
    assert sigma["tok_emb.weight"].clip_sigmas == 20.0


def test_clip_search_picks_the_smallest_hessian_weighted_error():
    state, hessians = smoke_state_and_hessians()
    q = QuantConfig(method="rtn", embed_bits=6, clip_mode="search")
    out = quantize_state_dict(state, hessians, q, param_role)
    name = "tok_emb.weight"
    W, H = state[name].float(), hessians[name]
    base_k = 20.0 * 31 / 127  # search starts from the width-scaled k
    errors = {}
    for f in CLIP_SEARCH_FACTORS:
        S = sdclip_scales(W, 6, base_k * f)
        errors[base_k * f] = quant_error(W, dequantize(rtn_quantize(W, S, 6), S), H)
    best = min(errors, key=errors.get)
    assert out[name].clip_sigmas == pytest.approx(best)
    assert quant_error(W, dequantize(out[name].data, out[name].scale), H) == pytest.approx(errors[best], rel=1e-6)
    assert errors[best] < errors[base_k]  # the int6 embedding wants a tighter clip than 4.9σ here


def test_bad_rule_fields_are_one_line_errors():
    state = {"tok_emb.weight": torch.randn(8, 8)}
    for kw, match in (
        ({"clip_mode": "auto"}, "quant.clip_mode='auto'"),
        ({"head_bits": 9}, "quant.head_bits=9"),
        ({"mlp_clip_sigmas": -1.0}, "quant.mlp_clip_sigmas=-1.0"),
        ({"lqer_rank": 0}, "quant.lqer_rank=0"),
    ):
        with pytest.raises(ValueError, match=match):
            plan_tensors(state, QuantConfig(**kw), param_role)
    assert [r.name for r in rules_from_config(QuantConfig())][:3] == ["non-float", "passthrough: control", "passthrough: not 2-D"]


def test_quantize_explain_prints_each_tensor_rule(tmp_path, capsys):
    cfg = preset("smoke")
    cfg.quant.attn_clip_sigmas, cfg.quant.embed_bits = 13.0, 7
    atomic_write_text(tmp_path / "config.toml", to_toml(cfg))
    rc = pgolf_main(["quantize", str(tmp_path), "--explain", "--set", "quant.clip_mode=step"])
    assert rc == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "attention" in lines["blocks.0.attn.c_q.weight"] and "13" in lines["blocks.0.attn.c_q.weight"]
    emb = lines["tok_emb.weight"].split()
    assert "embedding" in emb and "7" in emb and f"{20.0 * 63 / 127:.4g}" in emb  # int7, step-scaled k
    assert "passthrough:" in lines["blocks.0.attn_scale"]
    assert not (tmp_path / "model.ptz").exists()  # --explain quantizes nothing


def test_record_env_vars_set_the_rule_fields():
    from pgolf.config.env import apply_env

    cfg = preset("pr1394")
    env = {"ATTN_CLIP_SIGMAS": "13.0", "MLP_CLIP_SIGMAS": "11.5", "GATED_ATTN_QUANT_GATE": "1", "LQER_TOP_K": "3",
           "LQER_RANK": "4", "LQER_ASYM_GROUP": "64"}
    assert sorted(apply_env(cfg, env)) == sorted(env)
    q = cfg.quant
    assert (q.attn_clip_sigmas, q.mlp_clip_sigmas, q.gate_int8, q.lqer_top_k, q.lqer_rank, q.lqer_group) == (
        13.0, 11.5, True, 3, 4, 64)


def test_pr1855_model_plan():
    """On the real pr1855 model: the 11 sparse gates (8 heads x window 12 = 96 elements) int8 per row, the
    SmearGate fp16, the per-class clips and the int7 embedding, LQER candidates among the GPTQ'd tensors."""
    cfg = preset("pr1855")
    with torch.device("meta"):
        state = GPT(cfg.model).state_dict()
    plans = {p.name: p for p in plan_tensors(state, cfg.quant, param_role)}
    gates = [n for n in plans if n.endswith(".attn_gate_w")]
    assert len(gates) == 11 and all(plans[n].rule.method == "int8-row" and plans[n].bits == 8 for n in gates)
    assert tuple(state[gates[0]].shape) == (8, 12)
    assert all(plans[n].scheme == "fp16" for n in plans if "smear" in n)
    assert (plans["tok_emb.weight"].bits, plans["tok_emb.weight"].clip_sigmas) == (7, 14.0)
    ks = {n.split(".", 2)[2]: p.clip_sigmas for n, p in plans.items() if n.startswith("blocks.0.") and p.scheme == "int6"}
    assert ks == {"attn.c_q.weight": 13.0, "attn.c_k.weight": 13.0, "attn.c_v.weight": 13.0, "attn.proj.weight": 13.0,
                  "mlp.fc.weight": 11.5, "mlp.proj.weight": 11.5}
    assert sum(p.rule.lqer for p in plans.values() if p.scheme.startswith("int") and p.rule.method == "gptq") == 67


def test_embed_method_rounds_the_embedding_and_keeps_gptq_on_the_matrices():
    """quant.embed_method=rtn: the tied embedding's codes are an all-RTN quantization's, every matrix's codes
    an all-GPTQ one's (the two methods differ on both, so a swap or a shared method would fail)."""
    state, hessians = smoke_state_and_hessians()
    q = vars(preset("cpu-golf").quant)
    mixed = quantize_state_dict(state, hessians, QuantConfig(**{**q, "embed_method": "rtn"}), param_role)
    gptq = quantize_state_dict(state, hessians, QuantConfig(**{**q, "embed_method": "gptq"}), param_role)
    rtn = quantize_state_dict(state, hessians, QuantConfig(**{**q, "method": "rtn", "embed_method": ""}), param_role)
    classes = {qt.cls for qt in mixed.values() if qt.scheme.startswith("int")}
    assert classes == {"embed", "matrix"}
    for n, qt in mixed.items():
        if not qt.scheme.startswith("int"):
            continue
        ref, other = (rtn, gptq) if qt.cls == "embed" else (gptq, rtn)
        assert torch.equal(qt.data, ref[n].data), n
        assert not torch.equal(qt.data, other[n].data), n
    rules = {r.name: r.method for r in rules_from_config(QuantConfig(embed_method="rtn"))}
    assert (rules["embedding"], rules["head"], rules["attention"], rules["mlp"]) == ("rtn", "rtn", "gptq", "gptq")
