"""GPTQ, SDClip (plain and Hessian-aware), percentile clip, RTN and the per-tensor plan (SPEC §4.3-4.5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.config import preset
from pgolf.config.schema import QuantConfig
from pgolf.model import GPT, param_role
from pgolf.quant import (
    collect_hessians,
    dequantize,
    gptq_quantize,
    hessian_clip_multipliers,
    percentile_clip_scales,
    plan_tensors,
    quant_error,
    quantize_state_dict,
    rtn_quantize,
    sdclip_scales,
)


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)  # torch.distributions samples from the global generator
    return torch.distributions.StudentT(4.0).sample((rows, cols)) * 0.02


def correlated_hessian(cols: int, n: int = 2048, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    X = torch.randn(n, cols, generator=g) @ mix + 0.3 * torch.randn(n, cols, generator=g)
    X[:, :4] *= 5.0  # a few dominant input features, as real activations have
    return X.T @ X / n


def reference_gptq(W, H, s, bits, damp=0.01, block=128):
    """The §4.3 algorithm written column by column, unbatched, from the spec text."""
    W, H = W.clone().double(), H.clone().double()
    R = 2 ** (bits - 1) - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    perm = torch.argsort(torch.diag(H), descending=True)
    W, H = W[:, perm], H[perm][:, perm]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    sf = s.double()
    for i1 in range(0, W.shape[1], block):
        i2 = min(i1 + block, W.shape[1])
        E = torch.zeros(W.shape[0], i2 - i1, dtype=W.dtype)
        for j in range(i1, i2):
            q = torch.clamp(torch.round(W[:, j] / sf), -R, R)
            Q[:, j] = q
            e = (W[:, j] - q * sf) / U[j, j]
            W[:, j:i2] -= e[:, None] * U[j, j:i2][None, :]
            E[:, j - i1] = e
        W[:, i2:] -= E @ U[i1:i2, i2:]
    return Q[:, torch.argsort(perm)].to(torch.int8)


def test_gptq_matches_the_spec_algorithm_with_dead_columns():
    torch.manual_seed(0)
    W = heavy_tailed(48, 200)
    H = correlated_hessian(200)
    H[7, :] = 0.0
    H[:, 7] = 0.0  # a dead input feature
    s = sdclip_scales(W, 6, 12.85)
    q = gptq_quantize(W, H, s, 6, block_size=64)
    ref = reference_gptq(W, H, s, 6, block=64)
    # float32 vs float64 may flip a rare exact tie; everything else must agree
    assert (q != ref).float().mean().item() < 2e-3
    assert torch.all(q[:, 7] == 0)  # the dead column's weights are zeroed, so they quantize to 0
    assert int(q.abs().max()) <= 31


def test_batched_gptq_equals_one_matrix_at_a_time():
    torch.manual_seed(1)
    Ws = torch.stack([heavy_tailed(32, 96, seed=i) for i in range(3)])
    Hs = torch.stack([correlated_hessian(96, seed=i) for i in range(3)])
    S = sdclip_scales(Ws, 6, 12.85)
    batched = gptq_quantize(Ws, Hs, S, 6, block_size=32)
    for i in range(3):
        assert torch.equal(batched[i], gptq_quantize(Ws[i], Hs[i], S[i], 6, block_size=32))


@pytest.fixture(scope="module")
def tiny_model_and_hessians():
    cfg = preset("smoke")
    cfg.model.vocab_size = 512
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():  # trained-looking weights: the init plus heavy-tailed noise (zero-init projs too)
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.distributions.StudentT(4.0).sample(p.shape).to(p.dtype) * 0.02)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (4, 64), generator=g) for _ in range(3)]
    return cfg, model, collect_hessians(model, batches, "cpu", "bf16")


def test_gptq_error_is_at_most_rtn_for_every_matrix(tiny_model_and_hessians):
    cfg, model, hessians = tiny_model_and_hessians
    state = model.state_dict()
    quantized = [n for n in state if param_role(n, state[n]) in ("matrix", "embed")]
    assert set(quantized) == set(hessians)  # every quantized matrix + the tied embedding got a Hessian
    for name in quantized:
        W, H = state[name].float(), hessians[name]
        assert torch.all(torch.diagonal(H) >= 0) and H.abs().sum() > 0
        bits, k = (6, 12.85) if param_role(name, W) == "matrix" else (8, 20.0)
        s = sdclip_scales(W, bits, k)
        err_gptq = quant_error(W, dequantize(gptq_quantize(W, H, s, bits), s), H)
        err_rtn = quant_error(W, dequantize(rtn_quantize(W, s, bits), s), H)
        assert err_gptq <= err_rtn, name


def test_hessian_aware_clip_equals_the_formula():
    torch.manual_seed(2)
    W = heavy_tailed(20, 30).double()
    H = correlated_hessian(30).double()
    lam, k, bits = 0.175, 12.85, 6
    got = sdclip_scales(W.float(), bits, k, torch.diagonal(H).float(), lam)
    d = np.diag(H.numpy())
    col_imp = d / d.mean()
    Wn = W.numpy()
    raw = np.array([np.mean(np.abs(Wn[r]) * col_imp) for r in range(Wn.shape[0])])
    row_imp = raw / raw.mean()
    std = np.array([np.std(Wn[r], ddof=1) for r in range(Wn.shape[0])])
    clip = k * std * (1 + lam * (row_imp - 1))
    expected = torch.tensor(clip / 31).to(torch.float16)
    assert torch.equal(got, expected)
    mult = hessian_clip_multipliers(W, torch.diagonal(H), lam).numpy()
    np.testing.assert_allclose(mult, 1 + lam * (row_imp - 1), rtol=1e-6)  # fp32 arithmetic


def test_sdclip_and_percentile_scales():
    torch.manual_seed(3)
    W = heavy_tailed(8, 64)
    W[3] = 0.0  # an all-zero row: scale floored, q = 0, no NaN
    s = sdclip_scales(W, 6, 12.85)
    assert s.dtype == torch.float16
    torch.testing.assert_close(s[:3].float(), (12.85 * W[:3].std(dim=1) / 31).half().float())
    q = rtn_quantize(W, s, 6)
    assert torch.all(q[3] == 0) and torch.isfinite(dequantize(q, s)).all()
    p = percentile_clip_scales(W, 8, 99.0)
    expected = np.percentile(W.abs().numpy(), 99.0, axis=1) / 127
    np.testing.assert_allclose(p[[0, 1, 2, 4]].float().numpy(), expected[[0, 1, 2, 4]], rtol=1e-3)
    with pytest.raises(ValueError, match="clip_percentile"):
        percentile_clip_scales(W, 8, 0.0)


def test_plan_by_role_and_by_size():
    cfg = preset("smoke")
    model = GPT(cfg.model)
    state = model.state_dict()
    by_role = {p.name: p for p in plan_tensors(state, QuantConfig(), param_role)}
    assert by_role["blocks.0.attn.c_q.weight"].scheme == "int6"  # 64x64 = 4,096 elements: quantized by role
    assert by_role["tok_emb.weight"].scheme == "int8"
    assert by_role["blocks.0.attn_scale"].scheme == "fp16" and by_role["blocks.0.attn_scale"].cls == "control"
    by_size = {p.name: p for p in plan_tensors(state, QuantConfig(passthrough="size"), param_role)}
    assert by_size["blocks.0.attn.c_q.weight"].scheme == "fp16"  # the records' <= 65,536 rule
    assert by_size["tok_emb.weight"].scheme == "int8"  # 8192 x 64 = 524,288 elements


def test_quantize_state_dict_rtn_and_missing_hessian_errors():
    cfg = preset("smoke")
    cfg.model.vocab_size = 256
    state = GPT(cfg.model).state_dict()
    out = quantize_state_dict(state, {}, QuantConfig(method="rtn"), param_role)
    assert out["blocks.0.mlp.fc.weight"].data.dtype == torch.int8
    assert out["blocks.0.attn_scale"].data.dtype == torch.float16
    with pytest.raises(ValueError, match="needs its Hessian"):
        quantize_state_dict(state, {}, QuantConfig(method="gptq"), param_role)
    with pytest.raises(ValueError, match="hessian_clip_lambda"):
        quantize_state_dict(state, {}, QuantConfig(method="rtn", hessian_clip_lambda=0.2), param_role)
    with pytest.raises(ValueError, match="quant.matrix_bits=9"):
        plan_tensors(state, QuantConfig(matrix_bits=9), param_role)
