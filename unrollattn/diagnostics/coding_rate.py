"""Coding rate R, compression term R^c against per-head subspaces, and the SNR of tokens against learned subspaces
(docs/papers.md B.2, B.4, B.5). Tokens are rows: ``tokens`` [B, N, d] is B sets of N tokens (one image, one text
window); the papers' Z ∈ R^{d×N} is ``tokens[b].T``. Subspaces are rows too: ``bases`` [K, p, d] stacks U_k^T.

Each fast function (batched, Gram matrix on the smaller side, Cholesky) has a slow, literal float64 reference
(``*_reference``) that the tests compare it with.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["coding_rate", "coding_rate_reference", "compression_rate", "compression_rate_reference",
           "head_subspaces", "learned_subspace_snr", "learned_subspace_snr_reference", "orthonormal_bases"]


def _check_tokens(tokens: torch.Tensor) -> torch.Tensor:
    if tokens.ndim == 2:
        tokens = tokens[None]
    if tokens.ndim != 3 or tokens.shape[1] < 1 or not tokens.is_floating_point():
        raise ValueError(f"tokens: expected a float tensor [B, N, d] (or [N, d]), got {tuple(tokens.shape)} "
                         f"{tokens.dtype}")
    return tokens.double()


def _check_bases(bases: torch.Tensor, dim: int) -> torch.Tensor:
    if bases.ndim != 3 or bases.shape[-1] != dim:
        raise ValueError(f"bases: expected [K, p, d] rows U_k^T with d = {dim}, got {tuple(bases.shape)}")
    return bases.double()


def _logdet_identity_plus(gram: torch.Tensor, scale: float) -> torch.Tensor:
    """logdet(I + scale * gram) for symmetric PSD ``gram`` [..., m, m] (Cholesky of an SPD matrix)."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky(eye + scale * gram)
    return 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def coding_rate(tokens: torch.Tensor, eps: float = 0.5) -> torch.Tensor:
    """R_ε(Z) = ½ logdet(I + d/(Nε²) ZᵀZ) per set [B] (B.5), from the smaller of ZᵀZ and ZZᵀ (Sylvester)."""
    z = _check_tokens(tokens)
    _, n, d = z.shape
    gram = z @ z.transpose(1, 2) if n <= d else z.transpose(1, 2) @ z
    return 0.5 * _logdet_identity_plus(gram, d / (n * eps ** 2))


def coding_rate_reference(tokens: torch.Tensor, eps: float = 0.5) -> float:
    """R_ε of one set [N, d], literally: Z = tokens.T (d×N), ½ logdet(I_N + d/(Nε²) ZᵀZ) in float64."""
    z = tokens.double().T
    d, n = z.shape
    return 0.5 * float(torch.logdet(torch.eye(n, dtype=torch.float64) + d / (n * eps ** 2) * z.T @ z))


def compression_rate(tokens: torch.Tensor, bases: torch.Tensor, eps: float = 0.5) -> torch.Tensor:
    """R^c_ε(Z | U_[K]) = ½ Σ_k logdet(I + p/(Nε²) (U_kᵀZ)ᵀ(U_kᵀZ)) per set [B] (B.2), from the p×p Gram matrices."""
    z = _check_tokens(tokens)
    u = _check_bases(bases, z.shape[-1])
    n, p = z.shape[1], u.shape[1]
    coords = torch.einsum("bnd,kpd->bknp", z, u)  # U_k^T z for every token
    gram = coords.transpose(-2, -1) @ coords  # [B, K, p, p]
    return 0.5 * _logdet_identity_plus(gram, p / (n * eps ** 2)).sum(-1)


def compression_rate_reference(tokens: torch.Tensor, bases: torch.Tensor, eps: float = 0.5) -> float:
    """R^c_ε of one set [N, d], literally: Σ_k ½ logdet(I_N + p/(Nε²) (U_kᵀZ)ᵀ(U_kᵀZ)) with U_k = bases[k].T."""
    z = tokens.double().T
    n = z.shape[1]
    total = 0.0
    for u_t in bases.double():
        p = u_t.shape[0]
        c = u_t @ z  # U_k^T Z, p x N
        total += 0.5 * float(torch.logdet(torch.eye(n, dtype=torch.float64) + p / (n * eps ** 2) * c.T @ c))
    return total


