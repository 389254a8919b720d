"""pgolf.model: shapes and parameter counts of the record runs, recurrence lists, init/precision, roles,
the fused softcap + cross-entropy loss, and the attention backend choice."""

from __future__ import annotations

import dataclasses
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

import pgolf.model.attention as attention
import pgolf.model.backend as backend
import pgolf.model.loss as loss_mod
from pgolf.config import ModelConfig, preset
from pgolf.model import GPT, num_skip_connections, param_role, recurrence_indices


def tiny(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=64,
        num_layers=4,
        model_dim=32,
        num_heads=4,
        num_kv_heads=2,
        rope_dims=4,
        xsa_last_n=4,
        num_loops=1,
        loop_start=1,
        loop_end=2,
        parallel_mode="lanes1541",
        parallel_start=2,
    )
    base.update(overrides)
    return ModelConfig(**base)


@torch.no_grad()
def randomize_(model: GPT, seed: int = 0) -> GPT:
    """Trained-looking fp32 weights: every parameter (zero-init ones too) gets values drawn from a
    generator seeded by its name, so two models share the values of the parameters they share."""
    model.float()
    for name, p in model.named_parameters():
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        noise = torch.randn(p.shape, generator=gen)
        role = param_role(name, p)
        if role in ("matrix", "head"):
            p.copy_(noise / p.shape[-1] ** 0.5)
        elif role == "embed":
            p.copy_(noise)
        else:
            p.add_(0.3 * noise)
    return model


def ids_for(cfg: ModelConfig, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- record shapes


@pytest.mark.parametrize(
    "name,count", [("pr1394", 35_943_512), ("pr1541", 35_944_602), ("pr1557", 35_946_650)]
)
def test_param_counts_equal_logged_record_runs(name: str, count: int) -> None:
    with torch.device("meta"):
        model = GPT(preset(name).model)
    assert model.num_params() == count


def test_recurrence_indices_of_the_presets() -> None:
    expected = {
        "pr1541": ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10]),
        "pr1394": ([0, 1, 2, 3, 4, 5, 4], [5, 4, 5, 6, 7, 8, 9, 10]),
        "pr1557": ([0, 1, 2, 3, 4, 5, 3, 4, 5, 3], [4, 5, 3, 4, 5, 6, 7, 8, 9, 10]),
    }
    for name, lists in expected.items():
        cfg = preset(name).model
        assert recurrence_indices(cfg, True) == lists
        assert recurrence_indices(cfg, False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
        assert num_skip_connections(cfg) == min(len(lists[0]), len(lists[1]))
    baseline = preset("baseline").model  # no loops: both states are the plain 9-layer U-Net
    assert recurrence_indices(baseline, True) == recurrence_indices(baseline, False)
    assert recurrence_indices(baseline, False) == ([0, 1, 2, 3], [4, 5, 6, 7, 8])


def test_recurrence_rejects_bad_loop_range() -> None:
    with pytest.raises(ValueError, match="loop_end"):
        recurrence_indices(tiny(loop_start=1, loop_end=4), True)


def test_skip_params_sized_for_looped_graph_and_absent_when_off() -> None:
    model = GPT(tiny())  # looped list [0,1,2,1,2,3]: S = 3 (plain S would be 2)
    assert tuple(model.skip_weights.shape) == (3, 32) and tuple(model.skip_gates.shape) == (3, 32)
    names = {n for n, _ in GPT(tiny(skip_gates=False)).named_parameters()}
    assert "skip_weights" in names and "skip_gates" not in names
    names = {n for n, _ in GPT(tiny(unet_skips=False, parallel_mode="gptj")).named_parameters()}
    assert not names & {"skip_weights", "skip_gates", "par_post", "par_resid"}


def test_bad_config_values_are_named() -> None:
    with pytest.raises(ValueError, match="model.parallel_mode"):
        GPT(tiny(parallel_mode="lanes"))
    with pytest.raises(ValueError, match="model.num_heads"):
        GPT(tiny(num_kv_heads=3))
    with pytest.raises(ValueError, match="model.rope_dims"):
        GPT(tiny(rope_dims=10))


# ----------------------------------------------------------------------------- init and precision


def test_init_and_precision() -> None:
    torch.manual_seed(0)
    cfg = tiny(model_dim=128, num_heads=2, num_kv_heads=1, rope_dims=16, vocab_size=512, qk_gain_init=5.25)
    model = GPT(cfg)
    emb = model.tok_emb.weight
    assert emb.dtype == torch.bfloat16
    assert abs(emb.float().std().item() - cfg.tied_embed_init_std) < 0.0005
    for name, p in model.named_parameters():
        if name != "tok_emb.weight":
            assert p.dtype == torch.float32, name
            assert torch.equal(p, p.bfloat16().float()), f"{name} is not bf16-rounded"
    block = model.blocks[0]
    assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()
    for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.mlp.fc.weight):  # orthogonal
        small = w if w.shape[0] <= w.shape[1] else w.t()
        gram = small @ small.t()
        assert torch.allclose(gram, torch.eye(gram.shape[0]), atol=2e-2)
    assert torch.equal(block.attn.q_gain, torch.full((2,), 5.25))
    assert torch.equal(block.resid_mix, torch.stack((torch.ones(128), torch.zeros(128))))
    assert torch.equal(model.skip_weights, torch.ones_like(model.skip_weights))
    assert not model.skip_gates.any() and torch.equal(model.par_post, torch.ones(4, 2, 2))
    assert torch.allclose(model.par_resid, torch.full((4, 2), 1.1**0.5), atol=4e-3)
    assert torch.allclose(
        GPT(dataclasses.replace(cfg, parallel_mode="lanes1529")).par_resid, torch.tensor(1.1), atol=4e-3
    )
    untied = GPT(dataclasses.replace(cfg, tie_embeddings=False))
    assert not untied.lm_head.weight.any()


