"""Unrolled CG / GLR interpolation / GTV-ADMM (core/solvers.py) against dense references, float64."""
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unrollattn.core.graph import (
    build_neighbourhood, degree, edge_weights, incidence_matvec, laplacian_matvec, neighbour_mask, row_inner_weights,
)
from unrollattn.core.reference import (
    cg_reference, dense_incidence, dense_laplacian, glr_interpolate_reference, glr_relaxed_reference,
    gtv_admm_reference, gtv_denoise_reference,
)
from unrollattn.core.solvers import (
    conjugate_gradient, glr_denoise, glr_interpolate, gtv_admm_denoise, gtv_admm_interpolate, soft_threshold,
)

D = torch.float64


def spd(n, batch=(), cond=10.0):
    q, _ = torch.linalg.qr(torch.randn(*batch, n, n, dtype=D))
    eig = torch.linspace(1.0, cond, n, dtype=D)
    return q @ torch.diag_embed(eig.expand(*batch, n)) @ q.transpose(-1, -2)


def graph(kind="8", shape=(4, 4), b=2, g=2, normalization="symmetric"):
    nbhd = build_neighbourhood(kind, shape)
    w = edge_weights(torch.randn(b, g, nbhd.num_nodes, 3, dtype=D), nbhd, normalization=normalization)
    return nbhd, w


# ------------------------------------------------------------------------------------------------- CG
def test_exact_cg_solves_spd_system_in_n_steps():
    a = spd(6, (2, 3))
    b = torch.randn(2, 3, 6, 4, dtype=D)
    x = conjugate_gradient(lambda v: a @ v, b, iters=6)
    torch.testing.assert_close(x, torch.linalg.solve(a, b))


def test_exact_cg_matches_textbook_loop_at_every_depth():
    a = spd(7, cond=50.0)
    b, x0 = torch.randn(7, dtype=D), torch.randn(7, dtype=D)
    for k in (1, 2, 4):
        fast = conjugate_gradient(lambda v: a @ v, b[:, None], x0[:, None], k)[:, 0]
        torch.testing.assert_close(fast, cg_reference(a, b, x0, k))
    assert not torch.allclose(conjugate_gradient(lambda v: a @ v, b[:, None], iters=2)[:, 0], torch.linalg.solve(a, b))


def test_columns_are_independent_systems():
    a = spd(5)
    b = torch.randn(5, 3, dtype=D)
    both = conjugate_gradient(lambda v: a @ v, b, iters=3)
    for c in range(3):
        torch.testing.assert_close(both[:, c], cg_reference(a, b[:, c], None, 3))


def test_exact_cg_gradient_is_the_inverse_after_n_steps():
    a = spd(5)
    b = torch.randn(5, 1, dtype=D, requires_grad=True)
    (grad,) = torch.autograd.grad(conjugate_gradient(lambda v: a @ v, b, iters=5).sum(), b)
    torch.testing.assert_close(grad, torch.linalg.solve(a, torch.ones(5, 1, dtype=D)), atol=1e-8, rtol=1e-8)


def test_zero_residual_is_safe():
    a = spd(4)
    b = torch.zeros(4, 2, dtype=D, requires_grad=True)
    x = conjugate_gradient(lambda v: a @ v, b, iters=4)
    assert torch.equal(x, torch.zeros_like(x))
    (grad,) = torch.autograd.grad(x.sum(), b)
    assert torch.isfinite(grad).all()
    exact = torch.linalg.solve(a, torch.ones(4, 1, dtype=D))
    x = conjugate_gradient(lambda v: a @ v, torch.ones(4, 1, dtype=D), exact, iters=3)  # starts converged
    torch.testing.assert_close(x, exact)


def test_learned_step_cg_matches_reference_and_is_differentiable():
    a = spd(6, (3,))
    b = torch.randn(2, 3, 6, 2, dtype=D)
    alpha = (0.1 + 0.2 * torch.rand(4, 3, 1, 1, dtype=D)).requires_grad_()
    beta = (0.3 * torch.rand(3, 3, 1, 1, dtype=D)).requires_grad_()
    x = conjugate_gradient(lambda v: a @ v, b, iters=4, step_sizes=(alpha, beta))
    for bi in range(2):
        for g in range(3):
            ref = cg_reference(a[g], b[bi, g, :, 1], None, 4, alpha[:, g, 0, 0], beta[:, g, 0, 0])
            torch.testing.assert_close(x[bi, g, :, 1], ref)
    assert torch.autograd.gradcheck(
        lambda al, be, rhs: conjugate_gradient(lambda v: a @ v, rhs, iters=4, step_sizes=(al, be)),
        (alpha, beta, b.clone().requires_grad_()))


