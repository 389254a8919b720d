"""Per-row weight quantizers: SDClip / Hessian-aware SDClip / percentile scales, RTN and GPTQ (SPEC §4.3-4.4).

Conventions: a weight matrix W is [rows x cols] with cols = input features (the columns GPTQ walks),
quantized values are symmetric integers q in [-R, R] with R = 2^(bits-1) - 1, stored in an int8 container,
and each row r has one scale s_r stored as float16, so W ≈ q · s_r. Every quantizer rounds with the *stored*
fp16 scale, so dequantizing the stored pair reproduces exactly what the quantizer measured.

GPTQ runs batched: a stack of same-shape matrices [N, rows, cols] with their Hessians [N, cols, cols] is
processed in one sweep over the columns, so the Python-level column loop runs once per shape, not once per
matrix (the full pr1541 model has only four distinct matrix shapes plus the embedding).
"""

from __future__ import annotations

import torch

FP16_TINY = 2.0**-24  # smallest positive fp16: scale floor, so an all-zero row quantizes to 0 (never 0/0)
FP16_MAX = 65504.0


def qmax(bits: int) -> int:
    """R = 2^(bits-1) - 1: 31 for int6, 127 for int8."""
    if not 2 <= bits <= 8:
        raise ValueError(f"quantization bits must be in [2, 8] (int8 container), got {bits}")
    return 2 ** (bits - 1) - 1