def test_meta_build_then_materialize() -> None:
    with torch.device("meta"):
        model = GPT(tiny())
    assert model.tok_emb.weight.is_meta and model.tok_emb.weight.dtype == torch.bfloat16
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.equal(model.skip_weights, torch.ones_like(model.skip_weights))
    loss = model(ids_for(model.cfg), ids_for(model.cfg, seed=1))
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.1  # near-uniform at init


def test_param_roles() -> None:
    with torch.device("meta"):
        model = GPT(preset("pr1541").model)
    roles = {name: param_role(name, p) for name, p in model.named_parameters()}
    assert roles["tok_emb.weight"] == "embed"
    assert sum(r == "matrix" for r in roles.values()) == 66
    assert roles["blocks.3.attn.c_k.weight"] == roles["blocks.10.mlp.proj.weight"] == "matrix"
    for name in ("blocks.0.resid_mix", "blocks.0.attn.q_gain", "skip_gates", "par_post", "par_resid"):
        assert roles[name] == "control"
    assert param_role("_orig_mod.module.blocks.0.mlp.fc.weight", model.blocks[0].mlp.fc.weight) == "matrix"
    untied = GPT(tiny(tie_embeddings=False))
    assert param_role("lm_head.weight", untied.lm_head.weight) == "head"


# ----------------------------------------------------------------------------- loss


def test_fused_head_loss_matches_plain_formula_over_many_chunks(monkeypatch) -> None:
    monkeypatch.setattr(loss_mod, "CPU_CHUNK_ELEMENTS", 3 * 50)  # 3 rows per chunk, ragged last chunk
    gen = torch.Generator().manual_seed(0)
    for softcap in (30.0, 2.0, 0.0):
        h = (3 * torch.randn(20, 16, generator=gen)).requires_grad_()
        w = torch.randn(50, 16, generator=gen).requires_grad_()
        tgt = torch.randint(0, 50, (20,), generator=gen)
        fused = loss_mod.fused_head_loss(h, w, tgt, softcap)
        gh, gw = torch.autograd.grad(2.5 * fused, (h, w))
        z = h @ w.t()
        plain = F.cross_entropy(softcap * torch.tanh(z / softcap) if softcap else z, tgt)
        ph, pw = torch.autograd.grad(2.5 * plain, (h, w))
        assert torch.allclose(fused, plain, atol=1e-5)
        assert torch.allclose(gh, ph, atol=1e-5) and torch.allclose(gw, pw, atol=1e-5)
        nll = loss_mod.head_nll(h, w, tgt, softcap)
        assert nll.shape == (20,) and torch.allclose(nll.mean(), plain, atol=1e-5)
        with torch.no_grad():
            assert torch.allclose(loss_mod.fused_head_loss(h, w, tgt, softcap), plain, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"logit_softcap": 0.0}])