def test_bad_step_sizes_raise():
    a = spd(3)
    b = torch.randn(3, 1, dtype=D)
    with pytest.raises(ValueError, match=r"alpha of shape \[K=3"):
        conjugate_gradient(lambda v: a @ v, b, iters=3, step_sizes=(torch.ones(2), torch.ones(2)))
    with pytest.raises(ValueError, match=r"beta of shape \[K-1=2"):
        conjugate_gradient(lambda v: a @ v, b, iters=3, step_sizes=(torch.ones(3), torch.ones(1)))
    with pytest.raises(ValueError, match="x0"):
        conjugate_gradient(lambda v: a @ v, b, torch.zeros(2, 1, dtype=D), iters=3)


def _row_problem():
    """A row-normalised 4-neighbour graph on 3x4 (I + μD⁻¹L is not symmetric) and its degree weights."""
    nbhd = build_neighbourhood("4", (3, 4))
    f = torch.randn(2, 2, 12, 2, dtype=D, requires_grad=True)
    w, log_deg = edge_weights(f, nbhd, normalization="row", return_log_degree=True)
    return nbhd, f, w, row_inner_weights(log_deg), functools.partial(laplacian_matvec, w, nbhd.index)


def test_degree_weighted_cg_is_exact_on_a_row_normalised_laplacian():
    """Plain exact CG on I + μD⁻¹L silently solves nothing in particular (it assumes symmetry); with the degrees as
    inner-product weights, n steps give the dense float64 solve, values and gradients."""
    nbhd, f, w, d, lap = _row_problem()
    mu = torch.tensor([2.0, 20.0], dtype=D).view(2, 1, 1).requires_grad_()
    v = torch.rand(2, 2, 12, 3, dtype=D, requires_grad=True)
    a = torch.eye(12, dtype=D) + mu * dense_laplacian(w, nbhd.index, 12)
    assert not torch.allclose(a, a.transpose(-1, -2))
    ref = torch.linalg.solve(a, v)
    assert not torch.allclose(glr_denoise(v, lap, mu, iters=12), ref, atol=1e-3)  # the defect
    x = glr_denoise(v, lap, mu, iters=12, inner_weights=d)
    torch.testing.assert_close(x, ref)
    assert v.min() <= x.min() and x.max() <= v.max()  # an averaging filter stays within the signal's range
    probe = torch.randn_like(ref)
    for a_, b_ in zip(torch.autograd.grad((x * probe).sum(), [v, f, mu], retain_graph=True),
                      torch.autograd.grad((ref * probe).sum(), [v, f, mu], retain_graph=True)):
        torch.testing.assert_close(a_, b_)
    # the scale of the weights is irrelevant; a bad shape is a clear error
    torch.testing.assert_close(glr_denoise(v, lap, mu, iters=12, inner_weights=7 * d.detach()), ref.detach())
    with pytest.raises(ValueError, match="inner_weights: expected positive node weights broadcastable to b"):
        conjugate_gradient(lambda s: s, v, iters=2, inner_weights=torch.ones(5, 1, dtype=D))


def test_degree_weighted_cg_makes_row_normalised_interpolation_exact():
    """Hard constraint (P_u D⁻¹L P_u) and relaxed, Jacobi-balanced (μP_o + D⁻¹L) systems stay self-adjoint in the
    degree-weighted inner product: n exact CG steps equal the dense solves."""
    nbhd, f, w, d, lap = _row_problem()
    observed = torch.zeros(12, dtype=torch.bool)
    observed[[0, 5, 11]] = True
    y = torch.randn(2, 2, 12, 2, dtype=D)
    dense = dense_laplacian(w, nbhd.index, 12)
    ref = _per_column(lambda b, g, c: glr_interpolate_reference(observed, y[b, g, :, c], dense[b, g]), y)
    torch.testing.assert_close(glr_interpolate(observed, y, lap, iters=9, inner_weights=d), ref)
    mu = torch.tensor([0.5, 3.0], dtype=D).view(2, 1, 1)
    relaxed = _per_column(lambda b, g, c: glr_relaxed_reference(observed, y[b, g, :, c], dense[b, g], mu[g, 0, 0]), y)
    assert not torch.allclose(glr_interpolate(observed, y, lap, iters=12, fidelity=mu), relaxed, atol=1e-3)
    torch.testing.assert_close(glr_interpolate(observed, y, lap, iters=12, fidelity=mu, inner_weights=d), relaxed)
    torch.testing.assert_close(glr_interpolate(observed, y, lap, iters=12, fidelity=mu, diagonal=degree(w),
                                               inner_weights=d), relaxed)


