"""pgolf.model.loss: the fused softcapped cross-entropy of #1855 (SPEC-1855 §3) against the eager path,
on CPU (vocabulary blocks) and, where Triton is installed, its kernels under Triton's CPU interpreter."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_model import ids_for, randomize_, tiny

import pgolf.model.loss as loss_mod
from pgolf.config import preset
from pgolf.model import GPT


def eager(z: torch.Tensor, tgt: torch.Tensor, softcap: float) -> torch.Tensor:
    zf = z.float()
    return F.cross_entropy(softcap * torch.tanh(zf / softcap) if softcap else zf, tgt)


def cases(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    for softcap in (30.0, 2.0, 0.0):
        z = (8 * torch.randn(37, 250, generator=gen)).to(dtype)
        tgt = torch.randint(0, 250, (37,), generator=gen)
        tgt[:3] = torch.tensor([0, 249, 64])  # first column, last column, a block boundary
        yield softcap, z, tgt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_softcapped_ce_equals_eager_loss_and_grad(monkeypatch, dtype) -> None:
    monkeypatch.setattr(loss_mod, "VOCAB_BLOCK", 64)  # 4 vocabulary blocks, the last one ragged
    monkeypatch.setattr(loss_mod, "ROW_BLOCK", 8)  # 5 row blocks, the last one ragged
    for softcap, z, tgt in cases(dtype):
        a = z.clone().requires_grad_()
        fused = loss_mod.softcapped_cross_entropy(a, tgt, softcap)
        (ga,) = torch.autograd.grad(3.0 * fused, a)
        b = z.clone().requires_grad_()
        ref = eager(b, tgt, softcap)
        (gb,) = torch.autograd.grad(3.0 * ref, b)
        assert fused.dtype == torch.float32 and ga.dtype == dtype
        assert torch.equal(a.detach(), z)  # the logits are read, never written
        assert torch.allclose(fused, ref, atol=1e-5, rtol=1e-6), (softcap, fused, ref)
        if dtype == torch.float32:
            assert torch.allclose(ga, gb, atol=1e-7, rtol=1e-5), (softcap, (ga - gb).abs().max())
        else:  # both round the same fp32 gradient to bf16
            assert (ga.float() - gb.float()).abs().max() <= 2 ** -8 * gb.float().abs().max()


def test_fused_ce_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="logits"):
        loss_mod.softcapped_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), 30.0)


def test_model_fused_ce_switch_matches_default_loss_and_grads() -> None:
    for name in ("pr1394", "pr1541", "pr1557", "cpu-golf"):
        assert not preset(name).model.fused_ce, name
    ids, tgt = ids_for(tiny()), ids_for(tiny(), seed=1)
    losses, grads = [], []
    for fused in (False, True):
        model = randomize_(GPT(tiny(fused_ce=fused)))
        model.set_looping(True)
        loss = model(ids, tgt)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for g0, g1 in zip(*grads):
        assert torch.allclose(g0, g1, atol=1e-6, rtol=1e-4)


def check_triton_kernels() -> None:
    """Run in a child with TRITON_INTERPRET=1 (read when Triton is first imported)."""
    from pgolf.model import ce_triton

    ce_triton.BLOCK = 64
    for softcap, z, tgt in cases(torch.float32):
        loss, lse = ce_triton.forward(z, tgt, softcap)
        b = z.clone().requires_grad_()
        ref = eager(b, tgt, softcap)
        (gb,) = torch.autograd.grad(2.0 * ref, b)
        assert torch.allclose(loss.mean(), ref, atol=1e-5), softcap
        assert torch.allclose(lse, torch.logsumexp(loss_mod._capped(z, softcap), dim=1), atol=1e-5), softcap
        grad = ce_triton.backward(z, tgt, lse, torch.tensor([2.0 / z.size(0)]), softcap)
        assert torch.allclose(grad, gb, atol=1e-7, rtol=1e-5), softcap


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed (CUDA kernel path)")
def test_triton_kernels_equal_eager_under_the_interpreter() -> None:
    here = os.path.dirname(__file__)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([here, *sys.path]))
    code = "import test_model_loss as t; t.check_triton_kernels()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
