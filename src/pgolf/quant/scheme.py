"""Which tensor is quantized how (SPEC §4.5), and quantizing / dequantizing a whole state_dict.

Every tensor of the model's state_dict gets a class (its `param_role`: matrix | embed | head | control) and
a scheme:
* `int{b}`  — per-row symmetric integers in an int8 container + one fp16 scale per row (matrices:
  quant.matrix_bits / matrix_clip_sigmas; embedding and untied head: embed_bits / embed_clip_sigmas);
  GPTQ when a Hessian is available and quant.method == "gptq", round-to-nearest otherwise;
* `fp16`    — passthrough, restored to the model's dtype on load. By default by role (control tensors);
  quant.passthrough = "size" keeps the records' rule instead (every float tensor of <= 65,536 elements);
  matrix_bits / embed_bits = 16 store that whole class in fp16 (a model small enough for the cap unquantized);
* `raw`     — non-float tensors, stored as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from pgolf.config.schema import QuantConfig
from pgolf.quant.gptq import (
    dequantize,
    gptq_quantize,
    percentile_clip_scales,
    rtn_quantize,
    sdclip_scales,
)

SIZE_PASSTHROUGH_MAX = 65_536  # the records' "small tensors stay fp16" threshold (quant.passthrough=size)
CLASSES = ("matrix", "embed", "head", "control")

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


def default_role_fn() -> RoleFn:
    from pgolf.model import param_role

    return param_role


def plan_tensors(state: Mapping[str, torch.Tensor], qcfg: QuantConfig, role_fn: RoleFn) -> list[TensorPlan]:
    """The storage plan of every state_dict entry, in state_dict order."""
    for key in ("matrix_bits", "embed_bits"):
        if not (2 <= getattr(qcfg, key) <= 8 or getattr(qcfg, key) == 16):
            raise ValueError(
                f"quant.{key}={getattr(qcfg, key)} must be in [2, 8] (integers in an int8 container) "
                "or 16 (fp16 passthrough)"
            )
    plans = []
    for name, t in state.items():
        cls = role_fn(name, t)
        if cls not in CLASSES:
            raise ValueError(f"param_role({name!r}) returned {cls!r}; expected one of {', '.join(CLASSES)}")
        if not t.is_floating_point():
            plans.append(TensorPlan(name, cls, "raw", t.element_size() * 8))
            continue
        small = t.numel() <= SIZE_PASSTHROUGH_MAX
        keep = (cls == "control" or t.dim() != 2) if qcfg.passthrough == "role" else (small or t.dim() != 2)
        bits = qcfg.matrix_bits if cls == "matrix" else qcfg.embed_bits
        if keep or bits == 16:
            plans.append(TensorPlan(name, cls, "fp16", 16))
        elif cls == "matrix":
            plans.append(
                TensorPlan(
                    name, cls, f"int{qcfg.matrix_bits}", qcfg.matrix_bits, qcfg.matrix_clip_sigmas, True
                )
            )
        else:  # embed / head
            hc = qcfg.hessian_clip_embed
            plans.append(
                TensorPlan(name, cls, f"int{qcfg.embed_bits}", qcfg.embed_bits, qcfg.embed_clip_sigmas, hc)
            )
    return plans


def _row_scales(
    W: torch.Tensor, plan: TensorPlan, h_diag: torch.Tensor | None, qcfg: QuantConfig
) -> torch.Tensor:
    if qcfg.clip_percentile > 0:
        return percentile_clip_scales(W, plan.bits, qcfg.clip_percentile)
    lam = qcfg.hessian_clip_lambda if plan.hessian_clip else 0.0
    if lam and h_diag is None:
        raise ValueError(
            f"{plan.name}: quant.hessian_clip_lambda={lam} needs a Hessian for this tensor "
            "(set quant.calibration_batches > 0)"
        )
    return sdclip_scales(W, plan.bits, plan.clip_sigmas, h_diag, lam)


def quantize_state_dict(
    state: Mapping[str, torch.Tensor],
    hessians: Mapping[str, torch.Tensor],
    qcfg: QuantConfig,
    role_fn: RoleFn | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, QuantizedTensor]:
    """Quantize every entry of `state` per `plan_tensors`; GPTQ runs once per (shape, bits) group, on
    `device` (the accelerator when there is one); the results live on the CPU."""
    role_fn = role_fn or default_role_fn()
    plans = plan_tensors(state, qcfg, role_fn)
    out: dict[str, QuantizedTensor] = {}
    groups: dict[tuple, list[TensorPlan]] = {}
    for p in plans:
        t = state[p.name].detach().cpu()
        if p.scheme == "raw":
            out[p.name] = QuantizedTensor(p.name, p.cls, p.scheme, p.bits, t.clone(), None, t.dtype)
        elif p.scheme == "fp16":
            out[p.name] = QuantizedTensor(p.name, p.cls, p.scheme, 16, t.to(torch.float16), None, t.dtype)
        else:
            use_h = p.name in hessians
            if qcfg.method == "gptq" and not use_h and p.cls == "matrix":
                raise ValueError(
                    f"{p.name}: quant.method=gptq needs its Hessian; none was collected "
                    "(quant.calibration_batches must be > 0, or use quant.method=rtn)"
                )
            groups.setdefault((tuple(t.shape), p.bits, use_h, p.cls), []).append(p)

    for (_, bits, use_h, _), group in groups.items():
        W = torch.stack([state[p.name].detach().to(device, torch.float32) for p in group])
        H = (
            torch.stack([hessians[p.name].detach().to(device, torch.float32) for p in group])
            if use_h
            else None
        )
        h_diag = H.diagonal(dim1=-2, dim2=-1) if H is not None else None
        # scales per tensor (plans in a group share bits and class, hence k and the clip flag)
        S = _row_scales(W, group[0], h_diag, qcfg)
        if qcfg.method == "gptq" and H is not None:
            Q = gptq_quantize(W, H, S, bits, qcfg.gptq_damp, qcfg.gptq_block_size)
        else:
            Q = rtn_quantize(W, S, bits)
        for i, p in enumerate(group):
            dtype = state[p.name].dtype
            out[p.name] = QuantizedTensor(p.name, p.cls, p.scheme, bits, Q[i].cpu(), S[i].cpu(), dtype)
    return {p.name: out[p.name] for p in plans}


def dequantize_tensor(qt: QuantizedTensor) -> torch.Tensor:
    """The tensor a stored entry stands for, in its original dtype (W = q·s_r for int schemes)."""
    if qt.scheme == "raw":
        return qt.data.clone()
    if qt.scheme == "fp16":
        return qt.data.to(qt.dtype)
    assert qt.scale is not None
    return dequantize(qt.data, qt.scale, qt.dtype)


def dequantize_state_dict(qtensors: Mapping[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    return {name: dequantize_tensor(qt) for name, qt in qtensors.items()}
