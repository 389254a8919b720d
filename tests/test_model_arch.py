"""pgolf.model architecture: no dead config switch, causality of every preset's architecture, the lane
forms against a hand-written reference, and XSA's orthogonality."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from test_model import ids_for, randomize_, tiny

from pgolf.config import ModelConfig, preset
from pgolf.model import GPT
from pgolf.model.attention import AttnInputs, CausalSelfAttention, rope_tables

# (field, alternative value) pairs that must change the logits of identically-valued models.
FORWARD_SWITCHES = [
    ("mlp_activation", "relu2"),
    ("tie_embeddings", False),
    ("logit_softcap", 0.0),
    ("logit_softcap", 3.0),
    ("rope_base", 50.0),
    ("rope_dims", 0),
    ("rope_dims", 8),
    ("qk_norm", False),
    ("ln_scale", False),
    ("xsa_last_n", 0),
    ("xsa_last_n", 1),
    ("resid_mix", False),
    ("unet_skips", False),
    ("skip_gates", False),
    ("num_loops", 0),
    ("num_loops", 2),
    ("loop_start", 0),
    ("loop_end", 3),
    ("parallel_mode", "none"),
    ("parallel_mode", "gptj"),
    ("parallel_mode", "lanes1529"),
    ("parallel_start", 1),
    ("parallel_start", 3),
    ("parallel_final_lane", "mean"),
    ("parallel_final_lane", "attn"),
    ("rope_ntk_len", 8),  # rows of 12 > 8: rescaled base
    ("smear_gate", True),
    ("sparse_attn_gate", True),
]
# Switches that act only when another one is on: (base overrides, field, alternative value).
OTHER_MODE_SWITCHES = [
    ({"parallel_mode": "gptj"}, "parallel_start", 3),
    ({"parallel_mode": "lanes1529"}, "parallel_final_lane", "mean"),
    ({"parallel_mode": "lanes1529"}, "parallel_start", 3),
    ({"skip_gates": False}, "unet_skips", False),
    ({"sparse_attn_gate": True}, "sparse_attn_gate_scale", 0.5),
    ({"sparse_attn_gate": True}, "gate_window", 4),
    ({"smear_gate": True}, "gate_window", 4),
]
SHAPE_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult")
INIT_FIELDS = ("tied_embed_init_std", "qk_gain_init")  # values at init only (checked in test_model.py)
NOT_FORWARD = ("enable_looping_at", "attention_backend")  # the trainer's clock; same math either way
# doc_attention acts only on rows holding a BOS (test_model_pr1855.py); fused_ce only on the training loss
# (test_model_loss.py).
ELSEWHERE = ("doc_attention", "fused_ce")


def logits_of(cfg: ModelConfig, ids: torch.Tensor, looping: bool = True) -> torch.Tensor:
    model = randomize_(GPT(cfg))
    model.set_looping(looping)
    with torch.no_grad():
        return model(ids)


def test_every_model_field_is_covered() -> None:
    covered = {f for f, _ in FORWARD_SWITCHES} | set(SHAPE_FIELDS) | set(INIT_FIELDS) | set(NOT_FORWARD)
    covered |= set(ELSEWHERE) | {f for _, f, _ in OTHER_MODE_SWITCHES}
    assert covered == {f.name for f in dataclasses.fields(ModelConfig)}


@pytest.mark.parametrize("field,value", FORWARD_SWITCHES)
def test_switch_changes_logits(field: str, value) -> None:
    base = tiny()
    ids = ids_for(base)
    changed = dataclasses.replace(base, **{field: value})
    assert getattr(changed, field) != getattr(base, field)
    diff = (logits_of(base, ids) - logits_of(changed, ids)).abs().max().item()
    assert diff > 1e-3, f"model.{field}={value!r} does not change the logits"


@pytest.mark.parametrize("base,field,value", OTHER_MODE_SWITCHES)
def test_switch_changes_logits_in_other_modes(base: dict, field: str, value) -> None:
    cfg = tiny(**base)
    ids = ids_for(cfg)
    diff = (logits_of(cfg, ids) - logits_of(dataclasses.replace(cfg, **{field: value}), ids)).abs().max()
    assert diff > 1e-3


def test_shape_fields_change_the_model() -> None:
    base = GPT(tiny()).num_params()
    for field, value in [("vocab_size", 80), ("num_layers", 5), ("model_dim", 48), ("num_heads", 2),
                         ("num_kv_heads", 4), ("mlp_mult", 2.0)]:  # fmt: skip
        assert GPT(tiny(**{field: value})).num_params() != base, field


def test_looping_changes_logits_and_attention_backend_does_not() -> None:
    cfg = tiny()
    ids = ids_for(cfg)
    assert (logits_of(cfg, ids, True) - logits_of(cfg, ids, False)).abs().max() > 1e-3
    sdpa = logits_of(dataclasses.replace(cfg, attention_backend="sdpa"), ids)
    assert torch.equal(sdpa, logits_of(cfg, ids))  # auto on CPU is SDPA


# ----------------------------------------------------------------------------- causality


def shrunk(name: str, **overrides) -> ModelConfig:
    """A preset's architecture at tiny widths: head_dim 8, vocab 64, same depth/loops/lanes/switches."""
    cfg = preset(name).model
    cfg = dataclasses.replace(
        cfg, vocab_size=64, model_dim=8 * cfg.num_heads, rope_dims=4 if cfg.rope_dims else 0, mlp_mult=2.0
    )
    return dataclasses.replace(cfg, **overrides)


