"""MuonEq-R against a float64 reference of SPEC §3.2 and against torch.optim.Muon; parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pgolf.config import OptimConfig, preset
from pgolf.optim import Muon, build_optimizers, newton_schulz, ns_coefficients, shape_scale, split_params

A, B, C = 3.4445, -4.7750, 2.0315


pytestmark = pytest.mark.usefixtures("one_thread")


def ref_newton_schulz(u: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """§3.2 literally, in float64: X = u/(‖u‖_F+1e-7); transpose if rows > cols; A = XXᵀ; X ← aX + (bA + cA²)X."""
    x = u.double() / (u.double().norm() + 1e-7)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    for _ in range(steps):
        a = x @ x.T
        x = A * x + (B * a + C * a @ a) @ x
    return x.T if transposed else x


def ref_muon_step(p, g, buf, lr, mu, wd, row_norm=True):
    """One float64 MuonEq-R step; returns (new p, new buf)."""
    p, g, buf = p.double(), g.double(), buf.double()
    buf = mu * buf + g
    u = g + mu * buf
    if row_norm:
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-7)
    upd = ref_newton_schulz(u) * math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
    return p * (1 - lr * wd) - lr * upd, buf


SHAPES = [(48, 32), (32, 48), (32, 32), (32, 48), (96, 32)]


def make_params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in SHAPES]


def grads_for(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def run_steps(opt, params, n, mu_by_step=None):
    for k in range(n):
        if mu_by_step is not None:
            opt.param_groups[0]["momentum"] = mu_by_step[k]
        for p, g in zip(params, grads_for(k)):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("ns_dtype,tol", [("bf16", 0.03), ("fp32", 1e-5)])
def test_muon_matches_float64_reference(ns_dtype, tol):
    """Two steps (momentum carried) against §3.2 in float64. Tolerance: NS in bf16 has an 8-bit mantissa,
    so after 5 quintic iterations each update entry is off by up to ~0.01 (bf16 update buffer included);
    with ns_dtype=fp32 (fp32 update buffer) the only error is fp32 rounding, ~1e-6."""
    lr, mus, wd = 0.05, [0.92, 0.95], 0.1
    params = make_params()
    ref = [(p.detach().double().clone(), torch.zeros(p.shape, dtype=torch.float64)) for p in params]
    opt = Muon(params, lr=lr, momentum=mus[0], weight_decay=wd, ns_dtype=ns_dtype)
    run_steps(opt, params, 2, mus)
    for k in range(2):
        ref = [ref_muon_step(p, g, b, lr, mus[k], wd) for (p, b), g in zip(ref, grads_for(k))]
    for p, (rp, rbuf) in zip(params, ref):
        # The difference in units of lr, i.e. of update entries, which are O(0.1-0.5) here.
        err = ((p.detach().double() - rp).abs().max() / lr).item()
        assert err < tol, (p.shape, err)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"].double(), rbuf, rtol=1e-6, atol=1e-6)


def test_newton_schulz_orthogonalises_and_batches():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(4, 64, 32, generator=gen)
    x = newton_schulz(g, 5, torch.float32)
    sv = torch.linalg.svdvals(x)
    # The quintic deliberately overshoots: singular values land in roughly [0.6, 1.2], not exactly 1.
    assert sv.min() > 0.5 and sv.max() < 1.3
    single = torch.stack([newton_schulz(m, 5, torch.float32) for m in g])
    torch.testing.assert_close(x, single, rtol=1e-5, atol=1e-5)
    assert shape_scale((1024, 256)) == 2.0 and shape_scale((256, 1024)) == 1.0


def test_muon_agrees_with_torch_optim_muon_without_row_norm():
    """torch.optim.Muon(adjust_lr_fn='original') is the same algorithm up to conventions:
    - its momentum buffer is an EMA (buf ← μ·buf + (1−μ)·g, Nesterov u = (1−μ)·g + μ·buf) where ours is a
      sum (buf ← μ·buf + g, u = g + μ·buf): u_torch = (1−μ)·u_ours exactly, and Newton–Schulz normalises
      by ‖u‖_F, so the orthogonalised updates agree up to bf16 rounding of the differently scaled input;
    - its eps clamps ‖u‖ (max(‖u‖, eps)) where ours adds eps: irrelevant for non-zero gradients;
    - lr scaling sqrt(max(1, rows/cols)) and decoupled wd p·(1 − lr·wd) (unscaled lr) are the same.
    Row normalisation (MuonEq-R) has no torch counterpart, so it is off here.
    """
    lr, mu, wd = 0.05, 0.95, 0.1
    ours, theirs = make_params(), make_params()
    opt = Muon(ours, lr=lr, momentum=mu, weight_decay=wd, row_normalize=False)
    ref = torch.optim.Muon(
        theirs, lr=lr, momentum=mu, weight_decay=wd, nesterov=True, adjust_lr_fn="original"
    )
    run_steps(opt, ours, 3)
    run_steps(ref, theirs, 3)
    for p, q in zip(ours, theirs):
        drift = (p.detach() - q.detach()).abs().max().item() / lr
        assert drift < 0.05, (p.shape, drift)  # bf16 NS: a few % of one O(0.2) update entry over 3 steps
        # The buffers differ by exactly the convention factor (1 − μ).
        torch.testing.assert_close(
            ref.state[q]["momentum_buffer"], (1 - mu) * opt.state[p]["momentum_buffer"]
        )


def test_muon_state_dict_round_trip_continues_identically():
    params_a, params_b = make_params(), make_params()
    opt_a = Muon(params_a, lr=0.05, momentum=0.9, weight_decay=0.1)
    run_steps(opt_a, params_a, 2)
    state = opt_a.state_dict()
    for pa, pb in zip(params_a, params_b):
        pb.data.copy_(pa.data)
    opt_b = Muon(params_b, lr=1.0, momentum=0.1, weight_decay=0.0)
    opt_b.load_state_dict(state)
    assert opt_b.param_groups[0]["lr"] == 0.05 and opt_b.param_groups[0]["momentum"] == 0.9
    for opt, ps in ((opt_a, params_a), (opt_b, params_b)):
        for p, g in zip(ps, grads_for(7)):
            p.grad = g.clone()
        opt.step()
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="momentum buffers"):
        opt_b.load_state_dict({"hyper": {}, "momentum_buffers": state["momentum_buffers"][:2]})


def test_muon_rejects_non_matrix():
    hyper = dict(lr=0.02, momentum=0.95, weight_decay=0.0)
    with pytest.raises(ValueError, match="only 2-D"):
        Muon([nn.Parameter(torch.zeros(3))], **hyper)
    with pytest.raises(ValueError, match="muon_ns_dtype"):
        Muon(make_params(), ns_dtype="fp8", **hyper)
    with pytest.raises(ValueError, match="muon_momentum_dtype"):
        Muon(make_params(), momentum_dtype="fp8", **hyper)


# SPEC-1855 §2, copied digit for digit.
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def test_polar_express_coefficients_are_spec_1855s_and_steps_are_bounded():
    assert ns_coefficients("polar_express", 5) == POLAR_EXPRESS
    assert ns_coefficients("polar_express", 3) == POLAR_EXPRESS[:3]
    assert ns_coefficients("quintic", 7) == [(A, B, C)] * 7
    with pytest.raises(ValueError, match="optim.muon_backend_steps=6: .* at most 5 steps"):
        ns_coefficients("polar_express", 6)
    with pytest.raises(ValueError, match="muon_backend_steps=6"):  # at construction, not at the first step
        Muon(
            make_params(),
            lr=0.02,
            momentum=0.95,
            weight_decay=0.0,
            backend_steps=6,
            ns_coeffs="polar_express",
        )


def test_polar_express_newton_schulz_matches_float64_reference():
    """Wide orientation, X/(‖X‖_F + 1e-7), then A = XXᵀ; X ← aX + (bA + cA²)X per tuple; and it orthogonalises
    more tightly in five steps than the stock quintic (smallest singular value ~0.86 against ~0.68 here)."""
    gen = torch.Generator().manual_seed(1)
    for shape in ((64, 32), (32, 64)):
        g = torch.randn(shape, generator=gen)
        x = g.double() / (g.double().norm() + 1e-7)
        tall = x.shape[0] > x.shape[1]
        x = x.T if tall else x
        for a, b, c in POLAR_EXPRESS:
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        ref = x.T if tall else x
        torch.testing.assert_close(
            newton_schulz(g, 5, torch.float32, "polar_express").double(), ref, rtol=0, atol=2e-4
        )
    stack = torch.randn(4, 64, 32, generator=gen)
    polar = torch.linalg.svdvals(newton_schulz(stack, 5, torch.float32, "polar_express"))
    stock = torch.linalg.svdvals(newton_schulz(stack, 5, torch.float32, "quintic"))
    assert polar.min() > 0.8 and polar.max() < 1.2 and stock.min() < 0.75


def test_build_optimizers_passes_the_ns_schedule_and_momentum_dtype():
    cfg = OptimConfig(muon_ns_coeffs="polar_express", muon_momentum_dtype="bf16")
    opts = build_optimizers(tiny_gpt(), cfg)
    assert opts.muon.param_groups[0]["ns_coeffs"] == "polar_express"
    assert all(opts.muon.state[p]["momentum_buffer"].dtype == torch.bfloat16 for p in opts.muon.params)


def test_bf16_momentum_buffer_accumulates_the_bf16_gradient():
    """#1557's parallel Muon: buf ← μ·buf + bf16(g) in bf16, bit for bit; the update still uses it (Nesterov)."""
    mu = 0.95
    params = make_params()
    opt = Muon(params, lr=0.05, momentum=mu, weight_decay=0.0, momentum_dtype="bf16")
    bufs = [torch.zeros(p.shape, dtype=torch.bfloat16) for p in params]
    for k in range(3):
        for p, g in zip(params, grads_for(k)):
            p.grad = g.clone()
        opt.step()
        bufs = [b * mu + g.bfloat16() for b, g in zip(bufs, grads_for(k))]
    for p, b in zip(params, bufs):
        assert opt.state[p]["momentum_buffer"].dtype == torch.bfloat16
        assert torch.equal(opt.state[p]["momentum_buffer"], b)
    # A checkpoint round trip keeps the bf16 values exactly (gathered as fp32, copied back).
    again = Muon(make_params(), lr=0.05, momentum=mu, weight_decay=0.0, momentum_dtype="bf16")
    again.load_state_dict(opt.state_dict())
    for p, q in zip(params, again.params):
        assert torch.equal(again.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"])


def tiny_gpt(tied: bool = True):
    from pgolf.model import GPT

    cfg = preset("smoke").model
    cfg.tie_embeddings = tied
    cfg.vocab_size = 1024
    return GPT(cfg)


@pytest.mark.parametrize("tied", [True, False])
def test_groups_follow_param_role(tied):
    model = tiny_gpt(tied)
    cfg = OptimConfig()
    groups = split_params(model)
    names = {role: [n for n, _ in getattr(groups, role)] for role in ("matrix", "embed", "head", "control")}
    assert all(n.startswith("blocks.") and n.endswith(".weight") for n in names["matrix"])
    assert len(names["matrix"]) == 6 * model.cfg.num_layers
    assert names["embed"] == ["tok_emb.weight"]
    assert names["head"] == ([] if tied else ["lm_head.weight"])
    assert "skip_gates" in names["control"] and "blocks.0.attn.q_gain" in names["control"]
    total = sum(len(v) for v in names.values())
    assert total == len(list(model.parameters()))
    opts = build_optimizers(model, cfg)
    lrs = opts.lrs()
    assert lrs["matrix"] == cfg.matrix_lr and lrs["control"] == cfg.scalar_lr
    assert lrs["embed"] == (cfg.tied_embed_lr if tied else cfg.embed_lr)
    if not tied:
        assert lrs["head"] == cfg.head_lr
    wd = {g["name"]: g["weight_decay"] for g in opts.adamw.param_groups}
    assert wd["embed"] == cfg.embed_wd and wd["control"] == cfg.adam_wd and wd.get("head", 0.0) == 0.0
    assert (
        opts.adamw.defaults["betas"] == (cfg.beta1, cfg.beta2) and opts.adamw.defaults["eps"] == cfg.adam_eps
    )
    opts.set_lr_multiplier(0.5)
    assert opts.lrs()["matrix"] == cfg.matrix_lr * 0.5 and opts.lrs()["control"] == cfg.scalar_lr * 0.5
    opts.set_muon_momentum(0.93)
    assert opts.muon.param_groups[0]["momentum"] == 0.93


def test_optimizer_set_steps_every_group():
    torch.manual_seed(0)
    model = tiny_gpt(False)
    opts = build_optimizers(model, OptimConfig())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
    # Zero-init head and output projections make blocks identities at init, so gradients reach the
    # projections only from step 2 and the skip gates only from step 3: after 3 steps all have moved.
    for _ in range(3):
        model(ids, ids).backward()
        opts.step()
        opts.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(before), set(before) - changed
    assert all(p.grad is None for p in model.parameters())