def orthonormal_bases(bases: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning each U_k^T (QR per head), [K, p, d]: the projector P_k = Q_kᵀQ_k onto span(U_k)."""
    q, _ = torch.linalg.qr(bases.double().transpose(1, 2))  # [K, d, p]
    return q.transpose(1, 2)


def learned_subspace_snr(tokens: torch.Tensor, bases: torch.Tensor) -> tuple[float, torch.Tensor]:
    """AoT's SNR (B.4) against learned subspaces: each token goes to the subspace k that holds the largest share of
    its energy, ‖P_k z‖²; then SNR_k = ‖P_k Z_k‖_F / ‖(I − P_k) Z_k‖_F over its tokens Z_k. Returns (mean of SNR_k
    over the subspaces that received tokens, the share of tokens per subspace [K]). ``tokens`` [..., d]."""
    z = tokens.reshape(-1, tokens.shape[-1]).double()
    q = orthonormal_bases(_check_bases(bases, z.shape[-1]))
    coords = torch.einsum("md,kpd->mkp", z, q)
    label = coords.square().sum(-1).argmax(-1)  # [M]
    snrs = []
    for k in range(q.shape[0]):
        z_k = z[label == k]
        if len(z_k):
            signal = z_k @ q[k].T @ q[k]
            snrs.append(signal.norm() / (z_k - signal).norm().clamp_min(1e-30))
    share = torch.bincount(label, minlength=q.shape[0]).double() / len(label)
    return float(torch.stack(snrs).mean()), share


def learned_subspace_snr_reference(tokens: torch.Tensor, bases: torch.Tensor) -> float:
    """The same, one token at a time with explicit projectors P_k = U_k (U_kᵀU_k)⁻¹ U_kᵀ."""
    z = tokens.reshape(-1, tokens.shape[-1]).double()
    projectors = [u.T @ torch.linalg.inv(u @ u.T) @ u for u in bases.double()]  # u = U_k^T, p x d
    groups: dict[int, list[torch.Tensor]] = {}
    for token in z:
        k = max(range(len(projectors)), key=lambda j: float((projectors[j] @ token).norm()))
        groups.setdefault(k, []).append(token)
    snrs = []
    for k, rows in groups.items():
        z_k = torch.stack(rows)
        signal = z_k @ projectors[k]
        snrs.append(float(signal.norm() / (z_k - signal).norm()))
    return sum(snrs) / len(snrs)


def head_subspaces(layer: nn.Module) -> tuple[torch.Tensor, str]:
    """The per-head subspaces U_k^T [K, p, d] of an attention layer and what they are: MSSA's learned U_k (B.2);
    for layers without learned subspaces the per-head value projections W_V^k (mhsa, kernel attentions: the value
    rows of ``qkv``; glr / gtv: ``values``). Other layers: a ValueError saying R^c and the SNR do not apply."""
    heads, head_dim = getattr(layer, "num_heads", None), getattr(layer, "head_dim", None)
    subspace = getattr(layer, "subspace", None)
    if isinstance(subspace, nn.Linear):
        return subspace.weight.detach().view(heads, head_dim, -1), "learned subspaces U_k (mssa)"
    qkv = getattr(layer, "qkv", None)
    if isinstance(qkv, nn.Linear):
        inner = heads * head_dim
        return qkv.weight.detach()[2 * inner:3 * inner].view(heads, head_dim, -1), "value projections W_V^k"
    values = getattr(layer, "values", None)
    if isinstance(values, nn.Linear):
        return values.weight.detach().view(heads, head_dim, -1), "value projections W_V^k"
    raise ValueError(f"{type(layer).__name__}: no per-head subspaces (expected an mssa layer's U_k or a layer with "
                     f"per-head value projections); R^c and the subspace SNR do not apply")