def _as_fp16_scale(clip: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row clip value c_r -> stored fp16 scale c_r / R, floored at the smallest fp16 > 0."""
    s = (clip.float() / qmax(bits)).clamp(max=FP16_MAX).to(torch.float16)
    return torch.where(s > 0, s, torch.full_like(s, FP16_TINY))


def row_std(W: torch.Tensor) -> torch.Tensor:
    """Unbiased (torch default) standard deviation of each row of W (last dim); [..., rows]."""
    return W.float().std(dim=-1)


def hessian_clip_multipliers(W: torch.Tensor, h_diag: torch.Tensor, lam: float) -> torch.Tensor:
    """Hessian-aware SDClip row factor 1 + λ(row_imp_r − 1) (SPEC §4.4, #1557 form, undamped diag).

    col_imp_j = H_jj / mean(diag H); row_imp_r = mean_j(|W_rj| col_imp_j) / mean_r(mean_j(|W_rj| col_imp_j)).
    Works on one matrix [rows, cols] with h_diag [cols] or a stack [N, rows, cols] with h_diag [N, cols].
    """
    d = h_diag.float().clamp_min(1e-12)
    col_imp = d / d.mean(dim=-1, keepdim=True).clamp_min(1e-12)
    raw = (W.float().abs() * col_imp.unsqueeze(-2)).mean(dim=-1)  # [..., rows]
    row_imp = raw / raw.mean(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1.0 + lam * (row_imp - 1.0)


def sdclip_scales(
    W: torch.Tensor, bits: int, k: float, h_diag: torch.Tensor | None = None, lam: float = 0.0
) -> torch.Tensor:
    """SDClip scales s_r = c_r / R with c_r = k·std_r, times the Hessian-aware factor when lam > 0."""
    clip = k * row_std(W)
    if lam:
        if h_diag is None:
            raise ValueError(
                "Hessian-aware SDClip (quant.hessian_clip_lambda > 0) needs the Hessian diagonal"
            )
        clip = clip * hessian_clip_multipliers(W, h_diag, lam)
    return _as_fp16_scale(clip, bits)


def absmax_scales(W: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row scales max|W_r| / R (the attention gate's int8 storage, SPEC-1855 §4.3)."""
    return _as_fp16_scale(W.float().abs().amax(dim=-1), bits)


def percentile_clip_scales(W: torch.Tensor, bits: int, percentile: float) -> torch.Tensor:
    """The baseline's export (SPEC §8): per-row clip at the `percentile` of |W_r|, scale = clip / R."""
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"quant.clip_percentile must be in (0, 100], got {percentile}")
    absw = W.float().abs()
    rows = absw.reshape(-1, absw.shape[-1])
    clip = torch.quantile(rows, percentile / 100.0, dim=-1).reshape(absw.shape[:-1])
    return _as_fp16_scale(clip, bits)


def rtn_quantize(W: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Round to nearest with the given per-row scales: q = clamp(round(W / s_r), -R, R) as int8."""
    R = qmax(bits)
    s = scales.float().unsqueeze(-1)
    return torch.clamp(torch.round(W.float() / s), -R, R).to(torch.int8)


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W = q · s_r (row broadcast), computed in fp32 then cast to `dtype`."""
    return (q.float() * scales.float().unsqueeze(-1)).to(dtype)


def quant_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """The GPTQ objective tr((W − Ŵ) H (W − Ŵ)ᵀ) in float64."""
    D = (W.double() - W_hat.double()).reshape(-1, W.shape[-1])
    return float(torch.einsum("rc,cd,rd->", D, H.double(), D))


def inverse_upper_cholesky(H: torch.Tensor) -> torch.Tensor:
    """U upper-triangular with Uᵀ U = H⁻¹ for one symmetric positive definite matrix H [c, c].

    With J the index reversal and J H J = L Lᵀ (lower Cholesky), H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J) and J L⁻¹ J is
    upper triangular: one Cholesky and one triangular solve instead of cholesky -> cholesky_inverse ->
    cholesky (measured 2-5x faster on CPU, where cholesky_inverse is slow).
    """
    L, info = torch.linalg.cholesky_ex(H.flip(-1, -2))
    if int(info) != 0:
        raise ValueError("GPTQ: a Hessian is not positive definite even after damping")
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    return torch.linalg.solve_triangular(L, eye, upper=False).flip(-1, -2)


def _prepare(
    W: torch.Tensor, H: torch.Tensor, damp: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One matrix: dead columns, damping, act-order. Returns (permuted W, U of the permuted H, perm)."""
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    diag = H.diagonal()  # a view: edits below change H
    dead = diag == 0
    W[:, dead] = 0.0
    diag.masked_fill_(dead, 1.0)
    diag.add_(damp * diag.mean())
    perm = torch.argsort(diag, descending=True)
    H = H.index_select(0, perm).index_select(1, perm)
    return W.index_select(1, perm), inverse_upper_cholesky(H), perm


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    damp: float = 0.01,
    block_size: int = 128,
) -> torch.Tensor:
    """GPTQ (SPEC §4.3) with fixed per-row scales; returns q (int8, same shape as W).

    W [rows, cols] with H [cols, cols] and scales [rows], or stacks [N, rows, cols], [N, cols, cols], [N, rows].
    Steps: dead columns (H_jj = 0) get H_jj = 1 and a zeroed weight column; damping damp·mean(diag H);
    act-order by descending diag H; U = upper Cholesky factor of H⁻¹; columns in blocks of `block_size`,
    each column rounded with the error fed forward through U inside the block, and the block's errors
    applied to the later columns with one matmul. Factorizations run per matrix (batching them does not
    help on CPU); the column sweep runs on the whole stack (its cost is Python overhead per column).
    """
    single = W.dim() == 2
    if single:
        W, H, scales = W.unsqueeze(0), H.unsqueeze(0), scales.unsqueeze(0)
    if W.dim() != 3 or H.shape != (W.shape[0], W.shape[2], W.shape[2]) or scales.shape != W.shape[:2]:
        raise ValueError(
            f"gptq_quantize: shapes W {tuple(W.shape)}, H {tuple(H.shape)}, scales {tuple(scales.shape)} "
            "do not match ([N,] rows x cols, [N,] cols x cols, [N,] rows)"
        )
    R = qmax(bits)
    n, rows, cols = W.shape
    Wp = torch.empty(n, rows, cols, dtype=torch.float32, device=W.device)
    U = torch.empty(n, cols, cols, dtype=torch.float32, device=W.device)
    perms = []
    for i in range(n):
        Wp[i], U[i], perm = _prepare(W[i], H[i], damp)
        perms.append(perm)
    W = Wp

    s = scales.float().unsqueeze(-1)  # [N, rows, 1]
    Q = torch.empty_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, :, i1:i2].clone()
        E1 = torch.empty_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        inv_d = 1.0 / U1.diagonal(dim1=-2, dim2=-1)  # [N, b]
        for j in range(i2 - i1):
            w = W1[:, :, j : j + 1]  # [N, rows, 1]
            q = torch.clamp(torch.round(w / s), -R, R)
            Q[:, :, i1 + j : i1 + j + 1] = q
            err = (w - q * s) * inv_d[:, j].view(n, 1, 1)
            E1[:, :, j : j + 1] = err
            if j + 1 < i2 - i1:
                # W1[:, :, j+1:] -= err ⊗ U1[j, j+1:] as one batched rank-1 update
                W1[:, :, j + 1 :].addcmul_(err, U1[:, j : j + 1, j + 1 :], value=-1.0)
        if i2 < cols:
            W[:, :, i2:].baddbmm_(E1, U[:, i1:i2, i2:], alpha=-1.0)

    Q = torch.stack([Q[i].index_select(1, torch.argsort(perms[i])) for i in range(n)]).to(torch.int8)
    return Q[0] if single else Q
