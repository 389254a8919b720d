"""Which tensor is quantized how (SPEC §4.5), and quantizing / dequantizing a whole state_dict.

Every tensor of the model's state_dict gets a class (its `param_role`: matrix | embed | head | control) and
the first matching rule of the quant config's table (pgolf.quant.rules), which gives its scheme:
* `int{b}`  — per-row symmetric integers in an int8 container + one fp16 scale per row: GPTQ when a Hessian
  is available and the rule's method is gptq, round-to-nearest otherwise; SDClip scales (k from the rule);
  the attention gate's `int8-row` rule uses abs-max scales max|W_r|/127 instead;
* `fp16`    — passthrough, restored to the model's dtype on load;
* `raw`     — non-float tensors, stored as they are;
* `lqer`    — the LQER factors of a corrected tensor X, stored as entries X.lqer_qa / _sa / _qb / _sb of class
  "lqer" (pgolf.quant.lqer) and folded back into X by dequantize_state_dict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from pgolf.config.schema import QuantConfig
from pgolf.quant.gptq import (
    absmax_scales,
    dequantize,
    gptq_quantize,
    percentile_clip_scales,
    rtn_quantize,
    sdclip_scales,
)
from pgolf.quant.lqer import LqerFactors, lqer_correction, lqer_eligible, lqer_factors, top_k_by_error
from pgolf.quant.rules import (
    CLIP_SEARCH_FACTORS,
    QuantRule,
    match_rule,
    rules_from_config,
)

CLASSES = ("matrix", "embed", "head", "control")
LQER_CLASS = "lqer"
LQER_PARTS = ("qa", "sa", "qb", "sb")  # entry X.lqer_<part> holds LqerFactors.<part> of tensor X

RoleFn = Callable[[str, torch.Tensor], str]


@dataclass(frozen=True)
class TensorPlan:
    """How one state_dict entry is stored."""

    name: str
    cls: str  # matrix | embed | head | control
    scheme: str  # int{b} | fp16 | raw
    bits: int  # quantization bits, 16 for fp16, the dtype's bits for raw
    clip_sigmas: float = 0.0  # SDClip k (quantized schemes only)
    hessian_clip: bool = False  # apply the Hessian-aware clip factor (quant.hessian_clip_lambda)
    rule: QuantRule | None = None  # the rule that matched (pgolf.quant.rules)


@dataclass
class QuantizedTensor:
    """One stored tensor: `data` is int8 q (int schemes), fp16 values (fp16) or the tensor itself (raw)."""

    name: str
    cls: str
    scheme: str
    bits: int
    data: torch.Tensor
    scale: torch.Tensor | None  # fp16 [rows] for int schemes
    dtype: torch.dtype  # the original dtype: what dequantization returns
    clip_sigmas: float = 0.0  # the k used (reported; not stored in the artifact)


def default_role_fn() -> RoleFn:
    from pgolf.model import param_role

    return param_role


def plan_tensors(
    state: Mapping[str, torch.Tensor],
    qcfg: QuantConfig,
    role_fn: RoleFn,
    rules: list[QuantRule] | None = None,
) -> list[TensorPlan]:
    """The storage plan of every state_dict entry, in state_dict order (the first matching rule decides);
    `rules` replaces the config's table (the cap fit prepends its per-tensor overrides, quant/fit.py)."""
    rules = rules_from_config(qcfg) if rules is None else rules
    plans = []
    for name, t in state.items():
        cls = role_fn(name, t)
        if cls not in CLASSES:
            raise ValueError(f"param_role({name!r}) returned {cls!r}; expected one of {', '.join(CLASSES)}")
        rule = match_rule(rules, name, t, cls)
        if rule.method == "raw":
            plans.append(TensorPlan(name, cls, "raw", t.element_size() * 8, rule=rule))
        elif rule.method == "fp16":
            plans.append(TensorPlan(name, cls, "fp16", 16, rule=rule))
        else:
            k, hc = rule.clip_sigmas, rule.hessian_clip
            plans.append(TensorPlan(name, cls, f"int{rule.bits}", rule.bits, k, hc, rule))
    return plans


