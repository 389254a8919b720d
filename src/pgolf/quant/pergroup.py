"""Code groups of the per-group artifact (SPEC-1855 §5): which stream a quantized tensor's codes go to,
how the stream is laid out, and the choice of codec and row order per group.

A code group holds the int codes of one tensor kind across layers (`blocks.3.attn.c_q.weight` → group
`attn.c_q`; the embedding → `embed`; any other 2-D quantized tensor → its own name), layers concatenated in
state_dict order. Each tensor is written column-major (its rows optionally permuted first), so adjacent bytes
are one input column across neighbouring output rows. Everything else (fp16 scales, passthrough, raw
tensors) goes to the `remainder` stream; row permutations to the `perms` stream.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pgolf.quant.codecs import encode_best, entropy_bound_bytes
from pgolf.quant.reorder import encode_orders, similarity_order
from pgolf.quant.scheme import QuantizedTensor, RoleFn

REMAINDER = "remainder"
PERMS = "perms"
EMBED = "embed"
_LAYER = re.compile(r"^blocks\.\d+\.(.+)$")


def group_of(qt: QuantizedTensor) -> str:
    """The stream of a tensor's codes: a code group for 2-D integer tensors, else the remainder."""
    if not qt.scheme.startswith("int") or qt.data.dim() != 2:
        return REMAINDER
    if qt.cls == "embed":
        return EMBED
    m = _LAYER.match(qt.name)
    return (m.group(1) if m else qt.name).removesuffix(".weight")


def check_reorder_groups(state: dict[str, torch.Tensor], role_fn: RoleFn, reorder: Sequence[str]) -> None:
    """Refuse quant.reorder_groups naming no code group of this model (before any long work)."""
    names = set()
    for name, t in state.items():
        cls = role_fn(name, t)
        if t.dim() == 2 and t.is_floating_point() and cls != "control":
            m = _LAYER.match(name)
            names.add(EMBED if cls == "embed" else (m.group(1) if m else name).removesuffix(".weight"))
    unknown = [g for g in reorder if g not in names]
    if unknown:
        raise ValueError(
            f"quant.reorder_groups: {unknown} name no code group of this model; expected some of "
            f"{', '.join(sorted(names))}"
        )


def colmajor_bytes(q: torch.Tensor, order: np.ndarray | None = None) -> bytes:
    """int8 codes [rows, cols] (rows taken in `order` when given) as column-major bytes."""
    arr = q.detach().cpu().to(torch.int8).numpy()
    if order is not None:
        arr = arr[order]
    return np.ascontiguousarray(arr.T).tobytes()


def from_colmajor(buf: bytes, shape: Sequence[int], order: np.ndarray | None = None) -> torch.Tensor:
    rows, cols = shape
    arr = np.frombuffer(buf, dtype=np.int8).reshape(cols, rows).T
    if order is not None:
        out = np.empty_like(arr)
        out[order] = arr  # stored row i is original row order[i]
        arr = out
    return torch.from_numpy(np.array(arr, order="C"))  # a copy: the buffer view is read-only


@dataclass
class GroupCoding:
    """One group's chosen coding and what the alternatives cost (for quant.json and the benchmark)."""

    name: str
    raw: bytes  # the stream as stored (after any reordering), before the codec
    codec: str
    blob: bytes
    tried: dict[str, int]  # codec -> bytes of the stored stream
    orders: dict[str, np.ndarray] = field(default_factory=dict)  # tensor name -> row order (reordered)
    perm_bytes: int = 0  # ANS-coded permutations of this group alone
    unordered_bytes: int = 0  # best coding without reordering (== len(blob) when not reordered)

    @property
    def entropy_bound(self) -> float:
        return entropy_bound_bytes(self.raw)


def encode_code_group(
    name: str, members: Sequence[QuantizedTensor], codecs: Sequence[str], reorder: bool
) -> GroupCoding:
    """The smallest coding of a code group; with `reorder`, the similarity order is kept only when its
    codes plus its permutations are smaller than the codes in their own order."""
    plain = b"".join(colmajor_bytes(qt.data) for qt in members)
    codec, blob, tried = encode_best(plain, codecs)
    best = GroupCoding(name, plain, codec, blob, tried, unordered_bytes=len(blob))
    if not reorder:
        return best
    orders = {qt.name: similarity_order(qt.data) for qt in members}
    sorted_raw = b"".join(colmajor_bytes(qt.data, orders[qt.name]) for qt in members)
    s_codec, s_blob, s_tried = encode_best(sorted_raw, codecs)
    perm_bytes = len(encode_orders(list(orders.values())))
    if len(s_blob) + perm_bytes < len(blob):
        return GroupCoding(name, sorted_raw, s_codec, s_blob, s_tried, orders, perm_bytes, len(blob))
    return best


def code_groups(qtensors: dict[str, QuantizedTensor]) -> dict[str, list[QuantizedTensor]]:
    """{group: members in state_dict order} for the code groups, in order of first appearance."""
    groups: dict[str, list[QuantizedTensor]] = {}
    for qt in qtensors.values():
        g = group_of(qt)
        if g != REMAINDER:
            groups.setdefault(g, []).append(qt)
    return groups
