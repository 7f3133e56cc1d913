"""Unrolled solvers for graph-smoothness priors (docs/papers.md A.2, A.3): CG and ADMM over mat-vec callables.

No solver here sees a matrix: operators are callables ``v -> A v`` (usually a partial of
``core.graph.laplacian_matvec``), so the cost per step is one sparse mat-vec, O(N·k).

Shapes: signals are ``[..., N, C]`` (typically [B, G, N, C]); the C columns are independent right-hand
sides sharing the operator, so CG inner products reduce over the node axis only (``dim=-2``) and
every (batch, graph, channel) column gets its own α_k, β_k. Everything is differentiable.

Step sizes ("exact" vs learned, A.2): ``step_sizes=None`` runs textbook CG. ``step_sizes=(alpha, beta)``
replaces the formulas by given tensors, alpha [K, ...], beta [K−1, ...] (or [K, ...], the last row
unused), each row broadcastable to the per-column scalar shape (e.g. [K, G, 1, 1] per graph/head).
Learned steps need no inner products, so they keep an operator's locality (a causal operator stays
causal); exact CG's α_k, β_k are global reductions over the nodes.

Exact CG needs A self-adjoint positive definite. A row-normalised graph Laplacian D⁻¹L is not symmetric, but it
is self-adjoint in the degree-weighted inner product ⟨r, s⟩_D = Σ_i d_i r_i s_i (D·D⁻¹L = L): pass those weights
as ``inner_weights`` (``core.graph.row_inner_weights``) and exact CG is exact again; without them it silently
returns a wrong answer on such a system.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from .graph import column_major, incidence_gram_diagonal, incidence_gram_operator, incidence_matvec, incidence_t_matvec

MatVec = Callable[[torch.Tensor], torch.Tensor]
StepSizes = tuple[torch.Tensor, torch.Tensor]


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den is (numerically) 0 — e.g. rᵀr = 0 after exact convergence."""
    tiny = torch.finfo(den.dtype).tiny if den.is_floating_point() else 0
    ok = den.abs() > tiny
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _plus_scaled(base: torch.Tensor, scale, t: torch.Tensor) -> torch.Tensor:
    """base + scale · t in one pass (scale a float or a broadcastable tensor)."""
    if isinstance(scale, torch.Tensor):
        return torch.addcmul(base, scale, t)
    return torch.add(base, t, alpha=scale)


def _check_steps(step_sizes, iters: int, name: str = "step_sizes") -> StepSizes | None:
    if step_sizes is None:
        return None
    if not (isinstance(step_sizes, (tuple, list)) and len(step_sizes) == 2):
        raise ValueError(f"{name}: expected (alpha [K, ...], beta [K-1, ...]) with K = {iters}, got {type(step_sizes).__name__}")
    alpha, beta = step_sizes
    if not isinstance(alpha, torch.Tensor) or alpha.ndim < 1 or alpha.shape[0] != iters:
        raise ValueError(f"{name}: expected alpha of shape [K={iters}, ...], got "
                         f"{list(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__}")
    if iters > 1 and (beta is None or not isinstance(beta, torch.Tensor) or beta.ndim < 1
                      or beta.shape[0] not in (iters - 1, iters)):
        got = list(beta.shape) if isinstance(beta, torch.Tensor) else type(beta).__name__
        raise ValueError(f"{name}: expected beta of shape [K-1={iters - 1}, ...] (or [K, ...]), got {got}")
    return alpha, beta


