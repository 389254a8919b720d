"""Pins of docs/differences.md: where a record preset departs from its record script, the property that
makes pgolf's way the better one; where it follows the record, that it does."""

from __future__ import annotations

import pytest
import torch

from pgolf.config import preset
from pgolf.model import GPT, param_role
from pgolf.quant import budget
from pgolf.quant.hessian import collect_hessians
from pgolf.quant.scheme import plan_tensors

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["pr1394", "pr1541", "pr1557", "pr1855"])
def test_passthrough_by_role_is_the_records_size_rule_on_record_shapes(name):
    """At record shapes every matrix has > 65,536 elements and every control tensor <= 65,536, so the role
    rule stores exactly what the records' size rule stores; at small shapes only the role rule still
    quantizes the matrices (tests/test_quant_gptq.py::test_plan_by_role_and_by_size)."""
    cfg = preset(name)
    with torch.device("meta"):
        state = GPT(cfg.model).state_dict()
    role = plan_tensors(state, cfg.quant, param_role)
    cfg.quant.passthrough = "size"
    size = plan_tensors(state, cfg.quant, param_role)
    assert [(p.name, p.scheme) for p in role] == [(p.name, p.scheme) for p in size]
    gptq = [p for p in role if p.scheme.startswith("int") and p.rule.method != "int8-row"]  # pr1855's gates aside
    assert len(gptq) == 6 * cfg.model.num_layers + 1  # + tok_emb


def test_averaged_hessians_are_the_hessians_of_every_ranks_batches():
    """quant.average_hessians: the mean of R per-rank Hessians (equal batch counts) is the Hessian over all R
    ranks' calibration batches, what one process seeing them all computes: R times the records' data."""
    cfg = preset("smoke")
    cfg.model.vocab_size = 256
    torch.manual_seed(0)
    model = GPT(cfg.model)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (2, 32), generator=gen) for _ in range(2)]
    both = collect_hessians(model, batches, autocast_mode="off", average_across_ranks=False)
    per_rank = [
        collect_hessians(model, [b], autocast_mode="off", average_across_ranks=False) for b in batches
    ]
    assert both.keys() == per_rank[0].keys() and len(both) == 6 * cfg.model.num_layers + 1
    for name, H in both.items():
        torch.testing.assert_close(H, (per_rank[0][name] + per_rank[1][name]) / 2, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(per_rank[0][name], per_rank[1][name])  # rank 0 alone would differ
    assert all(preset(n).quant.average_hessians for n in ("pr1394", "pr1541", "pr1557", "pr1855"))


def test_estimated_reserve_is_at_least_8_seconds_on_cuda(monkeypatch):
    """An estimated reserve (train.quant_reserve_seconds < 0) never lets calibration start after 592 s of a
    600 s CUDA budget; on CPU the measured estimate stands (cpu-golf quantizes nothing in 2 s)."""
    tiny = budget.ReserveEstimate(calibration_seconds=0.5, gptq_seconds=0.5)
    monkeypatch.setattr(budget, "estimate_quant_seconds", lambda cfg, device="cpu": tiny)
    cfg = preset("pr1855")
    cfg.train.quant_reserve_seconds = -1.0
    assert budget.quant_reserve_seconds(cfg, "cuda") == budget.CUDA_MIN_RESERVE_SECONDS == 8.0
    assert budget.quant_reserve_seconds(cfg, "cpu") == pytest.approx(1.5 * 1.0 + 2.0)
    cfg.train.quant_reserve_seconds = 0.5  # an explicit value is the user's call
    assert budget.quant_reserve_seconds(cfg, "cuda") == 0.5
