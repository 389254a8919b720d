"""pgolf.model: the GPT of the SP8192 record stack (SPEC §2) and the helpers other stages share.

`GPT(cfg.model)`; `model(ids)` -> softcapped fp32 logits [B, T, V]; `model(ids, targets)` -> mean loss;
`model.per_token_nll(ids, targets, first=0)` -> [B, T - first] (eval: last layer and head on the
scored tail only); `model.set_looping(on)`; `recurrence_indices(cfg, looping)`;
`param_role(name, tensor)` -> "embed" | "head" | "matrix" | "control". `hidden`, `tail_logits` and
`per_token_nll` take `lora=` (pgolf.model.lora.LoraSet: per-row adapters on every virtual layer and the head).
"""

from pgolf.model.backend import override_backend, resolve_backend
from pgolf.model.gpt import (
    CONTROL_NAMES,
    GPT,
    num_skip_connections,
    param_role,
    recurrence_indices,
)
from pgolf.model.layers import CastedLinear

__all__ = [
    "CONTROL_NAMES",
    "GPT",
    "CastedLinear",
    "num_skip_connections",
    "override_backend",
    "param_role",
    "recurrence_indices",
    "resolve_backend",
]