# ------------------------------------------------------------------------------------ GLR interpolation
def _per_column(fn, *tensors):
    b, g, _, c = tensors[0].shape
    return torch.stack([torch.stack([torch.stack([fn(bi, gi, ci) for ci in range(c)], -1) for gi in range(g)])
                        for bi in range(b)])


def _glr_problem(chans):
    """Features f -> symmetric 8-neighbour graph on 4x4, ~40% observed (corners always), y [2, 2, 16, chans]."""
    nbhd = build_neighbourhood("8", (4, 4))
    f = torch.randn(2, 2, 16, 3, dtype=D, requires_grad=True)
    w = edge_weights(f, nbhd, normalization="symmetric")
    observed = torch.rand(16) < 0.4
    observed[[0, 15]] = True
    y = torch.randn(2, 2, 16, chans, dtype=D, requires_grad=True)
    return nbhd, f, w, observed, y, functools.partial(laplacian_matvec, w, nbhd.index)


def test_glr_interpolation_matches_dense_solve_and_keeps_observations():
    nbhd, f, w, observed, y, lap = _glr_problem(3)
    x = glr_interpolate(observed, y, lap, iters=int((~observed).sum()))
    dense = dense_laplacian(w, nbhd.index, 16)
    ref = _per_column(lambda b, g, c: glr_interpolate_reference(observed, y[b, g, :, c], dense[b, g]), y)
    torch.testing.assert_close(x, ref)
    assert torch.equal(x[:, :, observed], y[:, :, observed])
    # gradients through n exact CG steps equal the solve's along symmetric perturbations of L, i.e. w.r.t.
    # the features that generate the symmetric weights (not w.r.t. one entry w_ij without w_ji)
    probe = torch.randn_like(ref)
    g_fast = torch.autograd.grad((x * probe).sum(), [y, f], retain_graph=True)
    for a, b in zip(g_fast, torch.autograd.grad((ref * probe).sum(), [y, f], retain_graph=True)):
        torch.testing.assert_close(a, b)
    few = glr_interpolate(observed, y, lap, iters=2)  # truncated solve: observations still exact
    assert torch.equal(few[:, :, observed], y[:, :, observed])
    assert not torch.allclose(few, ref)