def test_model_loss_equals_cross_entropy_of_softcapped_logits(overrides) -> None:
    cfg = tiny(**overrides)
    model = randomize_(GPT(cfg))
    model.set_looping(True)
    ids, tgt = ids_for(cfg), ids_for(cfg, seed=1)
    params = [p for p in model.parameters()]
    loss = model(ids, tgt)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    logits = model(ids)
    assert logits.dtype == torch.float32 and logits.shape == (2, 12, 64)
    if cfg.logit_softcap:
        assert logits.abs().max() < cfg.logit_softcap
    ref = F.cross_entropy(logits.view(-1, 64), tgt.view(-1))
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    assert loss.dtype == torch.float32 and torch.allclose(loss, ref, atol=1e-5)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        if r is None:
            assert g is None or not g.any(), name
        else:
            assert torch.allclose(g, r, atol=1e-5, rtol=1e-4), name
    nll = model.per_token_nll(ids, tgt)
    assert nll.shape == (2, 12) and nll.dtype == torch.float32
    ref_nll = F.cross_entropy(logits.view(-1, 64), tgt.view(-1), reduction="none").view(2, 12)
    assert torch.allclose(nll, ref_nll, atol=1e-5)
    # eval's tail form: the head only at positions 5.. gives those positions' values
    assert torch.allclose(model.per_token_nll(ids, tgt, first=5), nll[:, 5:], atol=1e-6)
    assert torch.allclose(model.tail_logits(ids, 5), logits[:, 5:], atol=1e-6)


def test_bf16_autocast_forward_backward_matches_plain_path() -> None:
    cfg = tiny()
    model = GPT(cfg)
    randomize_(model)
    model.tok_emb.to(torch.bfloat16)  # training precision: bf16 embedding, fp32 elsewhere
    model.set_looping(True)
    ids, tgt = ids_for(cfg), ids_for(cfg, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, tgt)
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        logits = model(ids)
        ref = F.cross_entropy(logits.view(-1, 64), tgt.view(-1))
        ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - ref.item()) < 1e-4  # same bf16 logits, same fp32 tail
    for g, r in zip(grads, ref_grads):
        if r is not None:
            assert torch.isfinite(g).all()
            assert (g.float() - r.float()).norm() <= 0.02 * r.float().norm() + 1e-6


def test_compute_precision_follows_autocast_not_embedding_storage() -> None:
    model = GPT(tiny())  # tok_emb is stored in bf16
    ids = ids_for(model.cfg)
    assert model.hidden(ids).dtype == torch.float32  # autocast off: fp32 compute
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.hidden(ids).dtype == torch.bfloat16  # the records' bf16 stream


def test_rope_ntk_rescale_only_beyond_2048() -> None:
    for seq, base in ((2048, 10000.0), (4096, 10000.0 * 2 ** (16 / 14))):
        cos, sin = attention.rope_tables(seq, 16, 10000.0, torch.device("cpu"), 2048)
        assert cos.shape == (seq, 8)
        angle = 7 * base ** (-2 * 3 / 16)  # position 7, frequency index 3
        assert (
            abs(cos[7, 3].item() - math.cos(angle)) < 1e-5 and abs(sin[7, 3].item() - math.sin(angle)) < 1e-5
        )


# ----------------------------------------------------------------------------- attention backend


def fake_flash(q, k, v, causal):
    """Stands in for FA3: [B,T,H,D] in and out, GQA by repeating KV heads, causal mask aligned bottom-right
    when there are fewer queries than keys (FlashAttention >= 2.1); returns (out, lse)."""
    assert causal
    group = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    q_len, k_len = q.size(1), k.size(1)
    mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2), None


