"""pgolf.model switches of #1855 (SPEC-1855 §1): SmearGate with the BOS fix, the sparse attention output
gate, per-document attention (SPEC-1855 part B §2), the RoPE NTK threshold, and the pr1855 shape."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_model import fake_flash, randomize_, tiny
from test_model_arch import shrunk

import pgolf.model.backend as backend
from pgolf.config import ModelConfig, preset
from pgolf.model import GPT, param_role
from pgolf.model.attention import AttnInputs, CausalSelfAttention, rope_tables
from pgolf.model.layers import BOS_ID, smear

# The model fields of the pr1855 preset (SPEC-1855 §1.1, run values); every other field is the default.
PR1855_MODEL = dict(
    qk_gain_init=5.0,
    num_loops=2,
    loop_start=3,
    loop_end=5,
    enable_looping_at=0.35,
    parallel_mode="lanes1529",  # SPEC-1855 §1.2 step 5 is #1529's lane form
    parallel_start=8,
    parallel_final_lane="mean",
    smear_gate=True,
    sparse_attn_gate=True,
    sparse_attn_gate_scale=0.5,
    gate_window=12,
    rope_ntk_len=0,  # ROPE_YARN=0
    doc_attention=True,
    fused_ce=True,
)


def test_pr1855_shape_has_the_logged_parameter_count() -> None:
    with torch.device("meta"):
        model = GPT(ModelConfig(**PR1855_MODEL))
    assert model.num_params() == 35_945_671  # log `model_params:35945671`, SPEC-1855 §1.6
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["smear_gate"] == (12,) and shapes["smear_lambda"] == (1,)
    assert shapes["blocks.10.attn.attn_gate_w"] == (8, 12)
    assert sum(p.numel() for n, p in model.named_parameters() if n.endswith("attn_gate_w")) == 1_056
    new = [n for n in shapes if "smear" in n or "attn_gate_w" in n]
    assert len(new) == 13 and all(param_role(n, model.get_parameter(n)) == "control" for n in new)
    for name in ("pr1394", "pr1541", "pr1557"):  # the switches stay off in the older record presets
        cfg = preset(name).model
        assert not (cfg.smear_gate or cfg.sparse_attn_gate or cfg.doc_attention or cfg.fused_ce), name


def test_new_gates_start_as_identity_smear_and_half_open_attention() -> None:
    cfg = tiny(smear_gate=True, sparse_attn_gate=True, sparse_attn_gate_scale=0.5)
    model = GPT(cfg)
    assert not model.smear_gate.any() and not model.smear_lambda.any()
    assert all(not b.attn.attn_gate_w.any() for b in model.blocks)
    # at init: smear = identity, every attention gate = σ(0) = 0.5
    attn = CausalSelfAttention(tiny(sparse_attn_gate=True), use_xsa=True)
    plain = CausalSelfAttention(tiny(), use_xsa=True)
    plain.load_state_dict({k: v for k, v in attn.state_dict().items() if k != "attn_gate_w"})
    with torch.no_grad():
        for lin in (attn.c_q, attn.c_k, attn.c_v):
            lin.weight.normal_()
        attn.proj.weight.copy_(torch.eye(32))
        plain.load_state_dict({k: v for k, v in attn.state_dict().items() if k != "attn_gate_w"})
        x = torch.randn(2, 9, 32)
        ctx = AttnInputs(*rope_tables(9, 4, 10000.0, x.device, 2048), backend="sdpa")
        assert torch.allclose(attn(x, ctx), 0.5 * plain(x, ctx), atol=1e-6)
        # trained gate: head h is scaled by σ(s·W_h·x[:12])
        attn.attn_gate_w.normal_()
        gate = torch.sigmoid(attn.gate_scale * x[..., :12] @ attn.attn_gate_w.t())  # [2, 9, 4]
        expected = (plain(x, ctx).view(2, 9, 4, 8) * gate[..., None]).view(2, 9, 32)
        assert torch.allclose(attn(x, ctx), expected, atol=1e-5)


def packed_stream(lengths: list[int], vocab: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """Documents [BOS] + ids (ids drawn from 2..vocab-1, so no stray BOS inside a document)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.cat((torch.tensor([BOS_ID]), torch.randint(2, vocab, (n - 1,), generator=gen))) for n in lengths]