def test_glr_interpolation_reproduces_constants_and_learned_steps():
    nbhd, w = graph("4", (3, 5), normalization="row")
    observed = torch.zeros(15, dtype=torch.bool)
    observed[::4] = True
    y = torch.full((2, 2, 15, 1), 3.0, dtype=D)
    lap = functools.partial(laplacian_matvec, w, nbhd.index)
    torch.testing.assert_close(glr_interpolate(observed, y, lap, iters=3, x0=torch.full_like(y, 3.0)), y)
    alpha = torch.full((3, 2, 1, 1), 0.3, dtype=D, requires_grad=True)
    beta = torch.full((2, 2, 1, 1), 0.1, dtype=D, requires_grad=True)
    x = glr_interpolate(observed, torch.randn_like(y), lap, iters=3, step_sizes=(alpha, beta))
    grads = torch.autograd.grad(x.square().sum(), [alpha, beta])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_glr_interpolation_with_an_isolated_node_is_finite():
    nbhd = build_neighbourhood("8", (3, 3))
    keep = torch.ones(9, 9, dtype=torch.bool)
    keep[4, :] = keep[:, 4] = False
    w = edge_weights(torch.randn(1, 1, 9, 2, dtype=D), nbhd, normalization="symmetric",
                     mask=neighbour_mask(keep, nbhd.index))
    observed = torch.tensor([1, 0, 1, 0, 0, 0, 1, 0, 1], dtype=torch.bool)
    y = torch.randn(1, 1, 9, 1, dtype=D)
    for iters in (2, 9):
        x = glr_interpolate(observed, y, functools.partial(laplacian_matvec, w, nbhd.index), iters)
        assert torch.isfinite(x).all() and x[0, 0, 4, 0] == 0  # unreachable node keeps its start value
    x = gtv_admm_interpolate(observed, y, *_edges(nbhd, w), iters=3, cg_iters=4, rho=1.0)
    assert torch.isfinite(x).all() and x[0, 0, 4, 0] == 0
    # relaxed data term: the isolated unobserved node's row of μP_o + L is 0, so the system is singular there;
    # CG's residual is 0 at that node and it keeps its start value, the rest is the solve on the other nodes
    lap = functools.partial(laplacian_matvec, w, nbhd.index)
    for iters in (2, 9):
        for diagonal in (None, degree(w)):  # degree 0 at the isolated node: the balancing clamps it
            x = glr_interpolate(observed, y, lap, iters, fidelity=2.0, diagonal=diagonal)
            assert torch.isfinite(x).all() and x[0, 0, 4, 0] == 0
    x = gtv_admm_interpolate(observed, y, *_edges(nbhd, w), iters=3, cg_iters=4, rho=1.0, fidelity=2.0)
    assert torch.isfinite(x).all() and x[0, 0, 4, 0] == 0


def test_observed_mask_shapes():
    nbhd, w = graph("4", (3, 3))
    lap = functools.partial(laplacian_matvec, w, nbhd.index)
    y = torch.randn(2, 2, 9, 1, dtype=D)
    per_batch = torch.rand(2, 1, 9, 1) < 0.5
    per_batch[:, :, 0] = True
    x = glr_interpolate(per_batch, y, lap, iters=5)
    assert torch.equal(x[per_batch.expand_as(x)], y[per_batch.expand_as(y)])
    with pytest.raises(ValueError, match="observed_mask"):
        glr_interpolate(torch.ones(8, dtype=torch.bool), y, lap, iters=2)
    with pytest.raises(ValueError, match="observed_mask"):
        glr_interpolate(torch.ones(3, 1, 9, 1, dtype=torch.bool), y, lap, iters=2)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2 ** 16), kind=st.sampled_from(["4", "8", "window3"]), fraction=st.floats(0.1, 0.9))
def test_glr_interpolation_property(seed, kind, fraction):
    """Any observation pattern with ≥ 1 sample on a connected grid: exact CG = direct solve, x_o = y."""
    gen = torch.Generator().manual_seed(seed)
    nbhd = build_neighbourhood(kind, (3, 4))
    w = edge_weights(torch.randn(1, 1, 12, 2, dtype=D, generator=gen), nbhd, normalization="symmetric")
    observed = torch.rand(12, generator=gen) < fraction
    observed[int(torch.randint(12, (1,), generator=gen))] = True
    y = torch.randn(1, 1, 12, 1, dtype=D, generator=gen)
    x = glr_interpolate(observed, y, functools.partial(laplacian_matvec, w, nbhd.index), iters=12)
    ref = glr_interpolate_reference(observed, y[0, 0, :, 0], dense_laplacian(w, nbhd.index, 12)[0, 0])
    torch.testing.assert_close(x[0, 0, :, 0], ref, atol=1e-7, rtol=1e-7)
    assert torch.equal(x[0, 0, observed], y[0, 0, observed])


