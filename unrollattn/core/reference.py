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
    # a tensor bandwidth stays a tensor, so gradients reach it
    per_head = lambda value, h: (value[h] if value.ndim else value) if isinstance(value, torch.Tensor) else float(value)  # noqa: E731
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


# --- graph smoothness (family A) ---
# Dense-matrix versions of core/graph.py and core/solvers.py, built entry by entry (small n only).

def neighbourhood_reference(kind: str, shape, include_self: bool = False) -> torch.Tensor:
    """Dense bool [n, n] 'j is a neighbour of i' straight from the coordinate definitions of each kind."""
    if kind in ("4", "8") or kind.startswith("window"):
        h, w = shape
        radius = 1 if kind in ("4", "8") else int(kind[len("window"):]) // 2
        allowed = torch.zeros(h * w, h * w, dtype=torch.bool)
        for i in range(h * w):
            for j in range(h * w):
                dr, dc = abs(i // w - j // w), abs(i % w - j % w)
                if i == j:
                    allowed[i, j] = include_self
                elif kind == "4":
                    allowed[i, j] = dr + dc == 1
                else:
                    allowed[i, j] = max(dr, dc) <= radius
        return allowed
    n = shape[0] if isinstance(shape, (tuple, list)) else int(shape)
    width = int(kind.lstrip("bandcusl"))
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if i == j:
                allowed[i, j] = include_self
            elif kind.startswith("band"):
                allowed[i, j] = abs(i - j) <= width
            else:
                allowed[i, j] = 0 < i - j <= width
    return allowed


def graph_weights_reference(features, allowed, metric_matrix=None, normalization="none", similarity="mahalanobis"):
    """Dense W [B, G, n, n] from features [B, G, n, K]: w_ij = exp(-(f_i - f_j)^T M (f_i - f_j)) or
    exp(f_i^T M f_j) on allowed pairs, then row (w_ij / d_i) or symmetric (w_ij / sqrt(d_i d_j)) normalisation (A.4).
    ``metric_matrix``: M [G, K, K] (None: identity)."""
    b, g, n, k = features.shape
    out = torch.zeros(b, g, n, n, dtype=features.dtype)
    for bi in range(b):
        for gi in range(g):
            m = torch.eye(k, dtype=features.dtype) if metric_matrix is None else metric_matrix[gi]
            f = features[bi, gi]
            w = torch.zeros(n, n, dtype=features.dtype)
            for i in range(n):
                for j in range(n):
                    if allowed[i, j]:
                        if similarity == "mahalanobis":
                            diff = f[i] - f[j]
                            w[i, j] = torch.exp(-(diff @ m @ diff))
                        else:
                            w[i, j] = torch.exp(f[i] @ m @ f[j])
            deg = w.sum(1)
            normed = w.clone()
            for i in range(n):
                for j in range(n):
                    if normalization == "row" and deg[i] > 0:
                        normed[i, j] = w[i, j] / deg[i]
                    elif normalization == "symmetric" and w[i, j] != 0:
                        normed[i, j] = w[i, j] / torch.sqrt(deg[i] * deg[j])
            out[bi, gi] = normed
    return out


def dense_adjacency(weights, index, n):
    """W [B, G, n, n] with W[i, index[i, c]] += weights[..., i, c]."""
    b, g = weights.shape[:2]
    out = torch.zeros(b, g, n, n, dtype=weights.dtype)
    for i in range(n):
        for c in range(index.shape[1]):
            out[:, :, i, int(index[i, c])] = out[:, :, i, int(index[i, c])] + weights[:, :, i, c]
    return out


def dense_laplacian(weights, index, n):
    """L = D - W with D = diag(W 1) (A.1)."""
    w = dense_adjacency(weights, index, n)
    return torch.diag_embed(w.sum(-1)) - w


def dense_incidence(weights, index, n):
    """C_w [B, G, n*m, n]: row (i, c) has +w at i and -w at index[i, c] (zero row for a self edge)."""
    b, g = weights.shape[:2]
    m = index.shape[1]
    out = torch.zeros(b, g, n * m, n, dtype=weights.dtype)
    for i in range(n):
        for c in range(m):
            j = int(index[i, c])
            if j != i:
                out[:, :, i * m + c, i] = weights[:, :, i, c]
                out[:, :, i * m + c, j] = -weights[:, :, i, c]
    return out


def cg_reference(a, b, x0=None, iters=None, alphas=None, betas=None):
    """Textbook CG on a dense [n, n] matrix and a vector b [n]; ``alphas``/``betas`` replace the formulas."""
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - a @ x
    p = r.clone()
    iters = b.shape[0] if iters is None else iters
    for k in range(iters):
        if alphas is None:
            if float(r @ r) == 0.0:
                break
            alpha = (r @ r) / (p @ (a @ p))
        else:
            alpha = alphas[k]
        r_new = r - alpha * (a @ p)
        x = x + alpha * p
        if k + 1 < iters:
            beta = (r_new @ r_new) / (r @ r) if betas is None else betas[k]
            p = r_new + beta * p
        r = r_new
    return x


def glr_interpolate_reference(observed, y, laplacian):
    """x_o = y_o, x_u = -L_uu^{-1} L_uo y_o by an explicit reordering and a direct solve (A.2); vectors [n]."""
    obs = [i for i in range(y.shape[0]) if observed[i]]
    uno = [i for i in range(y.shape[0]) if not observed[i]]
    x = y.clone()
    if uno:
        l_uu = laplacian[uno][:, uno]
        l_uo = laplacian[uno][:, obs]
        x[uno] = torch.linalg.solve(l_uu, -(l_uo @ y[obs]))
    return x


def glr_relaxed_reference(observed, y, laplacian, fidelity):
    """min_x mu |Hx - y|^2 + x^T L x by a direct solve of (mu diag(observed) + L) x = mu diag(observed) y; vectors [n]."""
    h = torch.diag(observed.to(y.dtype))
    return torch.linalg.solve(fidelity * h + laplacian, fidelity * (h @ y))


def gtv_admm_reference(observed, y, incidence, iters, rho, fidelity=None):
    """ADMM of A.3 with dense C_w [E, n] and an exact x-step; z = mu = 0 at the start. Returns (x, z, mu).
    ``fidelity`` g: the relaxed problem min g |Hx - y|^2 + |C_w x|_1, whose x-step minimises
    g |Hx - y|^2 + mu^T C_w x + rho/2 |C_w x - z|^2 over all nodes (normal equations, direct solve)."""
    obs = [i for i in range(y.shape[0]) if observed[i]]
    uno = [i for i in range(y.shape[0]) if not observed[i]]
    ctc = incidence.t() @ incidence
    x = torch.where(observed, y, torch.zeros_like(y))
    z = torch.zeros(incidence.shape[0], dtype=y.dtype)
    mu = torch.zeros_like(z)
    h = torch.diag(observed.to(y.dtype))
    for _ in range(iters):
        rhs = incidence.t() @ (z - mu / rho)
        if fidelity is None:
            x = x.clone()
            x[uno] = torch.linalg.solve(ctc[uno][:, uno], rhs[uno] - ctc[uno][:, obs] @ y[obs])
        else:
            x = torch.linalg.solve(2 * fidelity * h + rho * ctc, 2 * fidelity * (h @ y) + rho * rhs)
        cx = incidence @ x
        v = cx + mu / rho
        z = torch.sign(v) * torch.clamp(v.abs() - 1 / rho, min=0)
        mu = mu + rho * (cx - z)
    return x, z, mu


def gtv_denoise_reference(v, incidence, lam, rho, iters, cg_iters=None, alphas=None, betas=None, heads_only=None):
    """Scaled ADMM for min 1/2 |x - v|^2 + lam |C_w x|_1 with the z-step first (as core.solvers.gtv_admm_denoise):
    x-step (I + rho C^T C) x = v + rho C^T (z - u) (rho a float or a list, one per iteration) solved exactly, or by ``cg_reference`` with ``cg_iters`` steps.
    ``heads_only`` [E, n] replaces C^T by (heads_only)^T (the directed variant). ``alphas``/``betas``: [iters][cg_iters]."""
    ct = incidence.t() if heads_only is None else heads_only.t()
    x = v.clone()
    u = torch.zeros(incidence.shape[0], dtype=v.dtype)
    for t in range(iters):
        r = rho[t] if isinstance(rho, (list, tuple)) else rho  # one rho per iteration, or shared
        a = torch.eye(v.shape[0], dtype=v.dtype) + r * ct @ incidence
        w = incidence @ x + u
        z = torch.sign(w) * torch.clamp(w.abs() - lam / r, min=0)
        rhs = v + r * ct @ (z - u)
        if cg_iters is None:
            x = torch.linalg.solve(a, rhs)
        else:
            x = cg_reference(a, rhs, x, cg_iters, None if alphas is None else alphas[t],
                             None if betas is None else betas[t])
        u = u + incidence @ x - z
    return x
