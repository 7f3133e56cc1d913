"""Sparse neighbourhood graphs (core/graph.py) against dense references (core/reference.py), float64."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unrollattn.core.graph import (
    adjacency_matvec, build_neighbourhood, degree, edge_weights, equivalent_band, grid_offsets,
    edge_logits, incidence_gram_diagonal, incidence_gram_operator, incidence_matvec, incidence_t_matvec, laplacian_matvec,
    laplacian_operator, metric_features, neighbour_mask, normalize_edges, sequence_offsets,
)
from unrollattn.core.reference import (
    dense_adjacency, dense_incidence, dense_laplacian, graph_weights_reference, neighbourhood_reference,
)

D = torch.float64


def dense_support(nbhd):
    """bool [n, n] from (index, valid)."""
    n = nbhd.num_nodes
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for c in range(nbhd.size):
            if nbhd.valid[i, c]:
                assert not out[i, int(nbhd.index[i, c])], "duplicate neighbour"
                out[i, int(nbhd.index[i, c])] = True
    return out


def random_weights(nbhd, b=2, g=3, symmetric=True):
    """Positive weights on valid edges (0 elsewhere); symmetric ones come from a symmetric similarity."""
    f = torch.randn(b, g, nbhd.num_nodes, 4, dtype=D)
    if symmetric:
        return edge_weights(f, nbhd, normalization="none")
    return torch.rand(b, g, nbhd.num_nodes, nbhd.size, dtype=D) * nbhd.valid


# ---------------------------------------------------------------------------------------- neighbourhoods
@pytest.mark.parametrize("kind,shape", [("4", (3, 4)), ("8", (3, 4)), ("window3", (4, 3)), ("window5", (4, 5)),
                                        ("8", (2, 2)), ("4", (2, 5))])
@pytest.mark.parametrize("include_self", [False, True])
def test_grid_neighbourhood_matches_coordinate_definition(kind, shape, include_self):
    nbhd = build_neighbourhood(kind, shape, include_self=include_self)
    assert nbhd.index.shape == (shape[0] * shape[1], len(grid_offsets(kind)) + include_self)
    assert torch.equal(dense_support(nbhd), neighbourhood_reference(kind, shape, include_self))
    rows = torch.arange(nbhd.num_nodes)[:, None].expand_as(nbhd.index)
    assert torch.equal(nbhd.index[~nbhd.valid], rows[~nbhd.valid])  # invalid columns point at the node itself


def test_borders_of_a_small_grid_by_hand():
    four = build_neighbourhood("4", (3, 4))
    assert four.offsets == ((-1, 0), (0, -1), (0, 1), (1, 0))
    assert set(four.index[0][four.valid[0]].tolist()) == {1, 4}  # top-left corner
    assert set(four.index[5][four.valid[5]].tolist()) == {1, 4, 6, 9}  # interior (1, 1)
    assert set(four.index[11][four.valid[11]].tolist()) == {7, 10}  # bottom-right corner
    eight = build_neighbourhood("8", (3, 4))
    assert eight.valid.sum(1).tolist() == [3, 5, 5, 3, 5, 8, 8, 5, 3, 5, 5, 3]
    assert build_neighbourhood("window5", (5, 5)).valid[12].all()  # the centre sees its whole 5x5 window
    assert len(grid_offsets("window5")) == 24 and len(grid_offsets("8")) == 8


@pytest.mark.parametrize("kind", ["band1", "band3", "causal1", "causal3"])
@pytest.mark.parametrize("include_self", [False, True])
def test_sequence_neighbourhoods(kind, include_self):
    nbhd = build_neighbourhood(kind, 7, include_self=include_self)
    assert torch.equal(dense_support(nbhd), neighbourhood_reference(kind, (7,), include_self))
    if kind.startswith("causal"):
        assert (nbhd.index[nbhd.valid] <= torch.arange(7)[:, None].expand_as(nbhd.index)[nbhd.valid]).all()
        assert nbhd.valid[0].sum() == int(include_self)  # the first token has no past
    assert sequence_offsets("causal2") == (-2, -1) and sequence_offsets("band2", include_self=True) == (-2, -1, 0, 1, 2)


def test_neighbourhoods_are_cached_and_symmetry_is_reported():
    assert build_neighbourhood("8", (4, 4)) is build_neighbourhood("8", [4, 4])
    assert build_neighbourhood("8", (4, 4)) is not build_neighbourhood("8", (4, 5))
    assert build_neighbourhood("window3", (4, 4)).is_symmetric
    assert build_neighbourhood("band2", 6).is_symmetric
    assert not build_neighbourhood("causal2", 6).is_symmetric


@pytest.mark.parametrize("kind,shape", [("4", (3, 4)), ("8", (3, 3)), ("window5", (4, 4)), ("band2", (6,)),
                                        ("causal2", (6,))])
def test_undirected_edge_set_lists_every_edge_once(kind, shape):
    nbhd = build_neighbourhood(kind, shape, include_self=kind.startswith("causal"))
    index_e, valid_e, cols = nbhd.edges()
    seen = []
    for i in range(nbhd.num_nodes):
        for c in range(index_e.shape[1]):
            if valid_e[i, c]:
                assert int(index_e[i, c]) != i, "self-loops are not GTV edges"
                seen.append(frozenset((i, int(index_e[i, c]))))
    allowed = neighbourhood_reference(kind, shape)
    expected = {frozenset((i, j)) for i in range(allowed.shape[0]) for j in range(allowed.shape[0]) if allowed[i, j]}
    assert len(seen) == len(set(seen)) and set(seen) == expected
    assert torch.equal(index_e, nbhd.index[:, cols])


@pytest.mark.parametrize("kind,shape,match", [
    ("window4", (5, 5), "odd"), ("window1", (5, 5), "odd"), ("hex", (5, 5), "expected one of"),
    ("band0", (5,), "width"), ("8", (1, 5), "too small"), ("window5", (5, 2), "too small"),
    ("8", (16,), r"\(H, W\)"), ("band2", (4, 4), r"\(N,\)"), ("band2", (0,), r"\(N,\)"),
])
def test_bad_neighbourhoods_raise(kind, shape, match):
    with pytest.raises(ValueError, match=match):
        build_neighbourhood(kind, shape)


def test_equivalent_band_has_as_many_neighbours():
    assert equivalent_band("8") == "band4" and equivalent_band("window3") == "band4"
    assert equivalent_band("4") == "band2" and equivalent_band("window5") == "band12"
    assert equivalent_band("band3") == "band3"


# ---------------------------------------------------------------------------------------------- mat-vecs
@pytest.mark.parametrize("kind,shape", [("8", (3, 4)), ("4", (4, 3)), ("causal2", (7,))])
def test_matvecs_match_dense_values_and_gradients(kind, shape):
    nbhd = build_neighbourhood(kind, shape)
    n = nbhd.num_nodes
    w = random_weights(nbhd, symmetric=False).requires_grad_()
    x = torch.randn(2, 3, n, 2, dtype=D, requires_grad=True)
    e = torch.randn(2, 3, n, nbhd.size, 2, dtype=D, requires_grad=True)
    cases = [
        (adjacency_matvec(w, nbhd.index, x), dense_adjacency(w, nbhd.index, n) @ x, [w, x]),
        (laplacian_matvec(w, nbhd.index, x), dense_laplacian(w, nbhd.index, n) @ x, [w, x]),
        (incidence_matvec(w, nbhd.index, x).flatten(2, 3), dense_incidence(w, nbhd.index, n) @ x, [w, x]),
        (incidence_t_matvec(w, nbhd.index, e), dense_incidence(w, nbhd.index, n).transpose(-1, -2) @ e.flatten(2, 3),
         [w, e]),
    ]
    for fast, ref, inputs in cases:
        torch.testing.assert_close(fast, ref)
        probe = torch.randn_like(ref)
        g_fast = torch.autograd.grad((fast * probe).sum(), inputs)
        g_ref = torch.autograd.grad((ref * probe).sum(), inputs)
        for a, b in zip(g_fast, g_ref):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(degree(w), dense_adjacency(w, nbhd.index, n).sum(-1))


def test_directed_transpose_keeps_only_the_head_term():
    nbhd = build_neighbourhood("causal2", 6)
    w = random_weights(nbhd, symmetric=False)
    e = torch.randn(2, 3, 6, 2, 1, dtype=D)
    heads = (w.unsqueeze(-1) * e).sum(-2)
    torch.testing.assert_close(incidence_t_matvec(w, nbhd.index, e, directed=True), heads)
    assert not torch.allclose(incidence_t_matvec(w, nbhd.index, e), heads)


@pytest.mark.parametrize("kind,shape", [("8", (4, 4)), ("window5", (5, 4)), ("4", (3, 5)), ("band3", (9,))])
@pytest.mark.parametrize("normalization", ["none", "symmetric"])
def test_incidence_normal_operator_is_laplacian_of_squared_weights(kind, shape, normalization):
    """C_wᵀ C_w = L_{w²} (A.3) with each undirected edge once in C and both directions in L."""
    nbhd = build_neighbourhood(kind, shape)
    w = edge_weights(torch.randn(2, 2, nbhd.num_nodes, 3, dtype=D), nbhd, normalization=normalization)
    index_e, _, cols = nbhd.edges()
    w_e = w.index_select(-1, cols)
    x = torch.randn(2, 2, nbhd.num_nodes, 3, dtype=D)
    normal = incidence_t_matvec(w_e, index_e, incidence_matvec(w_e, index_e, x))
    torch.testing.assert_close(normal, laplacian_matvec(w.square(), nbhd.index, x))
    # ‖C_w x‖² = xᵀ L_{w²} x
    torch.testing.assert_close(incidence_matvec(w_e, index_e, x).square().sum((2, 3)),
                               (x * laplacian_matvec(w.square(), nbhd.index, x)).sum(2))
    # its diagonal without building it: diag(C_wᵀC_w) from the dense incidence matrix, = degrees of w²
    dense = dense_incidence(w_e, index_e, nbhd.num_nodes)
    gram = torch.diagonal(dense.transpose(-1, -2) @ dense, dim1=-2, dim2=-1)
    torch.testing.assert_close(incidence_gram_diagonal(w_e, index_e), gram)
    torch.testing.assert_close(incidence_gram_diagonal(w_e, index_e), degree(w.square()))


# ----------------------------------------------------------------------------------------------- weights
def metric_matrix(metric, g, k):
    if metric is None:
        return None
    if metric.ndim == 2:
        return torch.diag_embed(metric.exp())
    return metric.transpose(-1, -2) @ metric


@pytest.mark.parametrize("normalization", ["none", "row", "symmetric"])
@pytest.mark.parametrize("metric_kind", [None, "diagonal", "full", "lowrank"])
@pytest.mark.parametrize("similarity", ["mahalanobis", "dot"])
def test_edge_weights_match_dense_reference(normalization, metric_kind, similarity):
    g, k = 2, 3
    nbhd = build_neighbourhood("8", (3, 3))
    f = 0.5 * torch.randn(2, g, 9, k, dtype=D, requires_grad=True)
    metric = {None: None, "diagonal": 0.3 * torch.randn(g, k, dtype=D), "full": torch.randn(g, k, k, dtype=D),
              "lowrank": torch.randn(g, 2, k, dtype=D)}[metric_kind]
    if metric is not None:
        metric.requires_grad_()
    w = edge_weights(f, nbhd, metric=metric, normalization=normalization, similarity=similarity)
    assert (w[..., ~nbhd.valid] == 0).all()
    fast = dense_adjacency(w, nbhd.index, 9)
    ref = graph_weights_reference(f, neighbourhood_reference("8", (3, 3)), metric_matrix(metric, g, k),
                                  normalization, similarity)
    torch.testing.assert_close(fast, ref)
    inputs = [f] + ([metric] if metric is not None else [])
    probe = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((fast * probe).sum(), inputs), torch.autograd.grad((ref * probe).sum(), inputs)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind,shape", [("8", (4, 5)), ("window3", (3, 3)), ("band2", (8,))])
def test_symmetric_graphs_are_symmetric_and_row_normalisation_is_stochastic(kind, shape):
    nbhd = build_neighbourhood(kind, shape)
    f = torch.randn(2, 2, nbhd.num_nodes, 4, dtype=D)
    metric = torch.randn(2, 4, dtype=D)
    for normalization in ("none", "symmetric"):
        w = dense_adjacency(edge_weights(f, nbhd, metric=metric, normalization=normalization), nbhd.index, nbhd.num_nodes)
        assert (w > 0).sum() == 2 * 2 * nbhd.valid.sum()
        torch.testing.assert_close(w, w.transpose(-1, -2), rtol=0, atol=0)  # w_ij == w_ji exactly
    row = edge_weights(f, nbhd, metric=metric, normalization="row")
    torch.testing.assert_close(row.sum(-1), torch.ones(2, 2, nbhd.num_nodes, dtype=D))
    dense_row = dense_adjacency(row, nbhd.index, nbhd.num_nodes)
    assert not torch.allclose(dense_row, dense_row.transpose(-1, -2))  # row normalisation is not symmetric


def test_row_normalisation_is_the_softmax_form_of_a4():
    """w̄_ij = softmax_{j∈N(i)}((Q f_i)ᵀ(2 Q f_j) − ‖Q f_j‖²) with M = QᵀQ (A.4 [D])."""
    nbhd = build_neighbourhood("window3", (4, 4))
    f = torch.randn(1, 2, 16, 3, dtype=D)
    q = torch.randn(2, 3, 3, dtype=D)
    w = edge_weights(f, nbhd, metric=q, normalization="row")
    qf = torch.einsum("grk,bgnk->bgnr", q, f)
    for g in range(2):
        for i in range(16):
            js = nbhd.index[i][nbhd.valid[i]]
            scores = torch.stack([qf[0, g, i] @ (2 * qf[0, g, j]) - qf[0, g, j] @ qf[0, g, j] for j in js])
            torch.testing.assert_close(w[0, g, i][nbhd.valid[i]], torch.softmax(scores, 0))


def test_clip_bounds_the_log_weight():
    nbhd = build_neighbourhood("band1", 3)
    f = torch.tensor([0.0, 100.0, 0.0], dtype=D).view(1, 1, 3, 1)
    w = edge_weights(f, nbhd, clip=10.0)
    assert torch.allclose(w[0, 0, 0, 1], torch.tensor(math.exp(-10.0), dtype=D))
    assert edge_weights(f, nbhd)[0, 0, 0, 1] == 0  # unclipped exp(-1e4) underflows


@pytest.mark.parametrize("normalization", ["none", "row", "symmetric"])
def test_isolated_nodes_give_finite_weights_and_gradients(normalization):
    nbhd = build_neighbourhood("8", (3, 3))
    f = torch.randn(1, 1, 9, 2, dtype=D, requires_grad=True)
    keep = torch.ones(9, 9, dtype=torch.bool)
    keep[4, :] = False  # node 4 keeps no edge in either direction
    keep[:, 4] = False
    w = edge_weights(f, nbhd, normalization=normalization, mask=neighbour_mask(keep, nbhd.index))
    assert torch.isfinite(w).all() and (w[0, 0, 4] == 0).all() and (degree(w)[0, 0, 4] == 0)
    x = torch.randn(1, 1, 9, 1, dtype=D)
    y = laplacian_matvec(w, nbhd.index, x)
    assert y[0, 0, 4, 0] == 0
    (grad,) = torch.autograd.grad(y.sum() + w.sum(), f)
    assert torch.isfinite(grad).all()
    # directed graph: node 0 of a causal band has no neighbours but is a neighbour of node 1
    causal = build_neighbourhood("causal2", 5)
    fc = torch.randn(1, 1, 5, 2, dtype=D, requires_grad=True)
    wc = edge_weights(fc, causal, normalization=normalization)
    assert torch.isfinite(wc).all() and (wc[0, 0, 0] == 0).all()
    assert torch.isfinite(torch.autograd.grad(wc.sum(), fc)[0]).all()


def test_masks_drop_edges_before_normalisation():
    nbhd = build_neighbourhood("band2", 6)
    f = torch.randn(2, 2, 6, 3, dtype=D)
    keep = torch.rand(2, 1, 6, 6) > 0.3
    gathered = neighbour_mask(keep, nbhd.index)
    for i in range(6):
        for c in range(nbhd.size):
            assert torch.equal(gathered[:, :, i, c], keep[:, :, i, int(nbhd.index[i, c])])
    w_bool = edge_weights(f, nbhd, normalization="row", mask=gathered)
    additive = torch.zeros(2, 1, 6, 6, dtype=D).masked_fill(~keep, float("-inf"))
    w_float = edge_weights(f, nbhd, normalization="row", mask=neighbour_mask(additive, nbhd.index))
    torch.testing.assert_close(w_bool, w_float)
    assert (w_bool[(~gathered).expand_as(w_bool)] == 0).all()
    rows = (gathered & nbhd.valid).any(-1).expand(2, 2, 6)
    torch.testing.assert_close(w_bool.sum(-1)[rows], torch.ones_like(w_bool.sum(-1)[rows]))
    # prefix offset: nodes 0..5 are tokens 2..7 of the mask
    big = torch.rand(8, 8) > 0.5
    torch.testing.assert_close(neighbour_mask(big, nbhd.index, offset=2), neighbour_mask(big[2:, 2:], nbhd.index))


def test_bad_shapes_raise_value_errors():
    nbhd = build_neighbourhood("8", (3, 3))
    w = torch.rand(1, 1, 9, 8)
    with pytest.raises(ValueError, match=r"\[B, G, N, C\]"):
        adjacency_matvec(w, nbhd.index, torch.randn(9, 2))
    with pytest.raises(ValueError, match=r"N=9"):
        laplacian_matvec(w, nbhd.index, torch.randn(1, 1, 8, 2))
    with pytest.raises(ValueError, match=r"\[B, G, N, K\]"):
        edge_weights(torch.randn(9, 2), nbhd)
    with pytest.raises(ValueError, match="metric"):
        metric_features(torch.randn(1, 2, 9, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="normalization"):
        edge_weights(torch.randn(1, 1, 9, 2), nbhd, normalization="softmax")
    with pytest.raises(ValueError, match="edge signal"):
        incidence_t_matvec(w, nbhd.index, torch.randn(1, 1, 9, 4, 2))


@settings(max_examples=25, deadline=None)
@given(h=st.integers(2, 5), w=st.integers(2, 5), kind=st.sampled_from(["4", "8", "band2"]),
       seed=st.integers(0, 2 ** 16), normalization=st.sampled_from(["none", "symmetric"]))
def test_laplacian_quadratic_form_property(h, w, kind, seed, normalization):
    """On symmetric graphs: L 1 = 0, xᵀ L x = ½ Σ_i Σ_{j∈N(i)} w_ij (x_i − x_j)² ≥ 0, L symmetric."""
    gen = torch.Generator().manual_seed(seed)
    shape = (h * w,) if kind.startswith("band") else (h, w)
    nbhd = build_neighbourhood(kind, shape)
    n = nbhd.num_nodes
    weights = edge_weights(torch.randn(1, 1, n, 2, dtype=D, generator=gen), nbhd, normalization=normalization)
    x = torch.randn(1, 1, n, 1, dtype=D, generator=gen)
    torch.testing.assert_close(laplacian_matvec(weights, nbhd.index, torch.ones_like(x)), torch.zeros_like(x))
    quad = (x * laplacian_matvec(weights, nbhd.index, x)).sum()
    direct = 0.5 * sum(float(weights[0, 0, i, c]) * float(x[0, 0, i, 0] - x[0, 0, int(nbhd.index[i, c]), 0]) ** 2
                       for i in range(n) for c in range(nbhd.size))
    assert quad >= -1e-12 and math.isclose(float(quad), direct, rel_tol=1e-9, abs_tol=1e-12)
    y = torch.randn(1, 1, n, 1, dtype=D, generator=gen)
    torch.testing.assert_close((y * laplacian_matvec(weights, nbhd.index, x)).sum(),
                               (x * laplacian_matvec(weights, nbhd.index, y)).sum())


@pytest.mark.parametrize("kind,shape,include_self", [
    ("8", (5, 4), False), ("4", (3, 6), False), ("window5", (6, 5), False), ("8", (4, 4), True),
    ("band3", (11,), False), ("causal2", (9,), True),
])
def test_shift_fast_path_matches_the_gather(kind, shape, include_self):
    """offsets= (Neighbourhood.flat_offsets): same logits on valid columns, same mat-vecs and gradients as the
    index gather, for weights from edge_weights (0 on invalid columns, e.g. a grid row's wrap-around)."""
    nbhd = build_neighbourhood(kind, shape, include_self=include_self)
    n = nbhd.num_nodes
    f = torch.randn(2, 2, n, 3, dtype=D, requires_grad=True)
    metric = torch.randn(2, 3, dtype=D)
    for sim in ("mahalanobis", "dot"):
        slow = edge_logits(f, nbhd.index, nbhd.valid, metric=metric, similarity=sim)
        fast = edge_logits(f, nbhd.index, nbhd.valid, metric=metric, similarity=sim, offsets=nbhd.flat_offsets)
        torch.testing.assert_close(fast, slow)
    w = edge_weights(f, nbhd, metric=metric, normalization="symmetric")
    x = torch.randn(2, 2, n, 3, dtype=D, requires_grad=True)
    index_e, _, cols = nbhd.edges()
    w_e = w.index_select(-1, cols)
    e = torch.randn(2, 2, n, len(cols), 3, dtype=D, requires_grad=True)
    pairs = [
        (lambda o: adjacency_matvec(w, nbhd.index, x, offsets=o), nbhd.flat_offsets),
        (lambda o: laplacian_matvec(w, nbhd.index, x, offsets=o), nbhd.flat_offsets),
        (lambda o: incidence_matvec(w_e, index_e, x, offsets=o), nbhd.edge_flat_offsets),
        (lambda o: incidence_t_matvec(w_e, index_e, e, offsets=o), nbhd.edge_flat_offsets),
        (lambda o: incidence_t_matvec(w_e, index_e, e, directed=True, offsets=o), nbhd.edge_flat_offsets),
        (lambda o: laplacian_operator(w, nbhd.index, offsets=o)(x), nbhd.flat_offsets),
        (lambda o: incidence_gram_operator(w_e, index_e, offsets=o)(x), nbhd.edge_flat_offsets),
        (lambda o: incidence_gram_operator(w_e, index_e, directed=True, offsets=o)(x), nbhd.edge_flat_offsets),
        (lambda o: normalize_edges(edge_logits(f, nbhd.index, nbhd.valid, metric=metric), nbhd.index, "symmetric",
                                   offsets=o), nbhd.flat_offsets),
    ]
    for fn, offsets in pairs:
        slow, fast = fn(None), fn(offsets)
        torch.testing.assert_close(fast, slow)
        probe = torch.randn_like(slow)
        for a, b in zip(torch.autograd.grad((fast * probe).sum(), [f, x, e], allow_unused=True, retain_graph=True),
                        torch.autograd.grad((slow * probe).sum(), [f, x, e], allow_unused=True, retain_graph=True)):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b)
    # the fused normal operator against the dense C_wᵀ C_w, values and gradients
    dense = dense_incidence(w_e, index_e, n)
    fast = incidence_gram_operator(w_e, index_e, offsets=nbhd.edge_flat_offsets)(x)
    ref = dense.transpose(-1, -2) @ (dense @ x)
    torch.testing.assert_close(fast, ref)
    probe = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((fast * probe).sum(), [f, x], retain_graph=True),
                    torch.autograd.grad((ref * probe).sum(), [f, x], retain_graph=True)):
        torch.testing.assert_close(a, b)
    # plane-by-plane signals (node axis innermost, as the restoration models store colour planes): same values
    planes = x.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
    torch.testing.assert_close(laplacian_matvec(w, nbhd.index, planes, offsets=nbhd.flat_offsets),
                               laplacian_matvec(w, nbhd.index, planes))
    torch.testing.assert_close(incidence_matvec(w_e, index_e, planes, offsets=nbhd.edge_flat_offsets),
                               incidence_matvec(w_e, index_e, planes))
    with pytest.raises(ValueError, match="offsets"):
        laplacian_matvec(w, nbhd.index, x, offsets=nbhd.flat_offsets[:-1])
