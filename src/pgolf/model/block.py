"""One transformer block in its three residual forms (SPEC §2.3, §2.6).

* sequential: x_in = mix(x, x0); x_mid = x_in + a(x_in); x_out = x_mid + f(x_mid)
* gptj (#1493): x_out = x_in + a(x_in) + f(x_in)
* two lanes (#1541 / #1529): attention reads lane 0, the MLP reads lane 1; see `forward_lanes`.

a(·) = attn_scale ⊙ Attn(RMSNorm(·)·s_l), f(·) = mlp_scale ⊙ MLP(RMSNorm(·)·s_l), with the layerwise
LN scale s_l = 1/sqrt(l+1) by *physical* index l (a looped block keeps its factor).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.config.schema import ModelConfig
from pgolf.model.attention import AttnInputs, CausalSelfAttention
from pgolf.model.layers import MLP

if TYPE_CHECKING:
    from pgolf.model.lora import SlotAdapters

LANE_MODES = ("lanes1541", "lanes1529")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        dim = cfg.model_dim
        use_xsa = cfg.xsa_last_n > 0 and layer_idx >= cfg.num_layers - cfg.xsa_last_n
        self.attn = CausalSelfAttention(cfg, use_xsa)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        # resid_mix[0] weighs the running stream, resid_mix[1] the embedding x0 (init: no x0).
        self.resid_mix = (
            nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim)))) if cfg.resid_mix else None
        )
        self.ln_scale = 1.0 / math.sqrt(layer_idx + 1) if cfg.ln_scale else 1.0
        is_parallel = cfg.parallel_mode != "none" and layer_idx >= cfg.parallel_start
        self.gptj = is_parallel and cfg.parallel_mode == "gptj"
        self.lane_form = cfg.parallel_mode if is_parallel and cfg.parallel_mode in LANE_MODES else None

    def mix(self, x: Tensor, x0: Tensor) -> Tensor:
        if self.resid_mix is None:
            return x
        mix = self.resid_mix.to(x.dtype)
        return mix[0] * x + mix[1] * x0

    def _norm(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),)) * self.ln_scale

    def _attn(self, x: Tensor, ctx: AttnInputs, tail: int, lora: SlotAdapters | None) -> Tensor:
        return self.attn_scale.to(x.dtype) * self.attn(self._norm(x), ctx, tail, lora)

    def _mlp(self, x: Tensor, lora: SlotAdapters | None) -> Tensor:
        h = self._norm(x)
        out = self.mlp(h) if lora is None else self.mlp(h) + lora.mlp(h)
        return self.mlp_scale.to(x.dtype) * out

    # tail > 0 (a model's last layer only) computes the outputs of positions tail.. alone; their attention
    # still reads every key. Exact, since nothing reads the other positions of the last layer.
    def forward(self, x: Tensor, x0: Tensor, ctx: AttnInputs, tail: int = 0, lora: SlotAdapters | None = None
                ) -> Tensor:  # fmt: skip
        """Sequential or GPT-J block on a single residual stream; output [B, T - tail, dim]. `lora`: this
        virtual layer's per-row adapters (pgolf.model.lora)."""
        x = self.mix(x, x0)
        a = self._attn(x, ctx, tail, lora)
        x = x[:, tail:]
        if self.gptj:
            return x + a + self._mlp(x, lora)
        x = x + a
        return x + self._mlp(x, lora)

    def forward_lanes(
        self,
        lane0: Tensor,
        lane1: Tensor,
        x0: Tensor,
        ctx: AttnInputs,
        post: Tensor,
        resid: Tensor,
        tail: int = 0,
        lora: SlotAdapters | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One two-lane layer; post = par_post[l] ([src][dst], src 0 = attn, 1 = mlp), resid = par_resid[l].

        #1541: MLP reads mix(lane1, x0); L_k ← r1·(r0·L_k + P[0][k]·a) + P[1][k]·f (shared carry r0·r1).
        #1529: MLP reads raw lane1;      L_k ← ρ_k·L_k + P[0][k]·a + P[1][k]·f (per-lane carry ρ_k).
        Both branch outputs are computed from the pre-update lanes. Outputs: positions tail.. only.
        """
        if self.lane_form is None:
            raise RuntimeError("forward_lanes called on a block that is not a lane-parallel layer")
        a = self._attn(self.mix(lane0, x0), ctx, tail, lora)
        lane0, lane1, x0 = lane0[:, tail:], lane1[:, tail:], x0[:, tail:]
        mlp_in = self.mix(lane1, x0) if self.lane_form == "lanes1541" else lane1
        f = self._mlp(mlp_in, lora)
        post, resid = post.to(a.dtype), resid.to(a.dtype)
        if self.lane_form == "lanes1541":
            r0, r1 = resid[0], resid[1]
            new0 = r1 * (r0 * lane0 + post[0, 0] * a) + post[1, 0] * f
            new1 = r1 * (r0 * lane1 + post[0, 1] * a) + post[1, 1] * f
        else:
            new0 = resid[0] * lane0 + post[0, 0] * a + post[1, 0] * f
            new1 = resid[1] * lane1 + post[0, 1] * a + post[1, 1] * f
        return new0, new1
