"""EMA values at hand-computed points, start fraction, decay 0, dtype round trip, state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pgolf.train import EMA


def scalar_model(value: float, dtype=torch.float32) -> nn.Linear:
    m = nn.Linear(1, 1, bias=False).to(dtype)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def set_w(m: nn.Module, v: float) -> None:
    with torch.no_grad():
        m.weight.fill_(v)


def shadow(ema: EMA) -> float:
    return ema.shadow[0].item()


def test_ema_values():
    m = scalar_model(1.0)
    ema = EMA(m, decay=0.5)
    set_w(m, 3.0)
    ema.update(m, 0.1)
    assert shadow(ema) == 2.0  # 0.5·1 + 0.5·3
    set_w(m, 5.0)
    ema.update(m, 0.2)
    assert shadow(ema) == 3.5  # 0.5·2 + 0.5·5
    ema.copy_to(m)
    assert m.weight.item() == 3.5


def test_ema_start_frac_and_zero_decay():
    m = scalar_model(1.0)
    ema = EMA(m, decay=0.5, start_frac=0.5)
    set_w(m, 3.0)
    ema.update(m, 0.25)
    assert shadow(ema) == 3.0  # before start_frac: a copy of the live weights
    set_w(m, 5.0)
    ema.update(m, 0.75)
    assert shadow(ema) == 4.0  # then averaging: 0.5·3 + 0.5·5
    live = EMA(m, decay=0.0)
    set_w(m, 7.0)
    live.update(m, 0.9)
    assert shadow(live) == 7.0
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(m, decay=1.0)


def test_ema_is_fp32_for_bf16_weights_and_round_trips():
    m = scalar_model(1.0, torch.bfloat16)
    ema = EMA(m, decay=0.9)
    assert ema.shadow[0].dtype == torch.float32
    set_w(m, 2.0)
    ema.update(m, 0.5)
    assert shadow(ema) == pytest.approx(1.1)  # fp32 keeps what a bf16 average would round away
    other = EMA(scalar_model(0.0, torch.bfloat16), decay=0.1)
    other.load_state_dict(ema.state_dict())
    assert shadow(other) == pytest.approx(1.1) and other.decay == 0.9
    ema.copy_to(m)
    assert m.weight.dtype == torch.bfloat16 and m.weight.item() == pytest.approx(1.1, abs=1e-2)
