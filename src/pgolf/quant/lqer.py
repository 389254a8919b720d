"""LQER: low-rank correction of the quantization error, asymmetric factor packing (SPEC-1855 §4.4).

For the quantized tensors with the largest ‖E‖_F, E = W − diag(s)·Q: a rank-r SVD E ≈ A·B with
A = U_r·diag(S_r) [rows × r] and B = V_rᵀ [r × cols]. A is stored as 2-bit signed codes in [−2, 1] with one
fp16 scale per matrix s_A = max|A| / 1.5; B as 4-bit signed codes in [−8, 7], flattened row-major into
groups of `group` values with one fp16 scale per group s_g = max|g| / 7.5. Load adds (s_A·q_A)(q_B ⊙ s_B)
back to diag(s)·Q. Codes sit one per int8 byte (the entropy coder removes the unused bits, as for int6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgolf.quant.gptq import FP16_TINY

A_MIN, A_MAX, A_DIV = -2, 1, 1.5  # 2-bit signed codes; s_A = max|A| / 1.5
B_MIN, B_MAX, B_DIV = -8, 7, 7.5  # 4-bit signed codes; s_g = max|group| / 7.5


@dataclass
class LqerFactors:
    qa: torch.Tensor  # int8 [rows, r], values in [A_MIN, A_MAX]
    sa: torch.Tensor  # fp16 [1]
    qb: torch.Tensor  # int8 [r, cols], values in [B_MIN, B_MAX]
    sb: torch.Tensor  # fp16 [r·cols / group]


def _fp16_scale(x: torch.Tensor) -> torch.Tensor:
    """fp16 scale floored at the smallest positive fp16, so an all-zero factor codes to 0 (never 0/0)."""
    s = x.float().to(torch.float16)
    return torch.where(s > 0, s, torch.full_like(s, FP16_TINY))


def lqer_eligible(shape: tuple[int, ...], rank: int, group: int) -> bool:
    """B [r × cols] splits into whole groups (the record packs only those asymmetrically)."""
    r = min(rank, *shape)
    return len(shape) == 2 and (r * shape[1]) % group == 0


def lqer_factors(E: torch.Tensor, rank: int, group: int) -> LqerFactors:
    """Rank-`rank` SVD of the error E [rows, cols] (fp32), packed as described in the module docstring."""
    E = E.float()
    r = min(rank, *E.shape)
    if not lqer_eligible(tuple(E.shape), rank, group):
        raise ValueError(f"LQER: B of shape [{r}, {E.shape[1]}] does not split into groups of {group}")
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    A = U[:, :r] * S[:r]
    B = Vh[:r]
    sa = _fp16_scale(A.abs().amax().reshape(1) / A_DIV)
    qa = torch.clamp(torch.round(A / sa.float()), A_MIN, A_MAX).to(torch.int8)
    groups = B.reshape(-1, group)
    sb = _fp16_scale(groups.abs().amax(dim=1) / B_DIV)
    qb = torch.clamp(torch.round(groups / sb.float().unsqueeze(1)), B_MIN, B_MAX).to(torch.int8)
    return LqerFactors(qa, sa, qb.reshape(B.shape), sb)


def lqer_correction(f: LqerFactors) -> torch.Tensor:
    """(s_A·q_A)(q_B ⊙ s_B) in fp32: what load adds to diag(s)·Q."""
    A = f.qa.float() * f.sa.float()
    group = f.qb.numel() // f.sb.numel()
    B = (f.qb.float().reshape(-1, group) * f.sb.float().unsqueeze(1)).reshape(f.qb.shape)
    return A @ B


def top_k_by_error(errors: dict[str, float], k: int) -> list[str]:
    """The k names with the largest ‖E‖_F (ties: state_dict order), in state_dict order."""
    order = {name: i for i, name in enumerate(errors)}
    chosen = sorted(errors, key=lambda n: (-errors[n], order[n]))[:k]
    return sorted(chosen, key=order.__getitem__)