def test_relaxed_glr_matches_dense_solve_and_tends_to_the_constraint():
    """min μ‖Hx − y‖² + xᵀLx: n exact CG steps = the dense solve of (μ P_o + L) x = μ P_o y, per column, with a
    per-graph μ; the observed samples are filtered (not copied); μ → ∞ gives the hard-constraint solution."""
    nbhd, f, w, observed, y, lap = _glr_problem(2)
    mu = torch.tensor([0.5, 3.0], dtype=D).view(2, 1, 1).requires_grad_()
    x = glr_interpolate(observed, y, lap, iters=16, fidelity=mu)
    dense = dense_laplacian(w, nbhd.index, 16)
    ref = _per_column(lambda b, g, c: glr_relaxed_reference(observed, y[b, g, :, c], dense[b, g], mu[g, 0, 0]), y)
    torch.testing.assert_close(x, ref)
    assert not torch.allclose(x[:, :, observed], y[:, :, observed])
    probe = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((x * probe).sum(), [y, f, mu], retain_graph=True),
                    torch.autograd.grad((ref * probe).sum(), [y, f, mu], retain_graph=True)):
        torch.testing.assert_close(a, b)
    # the Jacobi-balanced system (diagonal = degrees) has the same minimiser and gradients
    balanced = glr_interpolate(observed, y, lap, iters=40, fidelity=mu, diagonal=degree(w))
    torch.testing.assert_close(balanced, ref)
    for a, b in zip(torch.autograd.grad((balanced * probe).sum(), [y, f, mu], retain_graph=True),
                    torch.autograd.grad((ref * probe).sum(), [y, f, mu], retain_graph=True)):
        torch.testing.assert_close(a, b)
    hard = glr_interpolate(observed, y, lap, iters=16)
    stiff = _per_column(lambda b, g, c: glr_relaxed_reference(observed, y[b, g, :, c], dense[b, g], 1e7), y)
    torch.testing.assert_close(stiff, hard, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="fidelity"):
        glr_interpolate(observed, y, lap, iters=2, fidelity=0.0)


def test_relaxed_glr_keeps_constants_and_takes_learned_steps():
    nbhd, w = graph("4", (3, 5))
    observed = torch.zeros(15, dtype=torch.bool)
    observed[::4] = True
    y = torch.full((2, 2, 15, 1), 3.0, dtype=D)
    lap = functools.partial(laplacian_matvec, w, nbhd.index)
    for diagonal in (None, degree(w)):
        torch.testing.assert_close(glr_interpolate(observed, y, lap, iters=3, x0=torch.full_like(y, 3.0), fidelity=2.0,
                                                   diagonal=diagonal), y)
    alpha = torch.full((3, 2, 1, 1), 0.3, dtype=D, requires_grad=True)
    beta = torch.full((2, 2, 1, 1), 0.1, dtype=D, requires_grad=True)
    x = glr_interpolate(observed, torch.randn_like(y), lap, iters=3, step_sizes=(alpha, beta), fidelity=1.0,
                        diagonal=degree(w))
    grads = torch.autograd.grad(x.square().sum(), [alpha, beta])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------------------------------------- GTV
def _edges(nbhd, w):
    index_e, _, cols = nbhd.edges()
    return w.index_select(-1, cols), index_e


def test_soft_threshold():
    v = torch.tensor([-3.0, -0.5, 0.0, 0.5, 2.0])
    torch.testing.assert_close(soft_threshold(v, 1.0), torch.tensor([-2.0, 0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(soft_threshold(v, torch.tensor(0.0)), v)


def test_gtv_admm_interpolation_matches_dense_reference():
    nbhd, w = graph("8", (3, 4))
    w_e, index_e = _edges(nbhd, w)
    observed = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0, 1, 0, 0, 1], dtype=torch.bool)
    y = torch.randn(2, 2, 12, 2, dtype=D)
    x, z, mu = gtv_admm_interpolate(observed, y, w_e, index_e, iters=4, cg_iters=int((~observed).sum()), rho=0.7,
                                    return_state=True)
    c = dense_incidence(w_e, index_e, 12)
    for b in range(2):
        for g in range(2):
            for ch in range(2):
                xr, zr, mur = gtv_admm_reference(observed, y[b, g, :, ch], c[b, g], iters=4, rho=0.7)
                torch.testing.assert_close(x[b, g, :, ch], xr, atol=1e-8, rtol=1e-8)
                torch.testing.assert_close(z[b, g, :, :, ch].flatten(), zr, atol=1e-8, rtol=1e-8)
                torch.testing.assert_close(mu[b, g, :, :, ch].flatten(), mur, atol=1e-8, rtol=1e-8)
    assert torch.equal(x[:, :, observed], y[:, :, observed])
    fast = gtv_admm_interpolate(observed, y, w_e, index_e, iters=4, cg_iters=int((~observed).sum()), rho=0.7,
                                offsets=nbhd.edge_flat_offsets)  # shift fast path of the incidence mat-vecs
    torch.testing.assert_close(fast, x)


def test_relaxed_gtv_admm_matches_dense_reference():
    """min γ‖Hx − y‖² + ‖C_w x‖₁ by ADMM: converged x-steps (exact CG on the balanced system) = the dense reference
    built from the Lagrangian."""
    nbhd, w = graph("8", (3, 4))
    w_e, index_e = _edges(nbhd, w)
    observed = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0, 1, 0, 0, 1], dtype=torch.bool)
    y = torch.randn(2, 2, 12, 2, dtype=D)
    gamma = torch.tensor([0.3, 2.0], dtype=D).view(2, 1, 1)
    x, z, mu = gtv_admm_interpolate(observed, y, w_e, index_e, iters=4, cg_iters=40, rho=0.7, fidelity=gamma,
                                    return_state=True)
    c = dense_incidence(w_e, index_e, 12)
    for b in range(2):
        for g in range(2):
            for ch in range(2):
                xr, zr, mur = gtv_admm_reference(observed, y[b, g, :, ch], c[b, g], iters=4, rho=0.7,
                                                 fidelity=float(gamma[g]))
                torch.testing.assert_close(x[b, g, :, ch], xr, atol=1e-8, rtol=1e-8)
                torch.testing.assert_close(z[b, g, :, :, ch].flatten(), zr, atol=1e-8, rtol=1e-8)
                torch.testing.assert_close(mu[b, g, :, :, ch].flatten(), mur, atol=1e-8, rtol=1e-8)
    assert not torch.allclose(x[:, :, observed], y[:, :, observed])