def _row_scales(
    W: torch.Tensor, plan: TensorPlan, H: torch.Tensor | None, qcfg: QuantConfig
) -> tuple[torch.Tensor, list[float]]:
    """Scales [N, rows] for a stack of same-plan tensors and the k each one used."""
    n = W.shape[0]
    if qcfg.clip_percentile > 0:
        return percentile_clip_scales(W, plan.bits, qcfg.clip_percentile), [0.0] * n
    lam = qcfg.hessian_clip_lambda if plan.hessian_clip else 0.0
    if lam and H is None:
        raise ValueError(
            f"{plan.name}: quant.hessian_clip_lambda={lam} needs a Hessian for this tensor "
            "(set quant.calibration_batches > 0)"
        )
    h_diag = H.diagonal(dim1=-2, dim2=-1) if H is not None else None
    k = plan.clip_sigmas
    if plan.rule is None or not plan.rule.clip_search:
        return sdclip_scales(W, plan.bits, k, h_diag, lam), [k] * n
    # search: the k·f of the grid with the smallest (Hessian-weighted) round-to-nearest error, per tensor
    best_err = torch.full((n,), float("inf"), dtype=torch.float64)
    best_S, best_k = None, [k] * n
    for f in CLIP_SEARCH_FACTORS:
        S = sdclip_scales(W, plan.bits, k * f, h_diag, lam)
        D = (W - dequantize(rtn_quantize(W, S, plan.bits), S)).double()
        err = ((D @ H.double()) * D if H is not None else D * D).sum((1, 2))  # tr(D H Dᵀ) per tensor
        err = err.cpu()
        better = err < best_err
        best_S = S if best_S is None else torch.where(better.to(S.device).unsqueeze(-1), S, best_S)
        best_err = torch.where(better, err, best_err)
        best_k = [k * f if b else old for b, old in zip(better.tolist(), best_k)]
    return best_S, best_k


def quantize_state_dict(
    state: Mapping[str, torch.Tensor],
    hessians: Mapping[str, torch.Tensor],
    qcfg: QuantConfig,
    role_fn: RoleFn | None = None,
    device: torch.device | str = "cpu",
    rules: list[QuantRule] | None = None,
) -> dict[str, QuantizedTensor]:
    """Quantize every entry of `state` per `plan_tensors` (`rules`: see there); GPTQ runs once per (shape,
    bits) group, on `device` (the accelerator when there is one); the results live on the CPU. With
    quant.lqer_top_k > 0 the LQER factors of the chosen tensors follow the plan's entries (class "lqer")."""
    role_fn = role_fn or default_role_fn()
    plans = plan_tensors(state, qcfg, role_fn, rules)
    out: dict[str, QuantizedTensor] = {}
    groups: dict[tuple, list[TensorPlan]] = {}
    for p in plans:
        t = state[p.name].detach().cpu()
        if p.scheme == "raw":
            out[p.name] = QuantizedTensor(p.name, p.cls, p.scheme, p.bits, t.clone(), None, t.dtype)
        elif p.scheme == "fp16":
            out[p.name] = QuantizedTensor(p.name, p.cls, p.scheme, 16, t.to(torch.float16), None, t.dtype)
        elif p.rule is not None and p.rule.method == "int8-row":
            S = absmax_scales(t, p.bits)
            out[p.name] = QuantizedTensor(p.name, p.cls, p.scheme, p.bits, rtn_quantize(t, S, p.bits), S, t.dtype)
        else:
            use_h = p.name in hessians
            method = p.rule.method if p.rule is not None else qcfg.method
            if method == "gptq" and not use_h and p.cls == "matrix":
                raise ValueError(
                    f"{p.name}: quant.method=gptq needs its Hessian; none was collected "
                    "(quant.calibration_batches must be > 0, or use quant.method=rtn)"
                )
            search = p.rule is not None and p.rule.clip_search
            key = (tuple(t.shape), p.bits, use_h, p.cls, p.clip_sigmas, p.hessian_clip, method, search)
            groups.setdefault(key, []).append(p)

    for (_, bits, use_h, _, _, _, method, _), group in groups.items():
        W = torch.stack([state[p.name].detach().to(device, torch.float32) for p in group])
        H = (
            torch.stack([hessians[p.name].detach().to(device, torch.float32) for p in group])
            if use_h
            else None
        )
        # scales per tensor (plans in a group share bits, k, the clip flags and the method)
        S, ks = _row_scales(W, group[0], H, qcfg)
        if method == "gptq" and H is not None:
            Q = gptq_quantize(W, H, S, bits, qcfg.gptq_damp, qcfg.gptq_block_size)
        else:
            Q = rtn_quantize(W, S, bits)
        for i, p in enumerate(group):
            dtype = state[p.name].dtype
            out[p.name] = QuantizedTensor(p.name, p.cls, p.scheme, bits, Q[i].cpu(), S[i].cpu(), dtype, ks[i])
    ordered = {p.name: out[p.name] for p in plans}
    if qcfg.lqer_top_k > 0:
        ordered.update(lqer_entries(state, ordered, plans, qcfg))
    return ordered


