"""Small building blocks: the weight-casting Linear and the squared-activation MLP (SPEC §2.3, §2.7)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.config.schema import ModelConfig


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
