"""Cap fitting (issue 14.1): after quantization, make the artifact fit quant.cap_bytes at the least cost.

While the artifact is over its byte budget, every code group (pgolf.quant.pergroup.group_of: the embedding,
attn.c_q, ..., mlp.proj across layers) has two candidate changes, one bit less or a clip `CLIP_STEP` times
wider (coarser steps, fewer distinct codes), and the one with the smallest increase in the bpb proxy per byte
saved is applied. The proxy is the Hessian-weighted quantization error sum over tensors of trace(E H Eᵀ),
E = W − Q·s (the GPTQ objective: the squared error of the layer outputs on the calibration data; the
Frobenius norm where no Hessian was collected); the bytes are measured by compressing the group the way
the artifact will. Changes accumulate in a per-group override dict {group: GroupSetting} that
`quantize_with_overrides` applies on top of the configured plan; a full encode checks the real size
whenever the estimate says it fits. When no change saves bytes any more the model cannot be fitted:
FitError names the cap, and no over-cap artifact is ever written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pgolf.config.schema import QuantConfig
from pgolf.quant.codecs import encode_with
from pgolf.quant.pergroup import code_groups, colmajor_bytes
from pgolf.quant.scheme import QuantizedTensor, RoleFn, dequantize_tensor, quantize_state_dict

CLIP_STEP = 1.25  # each clip change widens k by this factor (~0.32 bit per weight at fixed bits)
MAX_CLIP_SIGMAS = 256.0  # beyond this nearly every code is 0 already
MIN_BITS = 2


class FitError(ValueError):
    """The artifact cannot be brought under the cap by any change the fit step knows."""


@dataclass(frozen=True)
class GroupSetting:
    bits: int
    clip_sigmas: float


def base_settings(qtensors: Mapping[str, QuantizedTensor], qcfg: QuantConfig) -> dict[str, GroupSetting]:
    """The configured bits and clip of every code group."""
    out = {}
    for g, members in code_groups(dict(qtensors)).items():
        k = qcfg.matrix_clip_sigmas if members[0].cls == "matrix" else qcfg.embed_clip_sigmas
        out[g] = GroupSetting(members[0].bits, k)
    return out


def _quantize_group(
    state: Mapping[str, torch.Tensor],
    hessians: Mapping[str, torch.Tensor],
    qcfg: QuantConfig,
    role_fn: RoleFn | None,
    names: list[str],
    cls: str,
    setting: GroupSetting,
    device: torch.device | str,
) -> dict[str, QuantizedTensor]:
    """Quantize only `names` with the group's setting (each tensor is quantized on its own, so this equals
    its entry of a whole-model quantization with these bits and clip)."""
    if cls == "matrix":
        q = dataclasses.replace(qcfg, matrix_bits=setting.bits, matrix_clip_sigmas=setting.clip_sigmas)
    else:
        q = dataclasses.replace(qcfg, embed_bits=setting.bits, embed_clip_sigmas=setting.clip_sigmas)
    sub = {n: state[n] for n in names}
    return quantize_state_dict(sub, {n: hessians[n] for n in names if n in hessians}, q, role_fn, device)


def quantize_with_overrides(
    state: Mapping[str, torch.Tensor],
    hessians: Mapping[str, torch.Tensor],
    qcfg: QuantConfig,
    role_fn: RoleFn | None = None,
    overrides: Mapping[str, GroupSetting] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, QuantizedTensor]:
    """quantize_state_dict, then the code groups named in `overrides` requantized with their setting."""
    out = quantize_state_dict(state, hessians, qcfg, role_fn, device)
    groups = code_groups(out)
    for g, setting in (overrides or {}).items():
        if g not in groups:
            raise ValueError(f"override for code group {g!r}: no such group (groups: {', '.join(groups)})")
        names = [qt.name for qt in groups[g]]
        out.update(_quantize_group(state, hessians, qcfg, role_fn, names, groups[g][0].cls, setting, device))
    return out


def proxy_cost(
    qts: list[QuantizedTensor], state: Mapping[str, torch.Tensor], hessians: Mapping[str, torch.Tensor]
) -> float:
    """Σ trace(E H Eᵀ) over the tensors, E = W − dequantized W (H = I where no Hessian exists)."""
    total = 0.0
    for qt in qts:
        E = state[qt.name].detach().cpu().float() - dequantize_tensor(qt).float()
        H = hessians.get(qt.name)
        total += float((E @ H.cpu().float() * E).sum()) if H is not None else float((E * E).sum())
    return total


def group_bytes(members: list[QuantizedTensor]) -> int:
    """The bytes estimate of a code group during the search: its order-0 ANS coding, within ~1% of the
    entropy bound and milliseconds to compute; the chosen codecs are at most this (or a little more, on
    tiny groups), and the real size is measured by a full encode before the fit is accepted."""
    return len(encode_with(b"".join(colmajor_bytes(qt.data) for qt in members), "ans"))


def _candidates(setting: GroupSetting) -> list[tuple[str, GroupSetting]]:
    out = []
    if setting.bits > MIN_BITS:
        out.append(("bits", GroupSetting(setting.bits - 1, setting.clip_sigmas)))
    if setting.clip_sigmas * CLIP_STEP <= MAX_CLIP_SIGMAS:
        out.append(("clip", GroupSetting(setting.bits, round(setting.clip_sigmas * CLIP_STEP, 4))))
    return out


def _check_reachable(state, hessians, qtensors, qcfg, budget_bytes, encode, role_fn, device) -> None:
    """FitError at once when even every code group at its coarsest setting is over the budget."""
    coarsest = GroupSetting(MIN_BITS, MAX_CLIP_SIGMAS)
    floor = dict(qtensors)
    for members in code_groups(floor).values():
        names = [qt.name for qt in members]
        floor.update(_quantize_group(state, hessians, qcfg, role_fn, names, members[0].cls, coarsest, device))
    smallest = len(encode(floor)[0])
    if smallest > budget_bytes:
        raise FitError(
            f"cannot fit the artifact under quant.cap_bytes={qcfg.cap_bytes:,} (artifact budget "
            f"{budget_bytes:,} B): even with every code group at int{MIN_BITS} and clip {MAX_CLIP_SIGMAS:g} "
            f"sigmas it is {smallest:,} B (scales, passthrough tensors and headers); raise quant.cap_bytes "
            "or train a smaller model"
        )


def fit_to_cap(
    state: Mapping[str, torch.Tensor],
    hessians: Mapping[str, torch.Tensor],
    qtensors: dict[str, QuantizedTensor],
    qcfg: QuantConfig,
    budget_bytes: int,
    encode: Callable[[dict[str, QuantizedTensor]], tuple],
    role_fn: RoleFn | None = None,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> tuple[dict[str, QuantizedTensor], tuple, dict[str, Any]]:
    """(qtensors, encode(qtensors), {"budget_bytes", "overrides", "changes"}) with encode(...)[0], the
    artifact bytes, <= budget_bytes; FitError when impossible.

    `encode` turns tensors into a tuple whose first item is the artifact bytes (the run's container and
    codecs: pgolf.quant.artifact.encode_configured)."""
    encoded = encode(qtensors)
    qtensors = dict(qtensors)
    settings = base_settings(qtensors, qcfg)
    overrides: dict[str, GroupSetting] = {}
    changes: list[dict[str, Any]] = []
    groups = code_groups(qtensors)
    if len(encoded[0]) > budget_bytes:
        _check_reachable(state, hessians, qtensors, qcfg, budget_bytes, encode, role_fn, device)
    current = {g: (proxy_cost(m, state, hessians), group_bytes(m)) for g, m in groups.items()}
    cache: dict[str, list[tuple[str, GroupSetting, dict[str, QuantizedTensor], float, int]]] = {}
    total = len(encoded[0])
    while total > budget_bytes:
        best = None
        for g, members in groups.items():
            if g not in cache:
                cache[g] = []
                for kind, setting in _candidates(settings[g]):
                    names = [qt.name for qt in members]
                    new = _quantize_group(
                        state, hessians, qcfg, role_fn, names, members[0].cls, setting, device
                    )
                    m = list(new.values())
                    cache[g].append((kind, setting, new, proxy_cost(m, state, hessians), group_bytes(m)))
            proxy0, bytes0 = current[g]
            for kind, setting, new, proxy, nbytes in cache[g]:
                saved = bytes0 - nbytes
                if saved > 0 and (best is None or (proxy - proxy0) / saved < best[0]):
                    best = ((proxy - proxy0) / saved, g, kind, setting, new, proxy, nbytes)
        if best is None:
            raise FitError(
                f"cannot fit the artifact under quant.cap_bytes={qcfg.cap_bytes:,} (artifact budget "
                f"{budget_bytes:,} B): {total:,} B with every code group at its coarsest setting "
                f"({', '.join(f'{g} int{s.bits} k={s.clip_sigmas:g}' for g, s in settings.items())}); "
                "raise quant.cap_bytes or train a smaller model"
            )
        _, g, kind, setting, new, proxy, nbytes = best
        saved = current[g][1] - nbytes
        change = {
            "group": g,
            "change": kind,
            "bits": [settings[g].bits, setting.bits],
            "clip_sigmas": [settings[g].clip_sigmas, setting.clip_sigmas],
            "bytes_saved": saved,
            "proxy_cost": proxy - current[g][0],
        }
        settings[g] = overrides[g] = setting
        qtensors.update(new)
        groups = code_groups(qtensors)
        current[g] = (proxy, nbytes)
        del cache[g]
        total -= saved
        if total <= budget_bytes:  # the estimate fits: measure the real artifact
            encoded = encode(qtensors)
            total = len(encoded[0])
        change["artifact_bytes"] = total
        changes.append(change)
        log(
            f"quant fit: {g} int{change['bits'][0]}->int{setting.bits} k {change['clip_sigmas'][0]:g}->"
            f"{setting.clip_sigmas:g}: -{saved:,} B (proxy +{change['proxy_cost']:.4g}), artifact "
            f"{total:,} B (budget {budget_bytes:,})"
        )
    summary = {
        "budget_bytes": budget_bytes,
        "overrides": {g: dataclasses.asdict(s) for g, s in overrides.items()},
        "changes": changes,
    }
    return qtensors, encoded, summary
