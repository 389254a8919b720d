"""Small building blocks: the weight-casting Linear, the squared-activation MLP (SPEC §2.3, §2.7) and the
SmearGate of #1855 (SPEC-1855 §1.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.config.schema import ModelConfig

BOS_ID = 1  # SPEC §1.2: the token that starts every document of a shard (pgolf.data.build writes it)


class CastedLinear(nn.Linear):
    """Bias-free Linear whose (fp32 master) weight is cast to the activation dtype at every call."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class MLP(nn.Module):
    """proj(act(fc(x))²) with act = LeakyReLU(0.5) (records) or ReLU (baseline)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.mlp_activation not in ("leaky_relu2", "relu2"):
            raise ValueError(
                f"model.mlp_activation={cfg.mlp_activation!r}; expected 'leaky_relu2' or 'relu2'"
            )
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = CastedLinear(cfg.model_dim, hidden)
        self.proj = CastedLinear(hidden, cfg.model_dim)
        self.negative_slope = 0.5 if cfg.mlp_activation == "leaky_relu2" else 0.0

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h = F.leaky_relu(h, self.negative_slope) if self.negative_slope else F.relu(h)
        return self.proj(h.square())


def smear(e: Tensor, is_bos: Tensor, gate_w: Tensor, lam: Tensor) -> Tensor:
    """SmearGate: e'_t = e_t + λ·σ(w·e_t[:window])·e_{t−1} for t ≥ 1 of each row, except where token t is
    BOS (a document never receives the previous document's last embedding). e [B,T,d], is_bos [B,T]."""
    cur = e[:, 1:]
    gate = lam.to(e.dtype) * torch.sigmoid(F.linear(cur[..., : gate_w.numel()], gate_w.to(e.dtype)[None]))
    gate = gate.masked_fill(is_bos[:, 1:, None], 0.0)
    return torch.cat((e[:, :1], cur + gate.to(e.dtype) * e[:, :-1]), dim=1)
