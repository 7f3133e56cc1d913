"""Slow, obviously-correct versions of the fast operators, for parity tests only.

Written straight from the equations in docs/papers.md: explicit loops over heads and tokens,
explicit exponentials, dense matrices. Never used on a hot path.
"""
from __future__ import annotations

import torch


def dense_mask(n: int, attn_mask: torch.Tensor | None, is_causal: bool, batch: int, heads: int) -> torch.Tensor:
    """[B, H, N, N] boolean 'may attend' matrix built entry by entry."""
    allowed = torch.ones(batch, heads, n, n, dtype=torch.bool)
    if is_causal:
        for i in range(n):
            for j in range(i + 1, n):
                allowed[:, :, i, j] = False
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise ValueError("the reference takes boolean masks only")
        allowed = allowed & attn_mask.cpu().expand(batch, heads, n, n)
    return allowed


def softmax_attention_reference(q, k, v, allowed, scale):
    """out_i = sum_j exp(s_ij) v_j / sum_j exp(s_ij) over allowed j, s_ij = scale * q_i . k_j; q,k,v [N, p]."""
    n = q.shape[0]
    out = torch.zeros_like(v)
    for i in range(n):
        logits = torch.stack([scale * torch.dot(q[i], k[j]) for j in range(n)])
        logits = torch.where(allowed[i], logits, torch.full_like(logits, float("-inf")))
        w = torch.exp(logits - logits.max())
        w = w / w.sum()
        out[i] = (w[:, None] * v).sum(0)
    return out


def mssa_reference(x, subspace_weight, num_heads, out_weight=None, out_bias=None, *, attn_mask=None,
                   is_causal=False, scale=None):
    """MSSA with one explicit U_k per head: U_out [SA(U_1^T z, U_1^T z, U_1^T z); ...] + b."""
    b, n, d = x.shape
    p = subspace_weight.shape[0] // num_heads
    scale = p ** -0.5 if scale is None else scale
    allowed = dense_mask(n, attn_mask, is_causal, b, num_heads)
    out_matrix = subspace_weight.t() if out_weight is None else out_weight  # [d, K*p]
    outputs = []
    for bi in range(b):
        per_head = []
        for k in range(num_heads):
            u_k = subspace_weight[k * p:(k + 1) * p].t()  # U_k in R^{d x p}
            coords = x[bi] @ u_k  # rows: U_k^T z_i
            per_head.append(softmax_attention_reference(coords, coords, coords, allowed[bi, k], scale))
        heads = torch.cat(per_head, dim=-1)  # [N, K*p]
        y = heads @ out_matrix.t()
        if out_bias is not None:
            y = y + out_bias
        outputs.append(y)
    return torch.stack(outputs)


def mhsa_reference(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, *, attn_mask=None, is_causal=False):
    """Standard multi-head softmax attention with separate W_Q, W_K, W_V rows in ``qkv_weight`` [3d, d]."""
    b, n, d = x.shape
    p = d // num_heads
    allowed = dense_mask(n, attn_mask, is_causal, b, num_heads)
    w_q, w_k, w_v = qkv_weight.split(d)
    b_q, b_k, b_v = (qkv_bias.split(d) if qkv_bias is not None else (0.0, 0.0, 0.0))
    outputs = []
    for bi in range(b):
        q, k, v = x[bi] @ w_q.t() + b_q, x[bi] @ w_k.t() + b_k, x[bi] @ w_v.t() + b_v
        heads = torch.cat([
            softmax_attention_reference(q[:, h * p:(h + 1) * p], k[:, h * p:(h + 1) * p], v[:, h * p:(h + 1) * p],
                                        allowed[bi, h], p ** -0.5)
            for h in range(num_heads)
        ], dim=-1)
        y = heads @ proj_weight.t()
        if proj_bias is not None:
            y = y + proj_bias
        outputs.append(y)
    return torch.stack(outputs)


def ista_reference(z, dictionary, step_size=0.1, lambd=0.1):
    """CRATE's three-term form per token column: ReLU(z + eta (D^T z - D^T D z) - eta lambda)."""
    out = torch.empty_like(z)
    flat_in, flat_out = z.reshape(-1, z.shape[-1]), out.view(-1, z.shape[-1])
    for t in range(flat_in.shape[0]):
        col = flat_in[t][:, None]
        update = step_size * (dictionary.t() @ col - dictionary.t() @ (dictionary @ col)) - step_size * lambd
        flat_out[t] = torch.clamp(col + update, min=0.0)[:, 0]
    return out


# --- kernel regression (family C) ---

def kernel_attention_reference(q, k, v, kernel="dot", *, range_bandwidth=None, metric=None, positions=None,
                               spatial_bandwidth=None, spatial_kernel="gaussian", is_causal=False):
    """Nadaraya-Watson out_i = sum_j K_ij v_j / sum_j K_ij with K_ij written out term by term (C.9).

    q, k, v: [H, N, d]; bandwidths are floats or [H]; positions [N, P] (NaN rows take no spatial term).
    """
    heads, n, d = q.shape
    out = torch.zeros_like(v)
    per_head = lambda value, h: float(value[h]) if isinstance(value, torch.Tensor) and value.ndim else float(value)  # noqa: E731
    for h in range(heads):
        h_y = per_head(range_bandwidth, h) if range_bandwidth is not None else (4 * d) ** 0.25
        for i in range(n):
            weights = []
            for j in range(n):
                if is_causal and j > i:
                    weights.append(torch.zeros((), dtype=q.dtype))
                    continue
                if kernel == "dot":
                    log_k = torch.dot(q[h, i], k[h, j]) * (d ** -0.5 if range_bandwidth is None else 2 / h_y ** 2)
                else:
                    diff = q[h, i] - k[h, j]
                    if kernel == "mahalanobis":
                        log_k = -(diff * metric[h] * diff).sum() / h_y ** 2
                    else:
                        log_k = -diff.square().sum() / h_y ** 2
                weight = torch.exp(log_k)
                if positions is not None and not (torch.isnan(positions[i]).any() or torch.isnan(positions[j]).any()):
                    dist = torch.linalg.vector_norm(positions[i] - positions[j])
                    h_p = per_head(spatial_bandwidth, h)
                    weight = weight * (torch.exp(-dist ** 2 / h_p ** 2) if spatial_kernel == "gaussian" else torch.exp(-dist / h_p))
                weights.append(weight)
            w = torch.stack(weights)
            out[h, i] = (w[:, None] * v[h]).sum(0) / w.sum()
    return out