def test_backend_selection(monkeypatch) -> None:
    monkeypatch.setattr(backend, "flash_attn_func", None)
    assert backend.resolve_backend("auto", "cuda") == "sdpa"
    assert backend.resolve_backend("sdpa", "cuda") == "sdpa"
    with pytest.raises(RuntimeError, match="attention_backend='flash'"):
        backend.resolve_backend("flash", "cuda")
    with pytest.raises(RuntimeError, match="flash_attn_interface"):
        GPT(tiny(attention_backend="flash"))
    with backend.override_backend("sdpa"):  # the test override wins over the config, for every model
        assert backend.resolve_backend("flash", "cuda") == "sdpa"
        GPT(tiny(attention_backend="flash"))
    assert backend._override is None
    monkeypatch.setattr(backend, "flash_attn_func", fake_flash)
    assert backend.resolve_backend("auto", "cuda") == "flash"
    assert backend.resolve_backend("auto", "cpu") == "sdpa"
    assert backend.resolve_backend("sdpa", "cuda") == "sdpa"
    assert backend.resolve_backend("flash", "cpu") == "flash"
    with backend.override_backend("flash"):
        assert backend.resolve_backend("sdpa", "cpu") == "flash"
    with pytest.raises(ValueError, match="attention_backend='fa4'"):
        backend.resolve_backend("fa4", "cuda")


def test_flash_layout_plumbing_matches_sdpa(monkeypatch) -> None:
    calls = []

    def counting_flash(q, k, v, causal):
        calls.append(tuple(q.shape))
        return fake_flash(q, k, v, causal)

    monkeypatch.setattr(backend, "flash_attn_func", counting_flash)
    cfg = tiny()
    ids = ids_for(cfg)
    sdpa_model = randomize_(GPT(tiny(attention_backend="sdpa"))).eval()
    flash_model = randomize_(GPT(tiny(attention_backend="flash"))).eval()
    for model in (sdpa_model, flash_model):
        model.set_looping(True)
    with torch.no_grad():
        expected, got = sdpa_model(ids), flash_model(ids)
    assert calls and calls[0] == (2, 12, 4, 8)  # [B, T, H, D]
    assert torch.allclose(expected, got, atol=1e-5)
    with torch.no_grad():  # eval's tail form: 5 query positions against all 12 keys in the last layer
        assert torch.allclose(flash_model.tail_logits(ids, 7), expected[:, 7:], atol=1e-5)
    assert calls[-1] == (2, 5, 4, 8)


def reference_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bottom-right aligned causal attention written out: softmax over the visible keys of each query."""
    heads, kv_heads = q.size(2), k.size(2)
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.size(-1))
    off = k.size(1) - q.size(1)
    visible = torch.ones(q.size(1), k.size(1), dtype=torch.bool).tril(off)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


@pytest.mark.parametrize("q_len", [37, 32, 8, 5])
def test_block_causal_inference_attention_matches_reference(monkeypatch, q_len: int) -> None:
    # CPU inference splits the queries into blocks of CPU_QUERY_BLOCK (each sees only its keys); 8 here so
    # that 37 queries make 4 full blocks and a ragged one, and a tail of 5 of 37 keys (eval's `first`) one
    monkeypatch.setattr(backend, "CPU_QUERY_BLOCK", 8)
    calls = []
    sdpa = backend._sdpa

    def counting_sdpa(*args):
        calls.append(args[0].size(1))
        return sdpa(*args)

    monkeypatch.setattr(backend, "_sdpa", counting_sdpa)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, q_len, 4, 8, generator=gen)
    k, v = torch.randn(2, 2, 37, 2, 8, generator=gen).unbind(0)
    expected = reference_causal(q, k, v)
    with torch.no_grad():
        got = backend.causal_attention(q, k, v, "sdpa")
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)
    assert calls == [min(8, q_len - a) for a in range(0, q_len, 8)]  # query blocks of 8, the last ragged
    # training (autograd) keeps one SDPA call over all queries: same numbers, and gradients flow
    calls.clear()
    q.requires_grad_(True)
    trained = backend.causal_attention(q, k, v, "sdpa")
    assert calls == [q_len]
    assert torch.allclose(trained, expected, atol=1e-5)
    trained.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