def test_smear_never_crosses_a_bos() -> None:
    docs = packed_stream([5, 1, 7, 3])  # a one-token document too
    ids = torch.cat(docs)[None].repeat(2, 1)
    ids[1, 0] = 7  # row 1 starts mid-document: position 0 is still untouched
    gen = torch.Generator().manual_seed(1)
    e = torch.randn(2, ids.size(1), 32, generator=gen)
    w, lam = torch.randn(12, generator=gen), torch.tensor([0.8])
    out = smear(e, ids == BOS_ID, w, lam)
    is_bos = ids == BOS_ID
    assert torch.equal(out[is_bos], e[is_bos])  # a BOS output is its own embedding, bit for bit
    assert torch.equal(out[:, 0], e[:, 0])
    for b in range(2):
        for t in range(1, ids.size(1)):
            if not is_bos[b, t]:
                g = lam * torch.sigmoid(e[b, t, :12] @ w)
                assert torch.allclose(out[b, t], e[b, t] + g * e[b, t - 1], atol=1e-6), (b, t)


PACKED_ARCHS = [
    ("pr1557", dict(PR1855_MODEL, vocab_size=64, model_dim=64, rope_dims=4, mlp_mult=2.0, gate_window=12)),
    ("smoke", {"smear_gate": True, "doc_attention": True}),
    ("cpu-golf", {"doc_attention": True, "sparse_attn_gate": True, "parallel_mode": "gptj"}),
]


def packed_model(name: str, overrides: dict) -> GPT:
    cfg = shrunk(name, **overrides) if name != "pr1557" else ModelConfig(**overrides)
    model = randomize_(GPT(cfg))
    model.set_looping(True)
    return model


@pytest.mark.parametrize("name,overrides", PACKED_ARCHS)
def test_packed_row_equals_each_document_alone(name: str, overrides: dict) -> None:
    model = packed_model(name, overrides)
    docs = packed_stream([6, 1, 9, 4], vocab=model.cfg.vocab_size)
    row = torch.cat(docs)[None]
    with torch.no_grad():
        packed = model(row)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
        assert torch.allclose(packed, alone, atol=2e-5, rtol=1e-5), (packed - alone).abs().max()
        # eval's scored tail (last layer on positions 8.. only) and the bf16 training precision
        assert torch.allclose(model.tail_logits(row, 8)[0], alone[8:], atol=2e-5, rtol=1e-5)
        off = dataclasses.replace(model.cfg, doc_attention=False)
        leaky = randomize_(GPT(off))
        leaky.set_looping(True)
        assert (leaky(row)[0] - alone).abs().max() > 1e-3  # without the switch documents do see each other


def test_doc_attention_on_cpu_query_blocks_and_rows_without_bos(monkeypatch) -> None:
    """The CPU inference split into query blocks keeps the document mask; a row with no BOS is plain causal."""
    monkeypatch.setattr(backend, "CPU_QUERY_BLOCK", 4)
    model = packed_model(*PACKED_ARCHS[1])
    docs = packed_stream([7, 3, 9], vocab=model.cfg.vocab_size, seed=3)
    row = torch.cat(docs)[None]
    with torch.no_grad():
        alone = torch.cat([model(d[None])[0] for d in docs])
        assert torch.allclose(model(row)[0], alone, atol=2e-5, rtol=1e-5)
        no_bos = torch.randint(2, 64, (2, 11), generator=torch.Generator().manual_seed(4))
        plain = dataclasses.replace(model.cfg, doc_attention=False)
        ref = randomize_(GPT(plain))
        ref.set_looping(True)
        assert torch.allclose(model(no_bos), ref(no_bos), atol=1e-6)


def test_doc_attention_training_loss_and_grads_match_documents_alone() -> None:
    """Training (autograd, one SDPA call) sees the same document mask: loss over a packed row = the
    token-weighted mean of each document's own loss, and so are the gradients."""
    model = packed_model("smoke", {"smear_gate": True, "sparse_attn_gate": True, "doc_attention": True})
    docs = packed_stream([5, 8, 3], vocab=64, seed=5)
    row = torch.cat(docs)[None]
    tgt = torch.randint(0, 64, row.shape, generator=torch.Generator().manual_seed(6))
    params = list(model.parameters())
    packed = model(row, tgt)
    g_packed = torch.autograd.grad(packed, params, allow_unused=True)
    total, start = 0.0, 0
    for d in docs:
        total = total + model(d[None], tgt[:, start : start + d.numel()]) * d.numel()
        start += d.numel()
    alone = total / row.size(1)
    g_alone = torch.autograd.grad(alone, params, allow_unused=True)
    assert torch.allclose(packed, alone, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), g_packed, g_alone):
        if b is not None:
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


