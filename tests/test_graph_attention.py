"""glr / gtv attention layers: contract, timm + blocks, causality, dense-reference parity, bad inputs."""
import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import unrollattn
from unrollattn.core.reference import cg_reference, graph_weights_reference, gtv_denoise_reference, neighbourhood_reference
from unrollattn.core.subspace import merge_heads
from unrollattn.layers import build_attention, build_block
from unrollattn.layers.graph_attention import GraphLaplacianAttention, GraphTotalVariationAttention
from unrollattn.vision.backbone import create_unrolled_vit, set_token_geometry

D = torch.float64
NAMES = ["glr", "gtv"]


def test_registered_under_their_names():
    assert unrollattn.get_attention("glr") is GraphLaplacianAttention
    assert unrollattn.get_attention("gtv") is GraphTotalVariationAttention


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("options", [
    {}, {"neighbourhood": "4", "normalization": "row"}, {"neighbourhood": "window5", "metric": "full"},
    {"normalization": "none", "similarity": "dot", "normalize_features": True, "clip": 10.0},
    {"neighbourhood": "band2", "step_sizes": "exact", "iters": 2}, {"feature_dim": 3, "iters": 1},
])
def test_shapes_with_and_without_grid(name, options):
    layer = build_attention(name, 32, 4, **options)
    x = torch.randn(2, 1 + 5 * 6, 32)
    assert layer(x).shape == x.shape  # no geometry: a 1-D band over all tokens
    layer.set_geometry(grid=(5, 6), num_prefix_tokens=1)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert layer(x, grid=(6, 5)).shape == x.shape  # a keyword grid wins over the setter's (prefix count kept)
    nbhd, prefix = layer.plan(31, False, layer.grid)
    if options.get("neighbourhood", "window3").startswith("band"):
        assert nbhd.kind == options["neighbourhood"] and prefix == 0
    else:
        assert nbhd.shape == (5, 6) and prefix == 1 and nbhd.kind == options.get("neighbourhood", "window3")


def test_options_bind_through_with_options_and_parameter_count():
    cls = unrollattn.get_attention("glr").with_options(neighbourhood="4", feature_dim=4, iters=3)
    layer = cls(16, num_heads=2)
    assert layer.neighbourhood == "4" and layer.feature_dim == 4
    count = sum(p.numel() for p in layer.parameters())
    # W_f (16->2*4) + W_v (16->16) + proj (16->16 + bias) + log-diag metric 2*4 + log mu 2 + alpha 3*2 + beta 2*2
    assert count == 16 * 8 + 16 * 16 + 16 * 16 + 16 + 8 + 2 + 6 + 4
    gtv = build_attention("gtv", 16, 2, feature_dim=4, iters=2, cg_iters=3, metric="full")
    assert gtv.metric.shape == (2, 4, 4) and gtv.log_alpha.shape == (2, 3, 2) and gtv.log_beta.shape == (2, 2, 2)
    assert "neighbourhood='window3'" in repr(gtv)


