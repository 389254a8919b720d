"""The per-tensor quantization rules: one ordered table says how every state_dict entry is stored.

`rules_from_config(quant)` turns the quant config into the table; `match_rule` returns the first rule whose
filters (name glob, class, dimensions, element count) accept a tensor. Every decision about a tensor's
bits, clip and method is read from its rule, so `pgolf quantize RUN --explain` can print it.

Rule order (SPEC-1855 §4.2 routing): non-float tensors raw; the attention gate (quant.gate_int8); the
passthrough rules (quant.passthrough); then by name and class: embedding, head, attention, MLP, other.
With quant.attn_clip_sigmas / mlp_clip_sigmas / head_bits / head_clip_sigmas at 0 the attention, MLP and
head rules take the matrix and embedding values, which is the plan the record presets have always had.

Clip modes (quant.clip_mode):
* sigma  — c_r = k·std_r with k as configured (the records' SDClip);
* step   — k is read as tuned at the width the records tuned it for (int6 matrices, int8 embedding/head)
           and scaled by R(b)/R(b_tuned), so the rounding step k/R in σ units stays what was tuned at any
           width (20σ at int8 is a 0.157σ step; at int6 that step is a 4.9σ clip, not 20σ);
* search — per tensor, k·f for f in CLIP_SEARCH_FACTORS (k as in `step`) minimising the Hessian-weighted
           round-to-nearest error tr(D H Dᵀ) (plain squared error when the tensor has no Hessian).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch

from pgolf.config.schema import QuantConfig

METHODS = ("gptq", "rtn", "int8-row", "fp16", "raw")
CLIP_MODES = ("sigma", "step", "search")
SIZE_PASSTHROUGH_MAX = 65_536  # the records' "small tensors stay fp16" threshold (quant.passthrough=size)
# The widths the record clip sigmas were tuned at (SPEC §4.4): what quant.clip_mode=step scales from.
CLIP_TUNED_BITS = {"matrix": 6, "embed": 8}
CLIP_SEARCH_FACTORS = (0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5)
# SPEC-1855 §4.3: int8 per-row storage only for names ending .attn_gate_w with 32 <= numel <= 8192.
GATE_PATTERN, GATE_MIN_NUMEL, GATE_MAX_NUMEL = "*.attn_gate_w", 32, 8192


@dataclass(frozen=True)
class QuantRule:
    """One row of the table: filters (which tensors), then what is done to them."""

    name: str  # what the rule stands for, printed by --explain
    pattern: str = "*"  # fnmatch glob on the state_dict name
    cls: str = "*"  # param_role class (matrix | embed | head | control) or "*"
    dims: tuple[int, ...] = ()  # accepted tensor ranks; () = any
    not_dims: tuple[int, ...] = ()  # rejected tensor ranks
    min_numel: int = 0
    max_numel: int = 0  # 0 = no bound
    floating: bool | None = True  # True: float tensors only; False: non-float only; None: both
    # gptq (GPTQ where a Hessian exists, else round to nearest) | rtn | int8-row | fp16 | raw
    method: str = "gptq"
    bits: int = 16
    clip_sigmas: float = 0.0  # SDClip k after the clip mode's width scaling (gptq / rtn)
    tuned_bits: int = 0  # the width clip_sigmas was tuned at (step / search modes scale from it)
    hessian_clip: bool = False  # apply the Hessian-aware clip factor (quant.hessian_clip_lambda)
    clip_search: bool = False  # search k per tensor over CLIP_SEARCH_FACTORS
    lqer: bool = False  # candidate for the LQER correction (quant.lqer_top_k)

    def matches(self, name: str, t: torch.Tensor, cls: str) -> bool:
        if self.floating is not None and t.is_floating_point() != self.floating:
            return False
        if self.cls != "*" and cls != self.cls:
            return False
        if (self.dims and t.dim() not in self.dims) or t.dim() in self.not_dims:
            return False
        n = t.numel()
        if n < self.min_numel or (self.max_numel and n > self.max_numel):
            return False
        return fnmatch.fnmatchcase(name, self.pattern)

    def describe(self) -> str:
        """The rule's filters in one line: `name  [pattern, class, dims, numel range]`."""
        parts = [self.pattern] if self.pattern != "*" else []
        if self.cls != "*":
            parts.append(f"class={self.cls}")
        if self.dims:
            parts.append("dim in " + ",".join(map(str, self.dims)))
        if self.not_dims:
            parts.append("dim not " + ",".join(map(str, self.not_dims)))
        if self.min_numel or self.max_numel:
            parts.append(f"numel {self.min_numel}..{self.max_numel or 'inf'}")
        if self.floating is False:
            parts.append("non-float")
        return f"{self.name} [{'; '.join(parts) or 'any'}]"