def test_gtv_admm_interpolation_learned_steps_are_differentiable_and_exact_on_observations():
    nbhd, w = graph("4", (4, 4))
    w = w.detach().requires_grad_()
    w_e, index_e = _edges(nbhd, w)
    observed = torch.rand(16) < 0.5
    observed[0] = True
    y = torch.randn(2, 2, 16, 1, dtype=D, requires_grad=True)
    steps = [(torch.full((2, 2, 1, 1), 0.2, dtype=D, requires_grad=True),
              torch.full((1, 2, 1, 1), 0.1, dtype=D, requires_grad=True)) for _ in range(3)]
    rho = torch.tensor([0.5, 2.0], dtype=D).view(2, 1, 1).requires_grad_()
    x = gtv_admm_interpolate(observed, y, w_e, index_e, iters=3, cg_iters=2, rho=rho, step_sizes=steps)
    assert torch.equal(x[:, :, observed], y[:, :, observed])
    leaves = [y, w, rho] + [t for pair in steps for t in pair]
    grads = torch.autograd.grad(x.square().sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads) and grads[2].abs().sum() > 0


def test_gtv_admm_denoise_matches_dense_reference():
    nbhd, w = graph("window3", (3, 3), g=1)
    w_e, index_e = _edges(nbhd, w)
    v = torch.randn(2, 1, 9, 2, dtype=D)
    x = gtv_admm_denoise(v, w_e, index_e, lam=0.3, rho=[1.0, 0.5, 2.0], iters=3, cg_iters=9)
    c = dense_incidence(w_e, index_e, 9)
    ref = _per_column(lambda b, g, ch: gtv_denoise_reference(v[b, g, :, ch], c[b, g], 0.3, [1.0, 0.5, 2.0], 3), v)
    torch.testing.assert_close(x, ref, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("kind, shape, directed", [("8", (3, 4), False), ("window5", (5, 4), False),
                                                   ("causal2", 7, True)])
def test_gtv_admm_denoise_shift_fast_path_matches_the_gather(kind, shape, directed):
    """offsets= (Neighbourhood.edge_flat_offsets): the same values and gradients (signal, weights, λ, ρ, steps) as
    the gathered incidence mat-vecs."""
    nbhd = build_neighbourhood(kind, shape, include_self=directed)
    n = nbhd.index.shape[0]
    f = torch.randn(2, 2, n, 3, dtype=D)
    w = edge_weights(f, nbhd, normalization="row" if directed else "symmetric").requires_grad_()
    v = torch.randn(2, 2, n, 2, dtype=D, requires_grad=True)
    lam = torch.tensor([0.2, 0.5], dtype=D, requires_grad=True)
    rho = torch.tensor([1.5, 0.8], dtype=D, requires_grad=True)
    alphas = torch.full((2, 2), 0.3, dtype=D, requires_grad=True)
    steps = [(alphas[i].view(2, 1, 1, 1) + 0.05 * i, torch.full((1, 1, 1, 1), 0.1, dtype=D)) for i in range(2)]
    outputs = []
    for offsets in (None, nbhd.edge_flat_offsets):
        w_e, index_e = _edges(nbhd, w)
        x = gtv_admm_denoise(v, w_e, index_e, lam=lam.view(1, 2, 1, 1), rho=rho.view(1, 2, 1, 1), iters=2,
                             cg_iters=2, step_sizes=steps, directed=directed, offsets=offsets)
        outputs.append((x, torch.autograd.grad(x.square().sum(), (v, w, lam, rho, alphas))))
    (slow, g_slow), (fast, g_fast) = outputs
    torch.testing.assert_close(fast, slow)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b)


