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

A group's starting setting is the bits and clip of its members' rule in the quant rule table
(pgolf.quant.rules: per-class clips, head settings, the clip mode's width-scaled k), and an override is that
same rule with only its bits and clip replaced (`override_rules`): method, Hessian clip, clip search and
LQER eligibility stay what the table says, so a group at its base setting requantizes to identical codes.

LQER (quant.lqer_top_k) factors are recomputed for the current codes at every real-size check instead of
reserving their bytes up front: which tensors have the largest error (and so which shapes, and how many
factor bytes) changes as groups are coarsened, so only the factors of the candidate codes give the exact
size; their SVDs cost milliseconds next to an encode. The search itself works on the codes alone.
"""

from __future__ import annotations

import dataclasses
import glob
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pgolf.config.schema import QuantConfig
from pgolf.quant.codecs import encode_with
from pgolf.quant.pergroup import code_groups, colmajor_bytes
from pgolf.quant.rules import QuantRule, rules_from_config
from pgolf.quant.scheme import (
    LQER_CLASS,
    QuantizedTensor,
    RoleFn,
    TensorPlan,
    default_role_fn,
    dequantize_tensor,
    lqer_entries,
    plan_tensors,
    quantize_state_dict,
)

CLIP_STEP = 1.25  # each clip change widens k by this factor (~0.32 bit per weight at fixed bits)
MAX_CLIP_SIGMAS = 256.0  # beyond this nearly every code is 0 already
MIN_BITS = 2
CLIPPED_METHODS = ("gptq", "rtn")  # the rule methods whose scales follow the clip k (int8-row: abs-max)


class FitError(ValueError):
    """The artifact cannot be brought under the cap by any change the fit step knows."""


@dataclass(frozen=True)
class GroupSetting:
    bits: int
    clip_sigmas: float


def base_settings(
    qtensors: Mapping[str, QuantizedTensor], plans: Mapping[str, TensorPlan]
) -> dict[str, GroupSetting]:
    """The configured bits and clip of every code group: its members' rule in the rule table."""
    out = {}
    for g, members in code_groups(dict(qtensors)).items():
        found = {GroupSetting(plans[qt.name].bits, plans[qt.name].clip_sigmas) for qt in members}
        if len(found) != 1:  # the table routes a tensor kind by name and class, so layers agree
            raise ValueError(f"quant fit: code group {g!r} mixes rule settings {sorted(map(str, found))}")
        out[g] = found.pop()
    return out


def override_rules(
    plans: Mapping[str, TensorPlan], names_settings: Mapping[str, GroupSetting], qcfg: QuantConfig
) -> list[QuantRule]:
    """The config's rule table with, first, one rule per overridden tensor: its own rule with the bits and
    clip of the override and a pattern matching its name alone."""
    first = [
        dataclasses.replace(
            plans[n].rule,
            name=f"fit: {plans[n].rule.name} int{s.bits} k={s.clip_sigmas:g}",
            pattern=glob.escape(n),
            bits=s.bits,
            clip_sigmas=s.clip_sigmas,
        )
        for n, s in names_settings.items()
    ]
    return first + rules_from_config(qcfg)


def _plans(state: Mapping[str, torch.Tensor], qcfg: QuantConfig, role_fn: RoleFn | None) -> dict[str, TensorPlan]:
    return {p.name: p for p in plan_tensors(state, qcfg, role_fn or default_role_fn())}


def _quantize_group(
    state: Mapping[str, torch.Tensor],
    hessians: Mapping[str, torch.Tensor],
    qcfg: QuantConfig,
    role_fn: RoleFn | None,
    plans: Mapping[str, TensorPlan],
    names: list[str],
    setting: GroupSetting,
    device: torch.device | str,
) -> dict[str, QuantizedTensor]:
    """Quantize only `names` by their rule with the group's setting (each tensor is quantized on its own, so
    this equals its entry of a whole-model quantization with these overrides); no LQER factors."""
    rules = override_rules(plans, dict.fromkeys(names, setting), qcfg)
    sub = {n: state[n] for n in names}
    q = dataclasses.replace(qcfg, lqer_top_k=0)
    return quantize_state_dict(sub, {n: hessians[n] for n in names if n in hessians}, q, role_fn, device, rules)


def quantize_with_overrides(
    state: Mapping[str, torch.Tensor],
    hessians: Mapping[str, torch.Tensor],
    qcfg: QuantConfig,
    role_fn: RoleFn | None = None,
    overrides: Mapping[str, GroupSetting] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, QuantizedTensor]:
    """quantize_state_dict with the code groups named in `overrides` quantized by their rule at their
    setting (LQER factors, when configured, for these codes)."""
    plans = _plans(state, qcfg, role_fn)
    overrides = overrides or {}
    groups = code_groups(quantize_state_dict(state, hessians, dataclasses.replace(qcfg, lqer_top_k=0), role_fn, device))
    unknown = [g for g in overrides if g not in groups]
    if unknown:
        raise ValueError(f"override for code group {unknown[0]!r}: no such group (groups: {', '.join(groups)})")
    per_name = {qt.name: overrides[g] for g in overrides for qt in groups[g]}
    return quantize_state_dict(state, hessians, qcfg, role_fn, device, override_rules(plans, per_name, qcfg))


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


def _candidates(setting: GroupSetting, rule: QuantRule) -> list[tuple[str, GroupSetting]]:
    out = []
    if setting.bits > MIN_BITS:
        out.append(("bits", GroupSetting(setting.bits - 1, setting.clip_sigmas)))
    clipped = rule.method in CLIPPED_METHODS and setting.clip_sigmas > 0
    if clipped and setting.clip_sigmas * CLIP_STEP <= MAX_CLIP_SIGMAS:
        out.append(("clip", GroupSetting(setting.bits, round(setting.clip_sigmas * CLIP_STEP, 4))))
    return out


def _coarsest(setting: GroupSetting, rule: QuantRule) -> GroupSetting:
    clipped = rule.method in CLIPPED_METHODS and setting.clip_sigmas > 0
    return GroupSetting(MIN_BITS, MAX_CLIP_SIGMAS if clipped else setting.clip_sigmas)


class _Fitting:
    """What the search needs at hand: the run's tensors, plans and encode, and the LQER re-attachment."""

    def __init__(self, state, hessians, qcfg, role_fn, device, encode):
        self.state, self.hessians, self.qcfg, self.role_fn, self.device = state, hessians, qcfg, role_fn, device
        self.plans = _plans(state, qcfg, role_fn)
        self._encode = encode

    def requantize(self, members: list[QuantizedTensor], setting: GroupSetting) -> dict[str, QuantizedTensor]:
        names = [qt.name for qt in members]
        return _quantize_group(
            self.state, self.hessians, self.qcfg, self.role_fn, self.plans, names, setting, self.device
        )

    def encode(self, codes: dict[str, QuantizedTensor]) -> tuple[dict[str, QuantizedTensor], tuple]:
        """The artifact of `codes` with the LQER factors of these very codes (see the module docstring)."""
        full = dict(codes)
        if self.qcfg.lqer_top_k > 0:
            full.update(lqer_entries(self.state, codes, list(self.plans.values()), self.qcfg))
        return full, self._encode(full)


def _check_reachable(fitting: _Fitting, codes, settings, budget_bytes) -> None:
    """FitError at once when even every code group at its coarsest setting is over the budget."""
    floor = dict(codes)
    for g, members in code_groups(floor).items():
        floor.update(fitting.requantize(members, _coarsest(settings[g], fitting.plans[members[0].name].rule)))
    smallest = len(fitting.encode(floor)[1][0])
    if smallest > budget_bytes:
        raise FitError(
            f"cannot fit the artifact under quant.cap_bytes={fitting.qcfg.cap_bytes:,} (artifact budget "
            f"{budget_bytes:,} B): even with every code group at int{MIN_BITS} and clip {MAX_CLIP_SIGMAS:g} "
            f"sigmas it is {smallest:,} B (scales, passthrough tensors, LQER factors and headers); raise "
            "quant.cap_bytes or train a smaller model"
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
    artifact bytes, <= budget_bytes; FitError when impossible. `qtensors` is quantize_state_dict's output
    for `qcfg` (LQER factors included when configured); the result carries the factors of the fitted codes.

    `encode` turns tensors into a tuple whose first item is the artifact bytes (the run's container and
    codecs: pgolf.quant.artifact.encode_configured)."""
    encoded = encode(qtensors)
    total = len(encoded[0])
    if total <= budget_bytes:
        return dict(qtensors), encoded, {"budget_bytes": budget_bytes, "overrides": {}, "changes": []}
    fitting = _Fitting(state, hessians, qcfg, role_fn, device, encode)
    codes = {n: qt for n, qt in qtensors.items() if qt.cls != LQER_CLASS}
    groups = code_groups(codes)
    settings = base_settings(codes, fitting.plans)
    rule_of = {g: fitting.plans[members[0].name].rule for g, members in groups.items()}
    _check_reachable(fitting, codes, settings, budget_bytes)
    overrides: dict[str, GroupSetting] = {}
    changes: list[dict[str, Any]] = []
    current = {g: (proxy_cost(m, state, hessians), group_bytes(m)) for g, m in groups.items()}
    cache: dict[str, list[tuple[str, GroupSetting, dict[str, QuantizedTensor], float, int]]] = {}
    while total > budget_bytes:
        best = None
        for g, members in groups.items():
            if g not in cache:
                cache[g] = []
                for kind, setting in _candidates(settings[g], rule_of[g]):
                    new = fitting.requantize(members, setting)
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
        codes.update(new)
        groups = code_groups(codes)
        current[g] = (proxy, nbytes)
        del cache[g]
        total -= saved
        if total <= budget_bytes:  # the estimate fits: measure the real artifact, LQER factors included
            qtensors, encoded = fitting.encode(codes)
            total = len(encoded[0])
        change["artifact_bytes"] = total
        changes.append(change)
        log(
            f"quant fit: {g} int{change['bits'][0]}->int{setting.bits} k {change['clip_sigmas'][0]:g}->"
            f"{setting.clip_sigmas:g}: -{saved:,} B (proxy {change['proxy_cost']:+.4g}), artifact "
            f"{total:,} B (budget {budget_bytes:,})"
        )
    summary = {
        "budget_bytes": budget_bytes,
        "overrides": {g: dataclasses.asdict(s) for g, s in overrides.items()},
        "changes": changes,
    }
    return qtensors, encoded, summary