def qmax_of(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _check_bits(qcfg: QuantConfig, key: str, allow_zero: bool = False) -> None:
    v = getattr(qcfg, key)
    if not (2 <= v <= 8 or v == 16 or (allow_zero and v == 0)):
        extra = ", 0 (= embed_bits)" if allow_zero else ""
        raise ValueError(
            f"quant.{key}={v} must be in [2, 8] (integers in an int8 container) or 16 (fp16 passthrough){extra}"
        )


def _check(qcfg: QuantConfig) -> None:
    for key in ("matrix_bits", "embed_bits"):
        _check_bits(qcfg, key)
    _check_bits(qcfg, "head_bits", allow_zero=True)
    if qcfg.clip_mode not in CLIP_MODES:
        raise ValueError(f"quant.clip_mode={qcfg.clip_mode!r}; expected one of {', '.join(CLIP_MODES)}")
    for key in ("attn_clip_sigmas", "mlp_clip_sigmas", "head_clip_sigmas"):
        if getattr(qcfg, key) < 0:
            raise ValueError(f"quant.{key}={getattr(qcfg, key)} must be >= 0 (0 = the class default)")
    if qcfg.lqer_top_k < 0 or qcfg.lqer_rank < 1 or qcfg.lqer_group < 1:
        raise ValueError(
            f"quant.lqer_top_k={qcfg.lqer_top_k} must be >= 0, quant.lqer_rank={qcfg.lqer_rank} and "
            f"quant.lqer_group={qcfg.lqer_group} >= 1"
        )


def _quantized(
    name: str, qcfg: QuantConfig, bits: int, k: float, tuned: int, hc: bool, method: str, **filters
) -> QuantRule:
    """A GPTQ / RTN rule (fp16 when bits = 16), its k scaled per quant.clip_mode."""
    if bits == 16:
        return QuantRule(name, method="fp16", bits=16, **filters)
    if qcfg.clip_mode != "sigma":
        k = k * qmax_of(bits) / qmax_of(tuned)
    return QuantRule(
        name,
        method=method,
        bits=bits,
        clip_sigmas=k,
        tuned_bits=tuned,
        hessian_clip=hc,
        clip_search=qcfg.clip_mode == "search",
        lqer=qcfg.lqer_top_k > 0,
        **filters,
    )


def rules_from_config(qcfg: QuantConfig) -> list[QuantRule]:
    """The ordered rule table of a quant config (first match wins); raises ValueError on a bad field."""
    _check(qcfg)
    rules = [QuantRule("non-float", floating=False, method="raw", bits=0)]
    if qcfg.gate_int8:
        rules.append(
            QuantRule(
                "attention gate",
                GATE_PATTERN,
                min_numel=GATE_MIN_NUMEL,
                max_numel=GATE_MAX_NUMEL,
                dims=(2,),
                method="int8-row",
                bits=8,
            )
        )
    if qcfg.passthrough == "role":
        rules.append(QuantRule("passthrough: control", cls="control", method="fp16"))
    else:
        rules.append(QuantRule("passthrough: small", max_numel=SIZE_PASSTHROUGH_MAX, method="fp16"))
    rules.append(QuantRule("passthrough: not 2-D", not_dims=(2,), method="fp16"))

    mk, ek = qcfg.matrix_clip_sigmas, qcfg.embed_clip_sigmas
    mb, eb = qcfg.matrix_bits, qcfg.embed_bits
    hb, hk = qcfg.head_bits or eb, qcfg.head_clip_sigmas or ek
    mt, et = CLIP_TUNED_BITS["matrix"], CLIP_TUNED_BITS["embed"]
    hce, mm, em = qcfg.hessian_clip_embed, qcfg.method, qcfg.embed_method or qcfg.method
    rules += [
        _quantized("embedding", qcfg, eb, ek, et, hce, em, cls="embed"),
        _quantized("head", qcfg, hb, hk, et, hce, em, cls="head"),
        _quantized(
            "attention", qcfg, mb, qcfg.attn_clip_sigmas or mk, mt, True, mm, pattern="*.attn.*", cls="matrix"
        ),
        _quantized(
            "mlp", qcfg, mb, qcfg.mlp_clip_sigmas or mk, mt, True, mm, pattern="*.mlp.*", cls="matrix"
        ),
        _quantized("matrix", qcfg, mb, mk, mt, True, mm, cls="matrix"),
    ]
    # Float 2-D tensors of another class that no passthrough rule kept (quant.passthrough=size: large
    # control tensors) are quantized with the embedding's settings, the one choice pgolf has always made.
    rules.append(_quantized("other (embedding settings)", qcfg, eb, ek, et, hce, em))
    return rules


def match_rule(rules: list[QuantRule], name: str, t: torch.Tensor, cls: str) -> QuantRule:
    for rule in rules:
        if rule.matches(name, t, cls):
            return rule
    raise ValueError(f"no quantization rule matches tensor {name!r} (class {cls}, shape {tuple(t.shape)})")
