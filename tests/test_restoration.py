"""uGLR / uGTV restoration models (unrollattn.vision.restoration)."""
import pytest
import torch

import unrollattn
import unrollattn.vision.restoration_baselines  # noqa: F401  (registers every restoration model)
from unrollattn.core.graph import build_neighbourhood, edge_weights
from unrollattn.core.reference import dense_laplacian, glr_interpolate_reference
from unrollattn.vision.restoration import GraphInterpolationNet
from unrollattn.vision.sampling import BayerMosaic

SMALL = dict(blocks=2, heads=2, feature_dim=4, width=8, iters=2, cg_iters=2)


@pytest.mark.parametrize("name", ["uglr_demosaic", "ugtv_demosaic", "uglr_sr2", "ugtv_sr2"])
def test_registered_models_keep_samples_and_train(name, observation):
    assert name in unrollattn.list_models(task="restoration")
    model = unrollattn.build_model(name, **SMALL)
    task = name.split("_")[1]
    x, y = observation(task)
    out = model(y)
    assert out.shape == x.shape
    assert torch.equal(model.operator(out), y)  # observed samples kept bit-exactly
    loss = (out - x).abs().mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "features" in n)  # the graph learner gets gradient


@pytest.mark.parametrize("name", ["uglr_demosaic", "ugtv_demosaic", "uglr_sr2", "ugtv_sr2"])
def test_default_parameter_counts_are_small(name):
    params = sum(p.numel() for p in unrollattn.build_model(name).parameters())
    assert 2_000 <= params <= 60_000, params


@pytest.mark.parametrize("options", [
    dict(step_sizes="exact"), dict(normalization="row"), dict(init="zeros"), dict(neighbourhood="window5"),
    dict(neighbourhood="4", metric="full"), dict(skip_init=None), dict(colour_difference=False),
])
def test_options_keep_samples(options, observation):
    model = GraphInterpolationNet("demosaic", "glr", **{**SMALL, **options})
    _, y = observation("demosaic", b=1)
    out = model(y)
    assert torch.isfinite(out).all() and torch.equal(model.operator(out), y)


def test_initial_parameters_follow_the_reference_designs():
    model = GraphInterpolationNet("demosaic", "gtv", blocks=2, heads=4)
    block = model.blocks[0]
    assert torch.allclose(block.mix, torch.full((4,), 0.25))  # head mixing init 1/n
    assert block.skip.item() == pytest.approx(0.95)  # p·new + (1−p)·old, p init 0.95
    assert block.log_alpha.shape == (3, 3, 4) and block.log_rho.shape == (3, 4)  # [ADMM, CG, heads], [ADMM, heads]
    glr = GraphInterpolationNet("sr2", "glr", iters=5, heads=3)
    assert glr.blocks[0].log_alpha.shape == (5, 3) and glr.blocks[0].log_beta.shape == (4, 3)
    assert not hasattr(GraphInterpolationNet("sr2", "glr", step_sizes="exact").blocks[0], "log_alpha")


def test_exact_glr_block_solves_the_graph_interpolation_problem(observation):
    """One block, one head, exact CG with enough steps, no skip: the block output on the unobserved pixels is
    the dense GLR interpolation x_u = −L_uu⁻¹ L_uo y (docs/papers.md A.2) on the block's own learned graph."""
    torch.manual_seed(3)
    model = GraphInterpolationNet("sr2", "glr", blocks=1, heads=1, feature_dim=3, width=4, iters=40,
                                  step_sizes="exact", skip_init=None, in_chans=1).double()
    x, y = observation("sr2", b=1, h=6, w=6, c=1, dtype=torch.float64)
    out = model(y)
    block, op = model.blocks[0], model.operator
    x0 = model.initial(y)
    mask = op.observed_mask(6, 6)
    nbhd = build_neighbourhood("8", (6, 6))
    weights = edge_weights(block.node_features(x0, mask), nbhd, metric=block.metric, normalization="symmetric")
    lap = dense_laplacian(weights, nbhd.index, 36)[0, 0]
    ref = glr_interpolate_reference(mask.reshape(-1), op.adjoint(y).reshape(36, 1), lap)
    assert torch.allclose(out.reshape(36, 1), ref, atol=1e-8)