def fake_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """Stands in for FlashAttention's varlen kernel: each [cu[i], cu[i+1]) segment of the flattened tokens
    attends causally within itself."""
    assert causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    out = torch.empty_like(q)
    bounds = cu_q.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        assert b - a <= max_q
        out[a:b] = fake_flash(q[None, a:b], k[None, a:b], v[None, a:b], True)[0][0]
    return out


def test_flash_varlen_plumbing_matches_sdpa_mask(monkeypatch) -> None:
    monkeypatch.setattr(backend, "flash_attn_func", fake_flash)
    monkeypatch.setattr(backend, "flash_attn_varlen_func", fake_flash_varlen)
    model = packed_model(*PACKED_ARCHS[0])
    docs = packed_stream([6, 1, 9, 4], vocab=64)
    rows = torch.stack((torch.cat(docs), torch.cat(docs[::-1])))
    rows[1, 0] = 9  # row 1 starts mid-document: its first segment has no BOS
    with torch.no_grad():
        with backend.override_backend("sdpa"):
            expected = model(rows)
        with backend.override_backend("flash"):
            got = model(rows)
            tail = model.tail_logits(rows, 8)  # the scored tail takes the masked SDPA path
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-5)
    assert torch.allclose(tail, expected[:, 8:], atol=2e-5, rtol=1e-5)
    d = backend.Documents.from_ids(rows, BOS_ID, "flash")
    assert d.cu_seqlens.tolist() == [0, 6, 7, 16, 20, 24, 33, 34, 40] and d.max_len == 20


def test_rope_ntk_threshold_is_a_model_field() -> None:
    """The records rescale beyond their train_seq_len; #1394/#1541/#1557 ran 2048 = rope_ntk_len, so the
    record presets keep the record rule. 0 = never (#1855, ROPE_YARN=0)."""
    for name in ("pr1394", "pr1541", "pr1557"):
        cfg = preset(name)
        assert cfg.model.rope_ntk_len == cfg.data.train_seq_len == 2048, name
    cpu = torch.device("cpu")
    plain = rope_tables(1024, 16, 10000.0, cpu, 2048)
    assert torch.equal(rope_tables(1024, 16, 10000.0, cpu, 0)[0], plain[0])
    assert torch.equal(rope_tables(4096, 16, 10000.0, cpu, 0)[0][:1024], plain[0])  # never rescaled
    cos, _ = rope_tables(1024, 16, 10000.0, cpu, 512)
    base = 10000.0 * 2 ** (16 / 14)
    assert abs(cos[7, 3].item() - torch.cos(torch.tensor(7 * base ** (-6 / 16))).item()) < 1e-5


def test_record_presets_start_lanes_in_the_decoder() -> None:
    """pgolf merges lanes (parallel_final_lane) into the skip an encoder lane layer pushes, where the
    records would keep the pair and merge it lane-wise. No record preset reaches that case: their lane
    layers (physical >= parallel_start) sit in the decoder only, looped or not."""
    from pgolf.model import recurrence_indices

    for name in ("pr1541", "pr1557"):
        cfg = preset(name).model
        for looping in (False, True):
            encoder, _ = recurrence_indices(cfg, looping)
            assert max(encoder) < cfg.parallel_start, (name, looping)
    cfg = ModelConfig(**PR1855_MODEL)
    assert max(recurrence_indices(cfg, True)[0]) < cfg.parallel_start


def test_gate_window_is_checked() -> None:
    with pytest.raises(ValueError, match="model.gate_window=40"):
        GPT(tiny(smear_gate=True, gate_window=40))
    GPT(tiny(gate_window=40))  # unused while both gates are off


def test_smear_gradients_reach_gate_and_lambda() -> None:
    model = randomize_(GPT(tiny(smear_gate=True, sparse_attn_gate=True)))
    ids = torch.cat(packed_stream([5, 7]))[None]
    loss = model(ids, ids.roll(-1, 1))
    gw, gl, ga = torch.autograd.grad(loss, [model.smear_gate, model.smear_lambda, model.blocks[0].attn.attn_gate_w])
    assert gw.abs().sum() > 0 and gl.abs().sum() > 0 and ga.abs().sum() > 0
