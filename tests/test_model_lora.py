"""Per-document LoRA in the model's one forward (SPEC-1855 part B §3.3): a zero-B set is the plain
forward exactly, deltas of one row never reach another, every slot and the head are wired."""

from __future__ import annotations

import pytest
import torch
from test_model import randomize_, tiny

from pgolf.model import GPT
from pgolf.model.layers import BOS_ID
from pgolf.model.lora import LoraSet

pytestmark = pytest.mark.usefixtures("one_thread")

# every #1855 switch the LoRA path must pass through: smear, sparse gate, XSA, q_gain, loop, lanes, docs
SWITCHES = dict(smear_gate=True, sparse_attn_gate=True, gate_window=8, doc_attention=True, qk_gain_init=3.0)


def model_and_ids(looping: bool = True, **kw) -> tuple[GPT, torch.Tensor]:
    model = randomize_(GPT(tiny(**{**SWITCHES, **kw})), seed=1).eval()
    model.set_looping(looping)
    ids = torch.randint(2, 64, (3, 20), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = BOS_ID
    ids[1, 9] = BOS_ID
    return model, ids


@torch.no_grad()
def random_b_(lora: LoraSet, rows: list[int], seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in lora.adapters():
        for r in rows:
            m.B[r].copy_(0.1 * torch.randn(m.B[r].shape, generator=gen))


@pytest.mark.parametrize("looping,parallel", [(True, "lanes1541"), (False, "none"), (True, "gptj")])
def test_zero_b_adapter_is_the_plain_forward_exactly(looping: bool, parallel: str) -> None:
    model, ids = model_and_ids(looping, parallel_mode=parallel)
    lora = LoraSet(model, ids.size(0), rank=6, alpha=9.0, seed=3)
    targets = torch.roll(ids, -1, 1)
    with torch.no_grad():
        for first in (0, 7):
            assert torch.equal(model.tail_logits(ids, first, lora), model.tail_logits(ids, first))
            assert torch.equal(model.per_token_nll(ids, targets, first, lora),
                               model.per_token_nll(ids, targets, first))  # fmt: skip


def test_set_has_one_slot_per_virtual_layer_and_the_spec_shapes() -> None:
    model, ids = model_and_ids(True)
    lora = LoraSet(model, 5, rank=80, alpha=144.0)
    assert len(lora.slots) == len(model.layer_steps()) == 6  # 4 layers, blocks 1-2 looped once more
    slot = lora.slots[0]
    assert slot.q.A.shape == (5, 80, 32) and slot.q.B.shape == (5, 32, 80)
    assert slot.k.B.shape == (5, 16, 80) and slot.v.B.shape == (5, 16, 80)  # 2 kv heads x 8
    assert slot.o.B.shape == slot.mlp.B.shape == (5, 32, 80)
    assert lora.head.B.shape == (5, 64, 80)
    assert slot.q.scale == pytest.approx(1.8)  # α/r = 144/80
    assert all(not m.B.any() and m.A.abs().max() <= 1 / m.A.size(-1) ** 0.5 for m in lora.adapters())
    with pytest.raises(ValueError, match="does not fit"):
        model.tail_logits(ids, 0, lora)  # 5 rows for a batch of 3


@torch.no_grad()
def test_a_rows_deltas_change_only_that_row() -> None:
    model, ids = model_and_ids(True)
    lora = LoraSet(model, ids.size(0), rank=4, alpha=8.0)
    base = model.tail_logits(ids, 0, lora)
    random_b_(lora, [1])
    out = model.tail_logits(ids, 0, lora)
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
    assert (out[1] - base[1]).abs().max() > 1e-3


@pytest.mark.parametrize("part", ["q", "k", "v", "o", "mlp", "head"])
@torch.no_grad()
def test_every_adapter_reaches_the_logits(part: str) -> None:
    model, ids = model_and_ids(True)
    lora = LoraSet(model, ids.size(0), rank=4, alpha=8.0)
    base = model.tail_logits(ids)
    target = lora.head if part == "head" else getattr(lora.slots[2], part)
    target.B.normal_(0, 0.1)
    assert (model.tail_logits(ids, 0, lora) - base).abs().max() > 1e-4


def test_gradients_reach_only_the_adapters_rows_they_belong_to() -> None:
    model, ids = model_and_ids(True)
    model.requires_grad_(False)
    lora = LoraSet(model, ids.size(0), rank=4, alpha=8.0)
    random_b_(lora, [0, 1, 2])
    targets = torch.roll(ids, -1, 1)
    model.per_token_nll(ids, targets, 0, lora)[1].sum().backward()
    for m in lora.adapters():
        assert m.A.grad[[0, 2]].abs().max() == 0 and m.B.grad[[0, 2]].abs().max() == 0
    assert lora.slots[0].q.A.grad[1].abs().max() > 0


@torch.no_grad()
def test_a_row_subset_scores_like_those_rows_of_the_whole_set_and_follows_updates() -> None:
    model, ids = model_and_ids(True)
    lora = LoraSet(model, ids.size(0), rank=4, alpha=8.0)
    random_b_(lora, [0, 1, 2])
    rows = torch.tensor([2, 0])
    subset = lora.rows(rows)
    assert subset.batch == 2
    full = model.tail_logits(ids, 0, lora)
    torch.testing.assert_close(model.tail_logits(ids[rows], 0, subset), full[rows], rtol=1e-5, atol=1e-5)
    lora.head.B[2].add_(0.5)  # an optimizer step after the view was made
    moved = model.tail_logits(ids[rows], 0, subset)
    torch.testing.assert_close(moved, model.tail_logits(ids, 0, lora)[rows], rtol=1e-5, atol=1e-5)
    assert (moved[0] - full[2]).abs().max() > 1e-3


def test_pr1855_has_17_lora_slots_when_looping() -> None:
    from pgolf.config import preset

    with torch.device("meta"):
        model = GPT(preset("pr1855").model)
    model.set_looping(True)
    # encoder [0,1,2,3,4,5,3,4], decoder [5,3,4,5,6,7,8,9,10] (SPEC-1855 B §3.3)
    assert [s.idx for s in model.layer_steps()] == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