@pytest.mark.parametrize("name", NAMES)
def test_timm_vit_with_a_patch_grid(name):
    cls = unrollattn.get_attention(name).with_options(neighbourhood="4")
    model = timm.create_model("vit_tiny_patch16_224", attn_layer=cls, depth=2, num_classes=5, img_size=32, patch_size=8)
    set_token_geometry(model, (4, 4), model.num_prefix_tokens)
    attn = model.blocks[0].attn
    assert attn.grid == (4, 4) and attn.num_prefix_tokens == 1
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    built = create_unrolled_vit("aot_mssa_tiny_patch16_224", block="transformer", attention=name, img_size=32,
                                patch_size=8, num_classes=3, depth=1, embed_dim=32, num_heads=4)
    assert built.blocks[0].attn.grid == (4, 4)
    assert built(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("block", ["transformer", "aot", "crate"])
@pytest.mark.parametrize("name", NAMES)
def test_blocks_take_graph_attention(block, name):
    layer = build_block(block, 32, 4, attention=name)
    layer.attn.set_geometry(grid=(2, 3), num_prefix_tokens=1)
    x = torch.randn(2, 7, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("normalization", ["symmetric", "row", "none"])
def test_causal_outputs_ignore_the_future(name, normalization):
    layer = build_attention(name, 16, 2, normalization=normalization, neighbourhood="4").double()
    layer.set_geometry(grid=(3, 4))  # is_causal overrides the grid with the causal band
    x = torch.randn(2, 12, 16, dtype=D)
    changed = x.clone()
    changed[:, 7:] = torch.randn(2, 5, 16, dtype=D)
    y, y_changed = layer(x, is_causal=True), layer(changed, is_causal=True)
    torch.testing.assert_close(y[:, :7], y_changed[:, :7], rtol=0, atol=1e-13)
    assert not torch.allclose(y[:, 7:], y_changed[:, 7:])
    assert not torch.allclose(layer(x)[:, :7], layer(changed)[:, :7])  # without is_causal the future leaks
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(layer(xg, is_causal=True)[:, 5].sum(), xg)
    assert (grad[:, 6:] == 0).all() and (grad[:, :6] != 0).any()


@pytest.mark.parametrize("name", NAMES)
def test_single_token_and_exact_causal(name):
    layer = build_attention(name, 16, 2)
    for causal in (False, True):
        assert torch.isfinite(layer(torch.randn(1, 1, 16), is_causal=causal)).all()
    exact = build_attention(name, 16, 2, step_sizes="exact")
    assert exact(torch.randn(1, 5, 16)).shape == (1, 5, 16)
    with pytest.raises(ValueError, match="step_sizes='exact' cannot be causal"):
        exact(torch.randn(1, 5, 16), is_causal=True)


# ------------------------------------------------------------------------------------------ dense parity
def dense_layer_reference(layer, x, grid):
    """The layer written with dense matrices: reference graph, dense (I + μL) / ADMM, dense prefix softmax."""
    b, n, _ = x.shape
    g, p, prefix = layer.num_heads, layer.head_dim, layer.num_prefix_tokens
    f = layer.node_features(x)
    v = layer.values(x).view(b, n, g, p).transpose(1, 2)
    m = (torch.diag_embed(layer.metric.exp()) if layer.metric_kind == "diagonal"
         else layer.metric.transpose(-1, -2) @ layer.metric)
    allowed = neighbourhood_reference(layer.neighbourhood, grid)
    w = graph_weights_reference(f[:, :, prefix:], allowed, m, layer.normalization)
    nodes = n - prefix
    eye = torch.eye(nodes, dtype=x.dtype)
    pairs = [(i, j) for i in range(nodes) for j in range(i + 1, nodes) if allowed[i, j]]
    out = torch.zeros_like(v)
    for bi in range(b):
        for gi in range(g):
            lap = torch.diag(w[bi, gi].sum(-1)) - w[bi, gi]
            inc = torch.zeros(len(pairs), nodes, dtype=x.dtype)
            for e, (i, j) in enumerate(pairs):
                inc[e, i], inc[e, j] = w[bi, gi, i, j], -w[bi, gi, i, j]
            for c in range(p):
                vc = v[bi, gi, prefix:, c]
                if isinstance(layer, GraphLaplacianAttention):
                    mu = layer.log_mu.exp()[gi]
                    al = layer.log_alpha.exp()[:, gi]
                    be = layer.log_beta.exp()[:, gi]
                    out[bi, gi, prefix:, c] = cg_reference(eye + mu * lap, vc, vc, layer.iters, al, be)
                else:
                    al = [layer.log_alpha.exp()[t, :, gi] for t in range(layer.iters)]
                    be = [layer.log_beta.exp()[t, :, gi] for t in range(layer.iters)]
                    rho = [layer.log_rho.exp()[t, gi] for t in range(layer.iters)]
                    out[bi, gi, prefix:, c] = gtv_denoise_reference(vc, inc, layer.log_lam.exp()[gi], rho, layer.iters,
                                                                    layer.cg_iters, al, be)
            for q in range(prefix):  # prefix tokens: dense softmax over every token
                logits = torch.stack([-(f[bi, gi, q] - f[bi, gi, j]) @ m[gi] @ (f[bi, gi, q] - f[bi, gi, j])
                                      for j in range(n)])
                out[bi, gi, q] = torch.softmax(logits, 0) @ v[bi, gi]
    return layer.proj(out.transpose(1, 2).reshape(b, n, g * p))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("normalization,metric", [("symmetric", "diagonal"), ("row", "full"), ("none", "diagonal")])
def test_layer_matches_dense_reference(name, normalization, metric):
    layer = build_attention(name, 8, 2, neighbourhood="8", feature_dim=3, normalization=normalization, metric=metric,
                            iters=3, cg_iters=2, qkv_bias=True).double() if name == "gtv" else \
        build_attention(name, 8, 2, neighbourhood="8", feature_dim=3, normalization=normalization, metric=metric,
                        iters=3, qkv_bias=True).double()
    with torch.no_grad():  # move the learned scalars off their initial values
        for param in (layer.metric, layer.log_alpha, layer.log_beta):
            param.add_(0.1 * torch.randn_like(param))
    layer.set_geometry(grid=(3, 3), num_prefix_tokens=1)
    x = torch.randn(2, 10, 8, dtype=D, requires_grad=True)
    fast, ref = layer(x), dense_layer_reference(layer, x, (3, 3))
    torch.testing.assert_close(fast, ref)
    params = [x, layer.metric, layer.log_alpha, layer.features.weight, layer.values.weight]
    params += [layer.log_mu] if name == "glr" else [layer.log_lam, layer.log_rho]
    probe = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((fast * probe).sum(), params), torch.autograd.grad((ref * probe).sum(), params)):
        torch.testing.assert_close(a, b)


def test_exact_glr_filter_is_the_low_pass_solve():
    layer = build_attention("glr", 8, 2, neighbourhood="4", step_sizes="exact", iters=12, feature_dim=2).double()
    layer.set_geometry(grid=(3, 4))
    x = torch.randn(1, 12, 8, dtype=D)
    weights, nbhd, _ = layer.graph(x)
    v = torch.randn(1, 2, 12, 4, dtype=D)
    w = graph_weights_reference(layer.node_features(x), neighbourhood_reference("4", (3, 4)),
                                torch.diag_embed(layer.metric.exp()), "symmetric")
    a = torch.eye(12, dtype=D) + layer.log_mu.exp().view(1, 2, 1, 1) * (torch.diag_embed(w.sum(-1)) - w)
    torch.testing.assert_close(layer.filter(v, weights, nbhd, False), torch.linalg.solve(a, v))


def test_exact_glr_with_row_normalization_is_the_low_pass_solve():
    """Row normalisation makes I + μD⁻¹L non-symmetric: plain exact CG returned values far outside the solution's
    range (the solution of an averaging filter stays within v's). CG in the degree-weighted inner product is exact:
    12 steps on 12 nodes give the dense float64 solve, values and gradients."""
    torch.manual_seed(0)
    layer = build_attention("glr", 8, 2, neighbourhood="4", normalization="row", step_sizes="exact", iters=12,
                            feature_dim=2, metric_init=8.0, mu_init=20.0).double()  # sharp weights, strong smoothing
    layer.set_geometry(grid=(3, 4))
    x = torch.randn(1, 12, 8, dtype=D, requires_grad=True)
    v = torch.rand(1, 2, 12, 4, dtype=D)

    def dense(x, v):
        mu = layer.log_mu.exp().view(1, 2, 1, 1)
        return torch.linalg.solve(torch.eye(12, dtype=D) + mu * _dense_row_laplacian(layer, x), v)

    def fast(x):
        weights, nbhd, _, log_degree = layer.graph(x, return_log_degree=True)
        return layer.filter(v, weights, nbhd, False, log_degree)

    out, ref = fast(x), dense(x, v)
    assert v.min() <= ref.min() and ref.max() <= v.max()
    torch.testing.assert_close(out, ref)
    probe = torch.randn_like(ref)
    params = [x, layer.metric, layer.log_mu, layer.features.weight]
    for a, b in zip(torch.autograd.grad((out * probe).sum(), params), torch.autograd.grad((ref * probe).sum(), params)):
        torch.testing.assert_close(a, b)
    weights, nbhd, _ = layer.graph(x)
    with pytest.raises(ValueError, match="log_degree: exact CG on a row-normalised graph needs"):
        layer.filter(v, weights, nbhd, False)
    # the whole layer runs the same filter
    values = layer.values(x).view(1, 12, 2, 4).transpose(1, 2)
    torch.testing.assert_close(layer(x), layer.proj(merge_heads(dense(x, values))))


def _dense_row_laplacian(layer, x):
    """D⁻¹(D − W) of the layer's row-normalised graph on a 3×4 grid, dense."""
    w = graph_weights_reference(layer.node_features(x), neighbourhood_reference("4", (3, 4)),
                                torch.diag_embed(layer.metric.exp()), "row")
    return torch.diag_embed(w.sum(-1)) - w


@pytest.mark.parametrize("name", NAMES)
def test_filters_pass_constant_signals(name):
    layer = build_attention(name, 8, 2, neighbourhood="window3").double()
    x = torch.randn(2, 16, 8, dtype=D)
    weights, nbhd, _ = layer.graph(x, grid=(4, 4))
    const = torch.randn(2, 2, 1, 4, dtype=D).expand(2, 2, 16, 4)
    torch.testing.assert_close(layer.filter(const, weights, nbhd, False), const)
    varying = torch.randn(2, 2, 16, 4, dtype=D)
    out = layer.filter(varying, weights, nbhd, False)
    assert (out - out.mean(2, keepdim=True)).square().sum() < (varying - varying.mean(2, keepdim=True)).square().sum()


@pytest.mark.parametrize("name", NAMES)
def test_graph_filter_also_interpolates_on_the_layers_graph(name):
    """GraphFilter (the layers' graph + solver, shared with the uGLR / uGTV restoration blocks) given observed nodes:
    interpolation on the same learned graph, the samples kept exactly, a constant signal a fixed point."""
    layer = build_attention(name, 8, 2, neighbourhood="4").double()
    f = layer.node_features(torch.randn(1, 12, 8, dtype=D))
    nbhd, _ = layer.plan(12, False, (3, 4))
    observed = (torch.arange(12) % 3 == 0)[:, None]
    y = torch.randn(1, 1, 12, 4, dtype=D)
    out = layer.filter_values(f, y, nbhd, observed=observed, x0=torch.zeros_like(y))
    assert out.shape == (1, 2, 12, 4) and torch.equal(out[:, :, ::3], y[:, :, ::3].expand(1, 2, 4, 4))
    const = torch.full_like(y, 0.7)
    torch.testing.assert_close(layer.filter_values(f, const, nbhd, observed=observed, x0=const),
                               const.expand(1, 2, 12, 4))


# ------------------------------------------------------------------------------------ masks and prefixes
def test_bool_mask_cuts_edges_for_glr():
    layer = build_attention("glr", 16, 2, neighbourhood="band2").double()
    x = torch.randn(1, 8, 16, dtype=D)
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[:, 3] = False  # nobody reads token 3
    changed = x.clone()
    changed[:, 3] += 1.0
    y, y_changed = layer(x, attn_mask=keep), layer(changed, attn_mask=keep)
    others = [i for i in range(8) if i != 3]
    torch.testing.assert_close(y[:, others], y_changed[:, others])
    assert not torch.allclose(layer(x)[:, others], layer(changed)[:, others])
    additive = torch.zeros(8, 8, dtype=D).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(layer(x, attn_mask=additive), y)


@pytest.mark.parametrize("name", NAMES)
def test_symmetric_mask_isolates_a_token(name):
    layer = build_attention(name, 16, 2, neighbourhood="8").double()
    layer.set_geometry(grid=(3, 3))
    keep = torch.ones(1, 1, 9, 9, dtype=torch.bool)
    keep[..., 4, :] = keep[..., :, 4] = False
    x = torch.randn(1, 9, 16, dtype=D)
    changed = x.clone()
    changed[:, 4] += 1.0
    y, y_changed = layer(x, attn_mask=keep), layer(changed, attn_mask=keep)
    others = [i for i in range(9) if i != 4]
    torch.testing.assert_close(y[:, others], y_changed[:, others])
    v = layer.values(x).view(1, 9, 2, 8)[:, 4].reshape(1, 16)
    torch.testing.assert_close(y[:, 4], layer.proj(v))  # an isolated token keeps its value


@pytest.mark.parametrize("name", NAMES)
def test_patch_tokens_do_not_read_prefix_tokens(name):
    layer = build_attention(name, 16, 2).double()
    layer.set_geometry(grid=(3, 3), num_prefix_tokens=2)
    x = torch.randn(1, 11, 16, dtype=D)
    changed = x.clone()
    changed[:, :2] = torch.randn(1, 2, 16, dtype=D)
    torch.testing.assert_close(layer(x)[:, 2:], layer(changed)[:, 2:])
    assert not torch.allclose(layer(x)[:, :2], layer(changed)[:, :2])


# ---------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise_clear_errors(name):
    layer = build_attention(name, 16, 2)
    with pytest.raises(ValueError, match=r"\[B, N, 16\]"):
        layer(torch.randn(9, 16))
    bad = torch.randn(1, 9, 16)
    bad[0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        layer(bad)
    with pytest.raises(ValueError, match=r"grid: expected N = num_prefix_tokens \+ H\*W = 0 \+ 3\*4 = 12"):
        layer(torch.randn(1, 9, 16), grid=(3, 4))
    with pytest.raises(ValueError, match="too small"):
        layer(torch.randn(1, 9, 16), grid=(1, 9))
    with pytest.raises(ValueError, match="too small"):
        build_attention(name, 16, 2, neighbourhood="window5")(torch.randn(1, 8, 16), grid=(2, 4))
    with pytest.raises(ValueError, match="grid"):
        layer.set_geometry(grid=(0, 3))
    for options, match in [({"neighbourhood": "causal2"}, "is_causal"), ({"neighbourhood": "window4"}, "odd"),
                           ({"normalization": "softmax"}, "normalization"), ({"metric": "lowrank"}, "metric"),
                           ({"step_sizes": "adaptive"}, "step_sizes"), ({"iters": 0}, "iters"),
                           ({"similarity": "cosine"}, "similarity")]:
        with pytest.raises(ValueError, match=match):
            build_attention(name, 16, 2, **options)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True])
def test_every_parameter_gets_a_gradient(name, causal):
    layer = build_attention(name, 16, 2, qkv_bias=True)
    layer.set_geometry(grid=(2, 4), num_prefix_tokens=1)
    layer(torch.randn(2, 9, 16), is_causal=causal).square().sum().backward()
    for pname, param in layer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, pname


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 12), t=st.integers(0, 11), name=st.sampled_from(NAMES), seed=st.integers(0, 1000))
def test_causality_property(n, t, name, seed):
    t = min(t, n - 1)
    torch.manual_seed(seed)
    layer = build_attention(name, 8, 2, neighbourhood="4").double()
    x = torch.randn(1, n, 8, dtype=D)
    changed = x.clone()
    changed[:, t:] = torch.randn(1, n - t, 8, dtype=D)
    torch.testing.assert_close(layer(x, is_causal=True)[:, :t], layer(changed, is_causal=True)[:, :t],
                               rtol=0, atol=1e-12)