def _broadcasts_to(t: torch.Tensor, shape: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(t.shape, shape) == shape
    except RuntimeError:
        return False


def _check_inner_weights(inner_weights, b: torch.Tensor):
    if inner_weights is None:
        return None
    if not (isinstance(inner_weights, torch.Tensor) and _broadcasts_to(inner_weights, b.shape)):
        got = list(inner_weights.shape) if isinstance(inner_weights, torch.Tensor) else type(inner_weights).__name__
        raise ValueError(f"inner_weights: expected positive node weights broadcastable to b {list(b.shape)} "
                         f"(e.g. [..., N, 1]), got {got}")
    return inner_weights


def conjugate_gradient(matvec: MatVec, b: torch.Tensor, x0: torch.Tensor | None = None, iters: int = 10, *,
                       step_sizes: StepSizes | None = None, dim: int = -2,
                       inner_weights: torch.Tensor | None = None) -> torch.Tensor:
    """K unrolled CG steps for A x = b (A.2), with A given as ``matvec``.

    Exact:   α_k = r_kᵀr_k / p_kᵀA p_k,  x_{k+1} = x_k + α_k p_k,  r_{k+1} = r_k − α_k A p_k,
             β_k = r_{k+1}ᵀr_{k+1} / r_kᵀr_k,  p_{k+1} = r_{k+1} + β_k p_k      (0/0 -> 0: converged columns stay put)
    Learned: the same recursion with α_k = alpha[k], β_k = beta[k] (see module docstring).
    On an SPD A, exact CG reaches the solution after at most n steps (n = size of the system) up to rounding,
    and its autograd gradients then equal those of A^{-1}b for symmetric perturbations of A (e.g. w.r.t. the
    features of a symmetric graph), not for a perturbation of one entry A_ij alone.
    ``inner_weights`` d (positive, broadcastable to b, e.g. [..., N, 1]): exact CG in the inner product
    ⟨r, s⟩ = Σ_i d_i r_i s_i, for an A self-adjoint positive definite in it (DA symmetric PD, e.g. I + μD⁻¹L with
    D the degrees); the same n-step exactness and gradients (for perturbations keeping DA symmetric). Learned
    steps use no inner products and ignore it.
    """
    if not isinstance(b, torch.Tensor) or b.ndim < 1:
        raise ValueError(f"b: expected a tensor [..., N, C], got {type(b).__name__}")
    if iters < 0:
        raise ValueError(f"iters: expected >= 0, got {iters}")
    steps = _check_steps(step_sizes, iters)
    weight = _check_inner_weights(inner_weights, b)

    def inner(u, v):
        return (u * v if weight is None else weight * u * v).sum(dim, keepdim=True)

    x = torch.zeros_like(b) if x0 is None else x0
    if x0 is not None and x0.shape != b.shape:
        raise ValueError(f"x0: expected shape {list(b.shape)} like b, got {list(x0.shape)}")
    if iters == 0:
        return x
    r = b - matvec(x) if x0 is not None else b
    p = r
    rr = inner(r, r) if steps is None else None
    for k in range(iters):
        ap = matvec(p)
        alpha = _safe_ratio(rr, inner(p, ap)) if steps is None else steps[0][k]
        x = _plus_scaled(x, alpha, p)
        if k == iters - 1:
            break
        r = _plus_scaled(r, -alpha, ap)
        if steps is None:
            rr_next = inner(r, r)
            beta = _safe_ratio(rr_next, rr)
            rr = rr_next
        else:
            beta = steps[1][k]
        p = _plus_scaled(r, beta, p)
    return x


def _observed(observed_mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if not isinstance(observed_mask, torch.Tensor):
        raise ValueError(f"observed_mask: expected a bool tensor [N] or broadcastable to y {list(y.shape)}")
    mask = observed_mask
    if mask.ndim == 1:
        if mask.shape[0] != y.shape[-2]:
            raise ValueError(f"observed_mask: expected [N={y.shape[-2]}] or a shape broadcastable to y "
                             f"{list(y.shape)}, got {list(mask.shape)}")
        mask = mask[:, None]
    if not _broadcasts_to(mask, y.shape):
        raise ValueError(f"observed_mask: expected [N] or a shape broadcastable to y {list(y.shape)}, "
                         f"got {list(observed_mask.shape)}")
    return mask.to(dtype=y.dtype)


def _check_fidelity(fidelity) -> None:
    if fidelity is not None and not isinstance(fidelity, torch.Tensor) and not float(fidelity) > 0:
        raise ValueError(f"fidelity: expected None (hard constraint Hx = y) or a weight > 0, got {fidelity}")


def _relaxed_solve(base: MatVec, diag: torch.Tensor, o: torch.Tensor, q, rhs: torch.Tensor, x0: torch.Tensor,
                   iters: int, step_sizes, inner_weights=None) -> torch.Tensor:
    """CG on (q P_o + A) x = rhs with the Jacobi-balanced system S(qP_o + A)S x' = S rhs, x = S x',
    S = diag(d / (d + q o))^{1/2}, d = diag(A) clamped at 1e-6 (isolated nodes): the same minimiser; the scaled
    operator has A's diagonal, so learned step sizes keep the scale they have on the hard-constraint system.
    S is diagonal, so an A self-adjoint in ``inner_weights`` keeps the scaled system self-adjoint in them."""
    d = diag.unsqueeze(-1).clamp_min(1e-6)
    qo = q * o
    s = torch.sqrt(d / (d + qo))

    def balanced(v):
        sv = s * v
        return s * torch.addcmul(base(sv), qo, sv)

    x = conjugate_gradient(balanced, s * rhs, x0 / s, iters, step_sizes=step_sizes, inner_weights=inner_weights)
    return s * x


def glr_interpolate(observed_mask: torch.Tensor, y: torch.Tensor, laplacian_matvec: MatVec, iters: int,
                    x0: torch.Tensor | None = None, step_sizes: StepSizes | None = None, *,
                    fidelity=None, diagonal: torch.Tensor | None = None,
                    inner_weights: torch.Tensor | None = None) -> torch.Tensor:
    """GLR interpolation min_x xᵀLx s.t. Hx = y by K CG steps on L_uu x_u = −L_uo y (A.2).

    ``observed_mask`` (bool [N] or broadcastable to y) marks the observed nodes; ``y`` [..., N, C] holds
    the observations there (other entries are ignored). No reordering: the system is restricted with
    masks, A v = P_u L P_u v, b = −P_u L P_o y. Returns the full x with x_o = y exactly; x0 (default 0)
    initialises the unobserved entries.

    ``fidelity`` μ > 0 (float or tensor broadcastable to y, e.g. [G, 1, 1] per graph) relaxes the
    constraint to a data term: min_x μ‖Hx − y‖² + xᵀLx, i.e. (μ P_o + L) x = μ P_o y, solved by the same
    K CG steps over all nodes from x0 (default: y at the observed nodes, 0 elsewhere). SPD when every
    connected component of the graph holds an observed node; μ → ∞ recovers the hard constraint. The
    observed samples are then filtered too (a noisy sample is not copied to the output). ``diagonal``
    [..., N] = diag(L) (the degrees, ``core.graph.degree``) balances the system (see ``_relaxed_solve``);
    without it CG runs on the system as it is. ``inner_weights``: for a row-normalised L = D⁻¹L_sym, the
    degrees d ([..., N, 1], ``core.graph.row_inner_weights``) make exact CG exact (P_u and P_o are diagonal, so
    both systems stay self-adjoint in ⟨·,·⟩_D; see :func:`conjugate_gradient`).
    """
    o = _observed(observed_mask, y)
    _check_fidelity(fidelity)
    u = 1 - o
    y_o = o * y
    if fidelity is not None:
        start = y_o if x0 is None else x0
        if diagonal is not None:
            return _relaxed_solve(laplacian_matvec, diagonal, o, fidelity, fidelity * y_o, start, iters, step_sizes,
                                  inner_weights)
        return conjugate_gradient(lambda v: fidelity * (o * v) + laplacian_matvec(v), fidelity * y_o, start, iters,
                                  step_sizes=step_sizes, inner_weights=inner_weights)
    b = -u * laplacian_matvec(y_o)
    start = None if x0 is None else u * x0
    x_u = conjugate_gradient(lambda v: u * laplacian_matvec(u * v), b, start, iters, step_sizes=step_sizes,
                             inner_weights=inner_weights)
    return y_o + u * x_u


def soft_threshold(v: torch.Tensor, tau) -> torch.Tensor:
    """soft_τ(v) = sign(v)·max(|v| − τ, 0) (A.3); τ a float or a broadcastable tensor ≥ 0.
    Computed as v − clamp(v, −τ, τ): the same values bit for bit and the same gradients, in two passes."""
    return v - torch.clamp(v, -tau, tau)


def _on_edges(value):
    """A node-shaped parameter ([..., N, C]-broadcastable, e.g. [G, 1, 1]) lifted to edge signals [..., N, m, C]."""
    return value.unsqueeze(-2) if isinstance(value, torch.Tensor) and value.ndim >= 2 else value


def _per_iteration(value, iters: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != iters:
            raise ValueError(f"{name}: expected one value per ADMM iteration ({iters}), got {len(value)}")
        return list(value)
    return [value] * iters


def _admm_steps(step_sizes, iters: int, cg_iters: int) -> list:
    """Shared (alpha, beta) pair, or a list with one pair per ADMM iteration."""
    if step_sizes is None:
        return [None] * iters
    if isinstance(step_sizes, list):
        if len(step_sizes) != iters:
            raise ValueError(f"step_sizes: expected one (alpha, beta) pair per ADMM iteration ({iters}), got {len(step_sizes)}")
        return [_check_steps(s, cg_iters) for s in step_sizes]
    return [_check_steps(step_sizes, cg_iters)] * iters


def gtv_admm_interpolate(observed_mask: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, index: torch.Tensor,
                         iters: int, cg_iters: int, rho, x0: torch.Tensor | None = None, *,
                         step_sizes=None, fidelity=None, offsets=None, return_state: bool = False):
    """GTV interpolation min_x ‖C_w x‖₁ s.t. Hx = y by ``iters`` unrolled ADMM iterations (A.3).

    ``weights`` [B, G, N, m] / ``index`` [N, m] describe the undirected edge set (each edge once:
    ``Neighbourhood.edges()``). Per iteration, with z = C_w x split off and dual μ:
        x-step: (C_wᵀC_w)_uu x_u = [C_wᵀ(z − μ/ρ)]_u − (C_wᵀC_w)_uo y     (``cg_iters`` CG steps, warm start)
        z-step: z = soft_{1/ρ}(C_w x + μ/ρ)
        dual:   μ ← μ + ρ (C_w x − z)
    Starts from z = μ = 0, so the first x-step is GLR interpolation on the squared weights
    (C_wᵀC_w = L_{w²}). ``rho``: float or tensor broadcastable to the node signal [B, G, N, C] (e.g.
    [G, 1, 1] per graph; lifted to the edges internally), or a list with one per iteration. ``step_sizes``: an (alpha, beta) tuple for the inner CG shared by all
    iterations, or a list of such pairs, one per iteration (None: exact CG). x_o = y exactly.

    ``fidelity`` γ > 0 (float or tensor broadcastable to y; not the dual μ) relaxes the constraint to a
    data term, min_x γ‖Hx − y‖² + ‖C_w x‖₁; the x-step becomes the full-node system
        (q P_o + C_wᵀC_w) x = q P_o y + C_wᵀ(z − μ/ρ),   q = 2γ/ρ
    (same CG on the Jacobi-balanced system of ``_relaxed_solve``, warm start at x0, default y at the observed
    nodes and 0 elsewhere); z- and dual steps unchanged.
    ``offsets`` (``Neighbourhood.edge_flat_offsets``): the shift fast path of the incidence mat-vecs.
    Returns x, or (x, z, μ) with ``return_state``.
    """
    o = _observed(observed_mask, y)
    if offsets is not None:
        weights = column_major(weights)  # every edge column a contiguous node vector for the shift fast path
    cw = functools.partial(incidence_matvec, weights, index, offsets=offsets)
    cwt = functools.partial(incidence_t_matvec, weights, index, offsets=offsets)
    normal = incidence_gram_operator(weights, index, offsets=offsets)  # C_wᵀ C_w v = L_{w²} v
    _check_fidelity(fidelity)
    u = 1 - o
    y_o = o * y
    rhos = _per_iteration(rho, iters, "rho")
    steps = _admm_steps(step_sizes, iters, cg_iters)

    if fidelity is None:
        x = y_o + (u * x0 if x0 is not None else 0)
        fixed = normal(y_o)  # (C_wᵀC_w) P_o y
    else:
        x = y_o if x0 is None else x0
        gram = incidence_gram_diagonal(weights, index)  # diag(C_wᵀC_w), balances the relaxed x-step
    cx = cw(x)
    z = torch.zeros_like(cx)
    mu = torch.zeros_like(cx)
    for t in range(iters):
        r = _on_edges(rhos[t])
        pull = cwt(z - mu / r)
        if fidelity is None:
            x_u = conjugate_gradient(lambda v: u * normal(u * v), u * (pull - fixed), u * x, cg_iters,
                                     step_sizes=steps[t])
            x = y_o + u * x_u
        else:
            q = 2 * fidelity / rhos[t]
            x = _relaxed_solve(normal, gram, o, q, q * y_o + pull, x, cg_iters, steps[t])
        cx = cw(x)
        z = soft_threshold(cx + mu / r, 1 / r)
        mu = mu + r * (cx - z)
    return (x, z, mu) if return_state else x


def glr_denoise(v: torch.Tensor, laplacian_matvec: MatVec, mu, iters: int, *, x0: torch.Tensor | None = None,
                step_sizes: StepSizes | None = None, inner_weights: torch.Tensor | None = None) -> torch.Tensor:
    """GLR denoising min_x ‖x − v‖² + μ xᵀLx, i.e. (I + μL) x = v, by K CG steps from x0 (default v).

    The graph low-pass filter used inside transformer layers (no interpolation constraint there).
    ``mu``: float or tensor broadcastable to v (e.g. [G, 1, 1] per graph). Exact CG (``step_sizes=None``) on a
    row-normalised L = D⁻¹L_sym (not symmetric) needs ``inner_weights`` = the degrees d [..., N, 1]
    (``core.graph.row_inner_weights``): I + μD⁻¹L_sym is self-adjoint in ⟨·,·⟩_D (:func:`conjugate_gradient`).
    """
    return conjugate_gradient(lambda s: _plus_scaled(s, mu, laplacian_matvec(s)), v, v if x0 is None else x0, iters,
                              step_sizes=step_sizes, inner_weights=inner_weights)


def gtv_admm_denoise(v: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, lam, rho, iters: int,
                     cg_iters: int, *, x0: torch.Tensor | None = None, step_sizes=None, directed: bool = False,
                     offsets=None, return_state: bool = False):
    """GTV denoising min_x ½‖x − v‖² + λ‖C_w x‖₁ by ``iters`` unrolled (scaled-dual) ADMM iterations.

    With x = x0 (default v) and scaled dual u = 0, each iteration does
        z-step: z = soft_{λ/ρ}(C_w x + u)
        x-step: (I + ρ C_wᵀC_w) x = v + ρ C_wᵀ(z − u)        (``cg_iters`` CG steps, warm start)
        dual:   u ← u + C_w x − z
    (the A.3 splitting with the z-step first, so the first iteration already smooths). ``weights`` /
    ``index``: undirected edge set. ``lam``, ``rho``: floats or tensors broadcastable to the node
    signal [B, G, N, C] (e.g. [G, 1, 1] per graph; lifted to the edges internally); ``rho`` may be a
    list, one per iteration. ``step_sizes``: as in
    :func:`gtv_admm_interpolate`. ``directed=True`` replaces C_wᵀ by its head part
    (``incidence_t_matvec(directed=True)``), so a node only reacts to its own edges: on a causal edge
    set the output at i then depends on nodes ≤ i only (a directed GTV; with learned step sizes).
    ``offsets`` (``Neighbourhood.edge_flat_offsets``): the shift fast path of the incidence mat-vecs.
    """
    rhos = _per_iteration(rho, iters, "rho")
    steps = _admm_steps(step_sizes, iters, cg_iters)
    if directed and any(s is None for s in steps) and iters > 0 and cg_iters > 0:
        raise ValueError("step_sizes: directed=True needs learned (alpha, beta): exact CG's inner products "
                         "mix all nodes and the directed operator is not symmetric")

    if offsets is not None:
        weights = column_major(weights)  # every edge column a contiguous node vector for the shift fast path
    cw = functools.partial(incidence_matvec, weights, index, offsets=offsets)
    ct = functools.partial(incidence_t_matvec, weights, index, directed=directed, offsets=offsets)
    normal = incidence_gram_operator(weights, index, directed=directed, offsets=offsets)  # ct(cw(s))
    x = v if x0 is None else x0
    cx = cw(x)
    u = torch.zeros_like(cx)
    z = u
    for t in range(iters):
        r, r_e = rhos[t], _on_edges(rhos[t])
        z = soft_threshold(cx + u, _on_edges(lam) / r_e)
        b = _plus_scaled(v, r, ct(z - u))
        x = conjugate_gradient(lambda s: _plus_scaled(s, r, normal(s)), b, x, cg_iters, step_sizes=steps[t])
        cx = cw(x)  # C_w x of the new x, reused by the next z-step
        u = u + cx - z
    return (x, z, u) if return_state else x


__all__ = [
    "conjugate_gradient", "glr_denoise", "glr_interpolate", "gtv_admm_denoise", "gtv_admm_interpolate",
    "soft_threshold",
]