def test_graphs_are_sparse_and_per_block(observation):
    model = GraphInterpolationNet("demosaic", "glr", **SMALL)
    _, y = observation("demosaic", b=1, h=10, w=10)
    graphs = model.graphs(y)
    assert len(graphs) == 2 and graphs[0].shape == (1, 2, 100, 8)  # [B, heads, N, k]: O(N·k), no N×N


def test_bad_inputs():
    model = GraphInterpolationNet("demosaic", "glr", **SMALL)
    with pytest.raises(ValueError, match="1 channel"):
        model(torch.rand(1, 3, 8, 8))  # an RGB image instead of a mosaic
    sr_gray = GraphInterpolationNet("sr2", "glr", in_chans=1, **SMALL)
    with pytest.raises(ValueError, match="grayscale vs colour"):
        sr_gray(torch.rand(1, 3, 8, 8))
    nan = torch.rand(1, 1, 8, 8)
    nan[0, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(nan)
    with pytest.raises(ValueError, match="too small"):
        GraphInterpolationNet("demosaic", "glr", neighbourhood="window9", **SMALL)(torch.rand(1, 1, 4, 4))
    with pytest.raises(ValueError, match="float observation"):
        model(torch.rand(8, 8))
    with pytest.raises(ValueError, match="neighbourhood"):
        GraphInterpolationNet(neighbourhood="band4")
    with pytest.raises(ValueError, match="prior"):
        GraphInterpolationNet(prior="tv")
    with pytest.raises(ValueError, match="in_chans"):
        GraphInterpolationNet("demosaic", in_chans=1)
    with pytest.raises(ValueError, match="grayscale vs colour"):
        GraphInterpolationNet("sr2", "glr", **SMALL)(torch.rand(1, 1, 8, 8))  # colour model, grayscale image
    with pytest.raises(ValueError, match="too small"):
        GraphInterpolationNet("sr2", "gtv", **SMALL)(torch.rand(1, 3, 1, 1))  # 2x2 output < the 4x4 minimum
    inf = torch.rand(1, 1, 8, 8)
    inf[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        model(inf)
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="fidelity"):
            GraphInterpolationNet("sr2", "glr", fidelity=bad)


def test_odd_bayer_sizes_work(observation):
    model = GraphInterpolationNet("demosaic", "gtv", **SMALL)
    x, y = observation("demosaic", b=1, h=9, w=11)
    out = model(y)
    assert out.shape == x.shape and torch.equal(BayerMosaic()(out), y)


@pytest.mark.parametrize("task,prior", [("demosaic", "glr"), ("demosaic", "gtv"), ("sr2", "glr"), ("sr2", "gtv")])
def test_relaxed_data_term_filters_the_samples_and_learns_its_weight(task, prior, observation):
    """fidelity=μ0: min μ‖Hx − y‖² + prior with learned μ per block and head; the output no longer copies y."""
    model = GraphInterpolationNet(task, prior, fidelity=0.5, **SMALL)
    block = model.blocks[0]
    assert model.options["fidelity"] == 0.5 and block.log_fidelity.shape == (2,)
    assert torch.allclose(block.log_fidelity.exp(), torch.full((2,), 0.5))
    x, y = observation(task)
    out = model(y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.equal(model.operator(out), y)
    (out - x).abs().mean().backward()
    assert all(b.log_fidelity.grad is not None and b.log_fidelity.grad.abs().sum() > 0 for b in model.blocks)
    # a constant image is a fixed point of every block: the data term and the smoothness prior agree on it
    const = torch.full_like(x[:1], 0.3)
    torch.testing.assert_close(model(model.operator(const)), const, atol=1e-5, rtol=0)