CAUSAL_ARCHS = [
    ("pr1394", {}),
    ("pr1541", {}),
    ("pr1557", {}),
    ("baseline", {}),
    ("cpu-golf", {}),
    ("smoke", {}),
    ("pr1541", {"parallel_mode": "gptj"}),
    ("cpu-golf", {"parallel_mode": "lanes1529", "parallel_final_lane": "mean"}),
    ("smoke", {"parallel_mode": "lanes1529"}),
    # #1855's switches (SPEC-1855 §1): lanes from 8 of 11, smear, sparse gate, per-document attention
    ("pr1557", {"num_loops": 2, "parallel_start": 8, "smear_gate": True, "sparse_attn_gate": True,
                "doc_attention": True, "rope_ntk_len": 0}),
]


@pytest.mark.parametrize("name,overrides", CAUSAL_ARCHS)
@pytest.mark.parametrize("looping", [False, True])
def test_causality(name: str, overrides: dict, looping: bool) -> None:
    cfg = shrunk(name, **overrides)
    model = randomize_(GPT(cfg))
    model.set_looping(looping)
    ids = ids_for(cfg, batch=1, seq=10)
    t = 6
    changed = ids.clone()
    changed[0, t] = (ids[0, t] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-5, rtol=0), "a later token changed earlier logits"
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-3


@pytest.mark.parametrize("name,overrides", CAUSAL_ARCHS)
@pytest.mark.parametrize("looping", [False, True])
def test_tail_forward_equals_the_tail_of_the_full_forward(name: str, overrides: dict, looping: bool) -> None:
    """hidden(ids, first) runs the last layer on positions first.. only: same numbers as the full pass."""
    cfg = shrunk(name, **overrides)
    model = randomize_(GPT(cfg))
    model.set_looping(looping)
    ids = ids_for(cfg, batch=2, seq=10)
    with torch.no_grad():
        full = model.hidden(ids)
        for first in (1, 6, 9):
            tail = model.hidden(ids, first)
            assert tail.shape == (2, 10 - first, cfg.model_dim)
            assert torch.allclose(tail, full[:, first:], atol=1e-5, rtol=1e-5), first
    with pytest.raises(ValueError, match="first=10"):
        model.hidden(ids, 10)


# ----------------------------------------------------------------------------- hand-written reference


def rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def ref_attention(attn: CausalSelfAttention, x: torch.Tensor, rot: int, base: float) -> torch.Tensor:
    """Naive per-head loops: QK-norm, half-split partial RoPE, q_gain, masked softmax, XSA, proj."""
    bsz, seq, _ = x.shape
    nh, nkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = (x @ attn.c_q.weight.t()).view(bsz, seq, nh, hd)
    k = (x @ attn.c_k.weight.t()).view(bsz, seq, nkv, hd)
    v = (x @ attn.c_v.weight.t()).view(bsz, seq, nkv, hd)
    q, k = rms(q), rms(k)

    def rotate(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        for pos in range(seq):
            for i in range(rot // 2):
                angle = pos * base ** (-2 * i / rot)
                a, b = t[:, pos, :, i], t[:, pos, :, i + rot // 2]
                out[:, pos, :, i] = a * math.cos(angle) + b * math.sin(angle)
                out[:, pos, :, i + rot // 2] = -a * math.sin(angle) + b * math.cos(angle)
        return out

    q, k = rotate(q), rotate(k)
    heads = []
    for h in range(nh):
        g = h // (nh // nkv)
        scores = q[:, :, h] * attn.q_gain[h] @ k[:, :, g].transpose(1, 2) / math.sqrt(hd)
        mask = torch.ones(seq, seq, dtype=torch.bool).tril()
        y = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v[:, :, g]
        if attn.use_xsa:
            vn = v[:, :, g] / v[:, :, g].norm(dim=-1, keepdim=True)
            y = y - (y * vn).sum(-1, keepdim=True) * vn
        heads.append(y)
    return torch.cat(heads, dim=-1) @ attn.proj.weight.t()


def ref_forward(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """4 layers, no loops, parallel from layer 2: enc [0, 1], dec [2 (skip h1), 3 (skip h0)]."""
    cfg = model.cfg
    rot, base = cfg.rope_dims, cfg.rope_base
    x0 = rms(model.tok_emb.weight[ids])

    def branch_in(blk, x):  # RMSNorm(x)·s_l
        return rms(x) * blk.ln_scale

    def attn(i, x):
        blk = model.blocks[i]
        return blk.attn_scale * ref_attention(blk.attn, branch_in(blk, x), rot, base)

    def mlp(i, x):
        blk = model.blocks[i]
        return blk.mlp_scale * (
            F.leaky_relu(branch_in(blk, x) @ blk.mlp.fc.weight.t(), 0.5) ** 2 @ blk.mlp.proj.weight.t()
        )

    def mix(i, x):
        m = model.blocks[i].resid_mix
        return m[0] * x + m[1] * x0

    def sequential(i, x):
        x = mix(i, x)
        x = x + attn(i, x)
        return x + mlp(i, x)

    def merge(j, x, skip):
        g = torch.sigmoid(model.skip_gates[j])
        return g * x + (1 - g) * model.skip_weights[j] * skip

    h0 = sequential(0, x0)
    h1 = sequential(1, h0)
    mode = cfg.parallel_mode
    if mode == "none":
        out = sequential(3, merge(1, sequential(2, merge(0, h1, h1)), h0))
    elif mode == "gptj":

        def gptj(i, x):
            x = mix(i, x)
            return x + attn(i, x) + mlp(i, x)

        out = gptj(3, merge(1, gptj(2, merge(0, h1, h1)), h0))
    else:
        lane0 = lane1 = merge(0, h1, h1)
        for j, i in ((0, 2), (1, 3)):
            if j == 1:
                lane0 = merge(1, lane0, h0)
                if mode == "lanes1541":
                    lane1 = merge(1, lane1, h0)
            P, r = model.par_post[i], model.par_resid[i]
            a = attn(i, mix(i, lane0))
            if mode == "lanes1541":
                f = mlp(i, mix(i, lane1))
                lane0, lane1 = (
                    r[1] * (r[0] * lane0 + P[0, 0] * a) + P[1, 0] * f,
                    r[1] * (r[0] * lane1 + P[0, 1] * a) + P[1, 1] * f,
                )
            else:
                f = mlp(i, lane1)
                lane0, lane1 = (
                    r[0] * lane0 + P[0, 0] * a + P[1, 0] * f,
                    r[1] * lane1 + P[0, 1] * a + P[1, 1] * f,
                )
        out = {"mlp": lane1, "attn": lane0, "mean": (lane0 + lane1) / 2}[cfg.parallel_final_lane]
    logits = rms(out) @ model.tok_emb.weight.t()
    return cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)


@pytest.mark.parametrize(
    "mode,final",
    [("lanes1541", "mlp"), ("lanes1529", "mean"), ("lanes1529", "attn"), ("gptj", "mlp"), ("none", "mlp")],
)
def test_parallel_forms_match_hand_written_reference(mode: str, final: str) -> None:
    cfg = tiny(num_loops=0, parallel_mode=mode, parallel_final_lane=final, xsa_last_n=2, qk_gain_init=2.0)
    model = randomize_(GPT(cfg))
    ids = ids_for(cfg, seq=6)
    with torch.no_grad():
        got, ref = model(ids), ref_forward(model, ids)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


# ----------------------------------------------------------------------------- XSA


@pytest.mark.parametrize("use_xsa", [True, False])
def test_xsa_output_is_orthogonal_to_own_value(use_xsa: bool) -> None:
    cfg = tiny()
    attn = CausalSelfAttention(cfg, use_xsa=use_xsa)
    torch.manual_seed(0)
    with torch.no_grad():
        for lin in (attn.c_q, attn.c_k, attn.c_v):
            lin.weight.normal_()
        attn.proj.weight.copy_(torch.eye(cfg.model_dim))  # read the per-head outputs directly
        x = torch.randn(2, 9, cfg.model_dim)
        ctx = AttnInputs(*rope_tables(9, cfg.rope_dims, cfg.rope_base, x.device, 2048), backend="sdpa")
        y = attn(x, ctx).view(2, 9, 4, 8)
        v = attn.c_v(x).view(2, 9, 2, 8)
    v_dir = F.normalize(v.repeat_interleave(2, dim=2), dim=-1)  # heads 0,1 -> KV head 0; 2,3 -> 1
    along_own_value = (y * v_dir).sum(-1)
    if use_xsa:
        assert along_own_value.abs().max() < 1e-5 * y.abs().max()
        assert y[:, 1:].norm(dim=-1).mean() > 1.0  # not trivially zero (position 0 sees only itself)
    else:
        assert along_own_value[:, 1:].abs().mean() > 0.1 * y.norm(dim=-1).mean()