def lqer_entries(
    state: Mapping[str, torch.Tensor],
    qtensors: Mapping[str, QuantizedTensor],
    plans: list[TensorPlan],
    qcfg: QuantConfig,
) -> dict[str, QuantizedTensor]:
    """LQER factors for the quant.lqer_top_k candidate tensors with the largest ‖W − diag(s)Q‖_F."""
    errors = {}
    for p in plans:
        qt = qtensors[p.name]
        if p.rule is None or not p.rule.lqer or qt.scale is None:
            continue
        if lqer_eligible(tuple(qt.data.shape), qcfg.lqer_rank, qcfg.lqer_group):
            E = state[p.name].detach().cpu().float() - dequantize(qt.data, qt.scale)
            errors[p.name] = float(torch.linalg.matrix_norm(E))
    entries = {}
    for name in top_k_by_error(errors, qcfg.lqer_top_k):
        qt = qtensors[name]
        E = state[name].detach().cpu().float() - dequantize(qt.data, qt.scale)
        f = lqer_factors(E, qcfg.lqer_rank, qcfg.lqer_group)
        bits = {"qa": 2, "qb": 4, "sa": 16, "sb": 16}
        for part in LQER_PARTS:
            t = getattr(f, part)
            entries[f"{name}.lqer_{part}"] = QuantizedTensor(
                f"{name}.lqer_{part}", LQER_CLASS, "lqer", bits[part], t, None, t.dtype
            )
    return entries


def lqer_tensors(qtensors: Mapping[str, QuantizedTensor]) -> list[str]:
    """Names of the tensors that carry an LQER correction."""
    suffix = ".lqer_qa"
    return [n.removesuffix(suffix) for n in qtensors if n.endswith(suffix)]


def dequantize_tensor(qt: QuantizedTensor) -> torch.Tensor:
    """The tensor a stored entry stands for, in its original dtype (W = q·s_r for int schemes)."""
    if qt.scheme == "raw":
        return qt.data.clone()
    if qt.scheme == "fp16":
        return qt.data.to(qt.dtype)
    assert qt.scale is not None
    return dequantize(qt.data, qt.scale, qt.dtype)


def dequantize_state_dict(qtensors: Mapping[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """The state_dict the entries stand for; LQER entries are folded into their tensor in fp32 before the
    cast to its dtype: W = diag(s)·Q + (s_A·q_A)(q_B ⊙ s_B)."""
    corrected = lqer_tensors(qtensors)
    out = {}
    for name, qt in qtensors.items():
        if qt.cls == LQER_CLASS:
            continue
        if name in corrected:
            parts = {part: qtensors[f"{name}.lqer_{part}"].data for part in LQER_PARTS}
            assert qt.scale is not None
            W = dequantize(qt.data, qt.scale) + lqer_correction(LqerFactors(**parts))
            out[name] = W.to(qt.dtype)
        else:
            out[name] = dequantize_tensor(qt)
    return out