def test_gtv_admm_denoise_converges_to_the_minimiser():
    nbhd, w = graph("4", (3, 4), b=1, g=1, normalization="none")
    w_e, index_e = _edges(nbhd, w)
    v = torch.randn(1, 1, 12, 1, dtype=D)
    lam = 0.4

    def objective(s):
        return 0.5 * (s - v).square().sum() + lam * incidence_matvec(w_e, index_e, s).abs().sum()

    x = gtv_admm_denoise(v, w_e, index_e, lam=lam, rho=1.0, iters=300, cg_iters=12)
    best = objective(x)
    assert best < objective(v) - 1e-3  # smoothing helps
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        assert best <= objective(x + 1e-3 * torch.randn(x.shape, dtype=D, generator=gen)) + 1e-9


def test_directed_gtv_matches_reference_and_is_causal():
    nbhd = build_neighbourhood("causal2", 7, include_self=True)
    f = torch.randn(1, 1, 7, 2, dtype=D)
    w = edge_weights(f, nbhd, normalization="row")
    w_e, index_e = _edges(nbhd, w)
    v = torch.randn(1, 1, 7, 1, dtype=D, requires_grad=True)
    alphas = [torch.tensor([0.4, 0.3], dtype=D), torch.tensor([0.35, 0.3], dtype=D)]
    betas = [torch.tensor([0.1], dtype=D), torch.tensor([0.05], dtype=D)]
    steps = [(a.view(2, 1, 1, 1), b.view(1, 1, 1, 1)) for a, b in zip(alphas, betas)]
    x = gtv_admm_denoise(v, w_e, index_e, lam=0.2, rho=1.5, iters=2, cg_iters=2, step_sizes=steps, directed=True)
    c = dense_incidence(w_e, index_e, 7)[0, 0]
    heads = c.clamp_min(0)  # rows keep only +w at the head node
    ref = gtv_denoise_reference(v[0, 0, :, 0], c, 0.2, 1.5, 2, 2, alphas, betas, heads_only=heads)
    torch.testing.assert_close(x[0, 0, :, 0], ref)
    for t in range(7):  # output t depends on v_0..v_t only
        (grad,) = torch.autograd.grad(x[0, 0, t, 0], v, retain_graph=True)
        assert (grad[0, 0, t + 1:] == 0).all() and grad[0, 0, t, 0] != 0
    with pytest.raises(ValueError, match="directed=True needs learned"):
        gtv_admm_denoise(v, w_e, index_e, lam=0.2, rho=1.5, iters=2, cg_iters=2, directed=True)


def test_glr_denoise_is_the_graph_low_pass_filter():
    nbhd, w = graph("8", (3, 3))
    v = torch.randn(2, 2, 9, 3, dtype=D)
    mu = torch.tensor([0.5, 2.0], dtype=D).view(2, 1, 1)
    x = glr_denoise(v, functools.partial(laplacian_matvec, w, nbhd.index), mu, iters=9)
    a = torch.eye(9, dtype=D) + mu[None] * dense_laplacian(w, nbhd.index, 9)
    torch.testing.assert_close(x, torch.linalg.solve(a, v))
    const = torch.ones(2, 2, 9, 1, dtype=D)
    torch.testing.assert_close(glr_denoise(const, functools.partial(laplacian_matvec, w, nbhd.index), mu, 3), const)
