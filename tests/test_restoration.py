"""uGLR / uGTV restoration models (unrollattn.vision.restoration)."""
import pytest
import torch

import unrollattn
import unrollattn.vision.restoration_baselines  # noqa: F401  (registers every restoration model)
from unrollattn.core.graph import build_neighbourhood, edge_weights
from unrollattn.core.reference import dense_laplacian, glr_interpolate_reference
from unrollattn.layers.graph_attention import GraphFilter, GraphLaplacianAttention, GraphTotalVariationAttention
from unrollattn.vision.restoration import GraphBlock, GraphInterpolationNet
from unrollattn.vision.sampling import BayerMosaic, Decimation2x, build_operator

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
    dict(green_smoothing=1.0),
])
def test_options_keep_samples(options, observation):
    model = GraphInterpolationNet("demosaic", "glr", **{**SMALL, **options})
    _, y = observation("demosaic", b=1)
    out = model(y)
    assert torch.isfinite(out).all() and torch.equal(model.operator(out), y)


def test_green_smoothing_blurs_the_green_of_the_colour_difference(observation, monkeypatch):
    """green_smoothing=σ: the signals handed to the graph filter are (R − ĝ, G, B − ĝ) with ĝ the Gaussian blur
    (σ pixels, reflect padding) of the block's input green, and ĝ is added back; σ = 0 is the plain green."""
    from torchvision.transforms.functional import gaussian_blur

    torch.manual_seed(0)
    plain = GraphInterpolationNet("demosaic", "glr", **SMALL)
    smooth = GraphInterpolationNet("demosaic", "glr", **SMALL, green_smoothing=1.0)
    smooth.load_state_dict(plain.state_dict())  # the option adds no parameter
    _, y = observation("demosaic", b=1, h=12, w=12)
    seen = []
    original = GraphFilter.filter_values
    monkeypatch.setattr(GraphFilter, "filter_values", lambda self, f, values, *a, **k: seen.append(values) or
                        original(self, f, values, *a, **k))
    x0 = smooth.initial(y)
    out = smooth(y)
    assert torch.equal(smooth.operator(out), y)  # still exact on the samples
    full = smooth.operator.adjoint(y)
    g = gaussian_blur(x0[:, 1:2], [7, 7], [1.0, 1.0])
    expected = full - torch.cat([g, torch.zeros_like(g), g], 1)
    assert torch.allclose(seen[0][:, 0].transpose(1, 2).reshape(expected.shape), expected, atol=1e-6)
    assert not torch.allclose(out, plain(y))
    assert torch.equal(plain.blocks[0].smoothed_green(x0[:, 1:2]), x0[:, 1:2])
    for bad in (-1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="green_smoothing: expected a Gaussian sigma >= 0"):
            GraphInterpolationNet("demosaic", "glr", **SMALL, green_smoothing=bad)
    with pytest.raises(ValueError, match="needs colour_difference=True"):
        GraphInterpolationNet("demosaic", "glr", **SMALL, colour_difference=False, green_smoothing=1.0)


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


def test_blocks_are_built_on_the_glr_gtv_layers_graph_filter():
    """The graph is the attention, once: metric, edge weights, solver scalars, fidelity and head mixing of the
    restoration blocks are the GraphFilter of the glr / gtv layers; the block adds CNN features, H and the skip."""
    shared = [name for name in vars(GraphFilter) if not name.startswith("__")]
    for cls in (GraphBlock, GraphLaplacianAttention, GraphTotalVariationAttention):
        assert issubclass(cls, GraphFilter)
        assert not [name for name in shared if name in vars(cls)], cls  # nothing of it re-implemented
    block = GraphInterpolationNet("demosaic", "gtv", **SMALL).blocks[0]
    assert block.mix_heads and block.prior == "gtv" and not block.needs_degrees


@pytest.mark.parametrize("name", ["uglr_demosaic", "ugtv_sr2", "bilinear_demosaic", "bicubic_sr2", "swin_sr2"])
def test_models_own_their_forward_operator(name):
    model = unrollattn.build_model(name, **(SMALL if name[0] == "u" else {}))
    x = torch.rand(1, 3, 8, 10)
    assert model.operator is model.forward_operator
    assert torch.equal(model.observe(x), build_operator(model.task)(x))
    assert model(model.observe(x)).shape == x.shape


def test_the_restore_task_asks_the_model_for_its_forward_operator(tiny_photos):
    from unrollattn.recipes import restore

    task = restore.RestoreTask(restore.load_config("tiny", ["task=sr2"]), photos=tiny_photos)
    rng = torch.random.get_rng_state()
    assert isinstance(task.operator, Decimation2x)  # no model yet: asked of one built for it, the global RNG kept
    assert torch.equal(rng, torch.random.get_rng_state())
    model = task.build_model()
    assert task.operator is model.forward_operator
    batch = task.batch(0, 0, restore.DistState())
    assert torch.equal(batch["y"], model.observe(batch["x"])) and batch["y"].shape[-2:] == (12, 12)  # 24x24 crops


# ------------------------------------------------------------------------------- parity with the networks before
# GraphFilter: the uGLR / uGTV blocks were re-implementations of the glr / gtv layers' graph and solver scalars until
# they were built on the layers' GraphFilter. Recorded with that code (commit f29224e), float64, every parameter moved
# off its initial value: <out, probe> and <grad_p, probe_p> per parameter, in named_parameters order, with the names
# of the blocks' parameters (their checkpoints' keys; features.* = the CNN). Fixed seeds; see _parity_fingerprint.
PARITY_OPTIONS = dict(blocks=2, heads=2, feature_dim=3, width=4, iters=2, cg_iters=2)
PARITY_CNN = [f"features.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
PARITY = {  # name: (task, prior, options, own parameters of each block, <out, probe>, gradient fingerprints)
    "uglr_demosaic": ("demosaic", "glr", {}, "metric mix skip log_alpha log_beta", -4.823145094613762, [
        -0.003200190710578761, -0.1162819335056036, -0.2640959912965406, -0.08293367861607306, -0.019675792507844715,
        0.024394607629116157, -0.011668589280957221, 0.015401928602263082, -0.006604990066382364, 0.04233306111359464,
        1.1045320232458182e-17, 0.010959394384595375, 2.196196055406946, 0.033896087281412496, 0.13323289069102584,
        0.004716056357414061, -0.14496184552778477, -0.025266792441408358, -0.34514880864964836,
        -0.0031111775210311554, -0.27704070744633835, 2.7230961316735445e-17,
    ]),
    "ugtv_demosaic": ("demosaic", "gtv", {}, "metric mix skip log_rho log_alpha log_beta", -4.3921426167862885, [
        -0.01385987281857421, -0.14904328197160482, -0.1592261824663706, -0.07118329884994061, -0.03976050731554036,
        0.012569528348071311, -0.13628588866096025, 0.10363385738758393, -0.14223543587379792, 0.12083712910100981,
        0.117808318206574, -1.2367454545763265e-16, -0.017087136421500792, -0.3181595657607974, 0.29135060985587236,
        0.2010413677738795, 0.0830057553779443, -0.0006833384174859071, -0.65271290773547, -0.054373282755068156,
        0.13251809494473818, 0.0636095970315919, -0.008975908739579833, 4.875974995208631e-17,
    ]),
    "uglr_sr2": ("sr2", "glr", {}, "metric mix skip log_alpha log_beta", -5.312154684712145, [
        0.0005770912549875684, 0.6773274959508744, -0.2623924872072608, -0.05095625327656288, -0.0046584396662971775,
        -0.03112491179655981, -0.0017415269280068005, 0.013138735589220494, -0.006680875586579896,
        -0.001612938883173991, 5.203110067670869e-19, -0.004578640758041004, 12.948818938186733, -0.22127754546506453,
        -0.005971335173819684, -0.0047037087181820295, 0.14300898350271904, -0.036524669306833714,
        0.11532575408269534, 0.07973412320678226, -0.051478114879520295, -1.1477037853044176e-17,
    ]),
    "ugtv_sr2": ("sr2", "gtv", {}, "metric mix skip log_rho log_alpha log_beta", -3.745629715528069, [
        0.0005839775338812423, 0.47439874498859097, -0.14507005978178075, -0.08429383360513001, -0.0774966392179314,
        -0.0032008200517719756, -0.10975984435609427, 0.023105183109168433, -0.043015156780846116,
        -0.014328069328038791, 0.0599002155250241, -2.2723785905246478e-18, -0.0017507908292620157,
        -2.5643365289665967, 0.02712289027077211, -0.07483157919147806, -0.05607942059720563, 0.0035520928702752696,
        -0.09184732636716131, 0.03282251293028431, 0.038997383839791344, 0.009534421574110602, -0.13390096458780418,
        -5.484207618494485e-17,
    ]),
    "uglr_demosaic_exact_row": ("demosaic", "glr", {"step_sizes": "exact", "normalization": "row", "iters": 4},
        "metric mix skip", -4.533058700267869, [
        -0.0035920893318153175, -0.28327747126498504, 0.0073909055872415485, 0.043794710984927765,
        -0.015497903999966684, -0.08567108230831834, 0.09467498691920673, -0.010154884087385393,
        1.4246408015010495e-17, 0.010326956026077317, -1.8916534840575312, -0.13667981592424636, -1.1374625036422246,
        0.027335116752901446, -0.2184708258660119, 0.018332062938260126, 0.03476657184801302, 1.2896430880714872e-17,
    ]),
    "ugtv_sr2_exact_full4": ("sr2", "gtv", {"step_sizes": "exact", "metric": "full", "neighbourhood": "4"},
        "metric mix skip log_rho", -3.9757228285955706, [
        0.0003061023122901723, -0.4037589153180681, 0.18187027120895546, -0.05265172224356253, 0.016619543037004088,
        -0.006287249156480065, -0.009618721481604831, 0.00825003371353461, 0.0005576673647701236,
        -9.05753143166465e-19, 0.01802427197904969, -4.587939630256159, 0.003023925776112978, 0.08887291782217907,
        -0.8847713323785893, -0.008533498399873184, -0.267658988611589, -0.04210264275263206, -0.2558979469904695,
        4.583061770572644e-17,
    ]),
    "uglr_sr2_fidelity": ("sr2", "glr", {"fidelity": 0.5, "metric_init": 2.0, "alpha_init": 0.7, "beta_init": 0.2},
        "metric mix skip log_fidelity log_alpha log_beta", -2.9461984856996475, [
        -0.0008332912674914418, 0.6517190503376334, -0.37587205002720836, 0.04126713365660563, -0.0488941716098161,
        0.006728025858163853, 0.04596006082538852, 0.011245340358666532, -0.046303455027121423, 0.004062379488336894,
        0.015538613191083829, -3.6201199174765786e-17, -0.004450602786725556, -4.950309996084059,
        -0.27615827425690176, 0.039814740522183215, 0.11422482802044162, 0.02502874079460818, 0.3745894610262401,
        -0.11157196851078148, -0.0043145665114870235, 0.059153560580863226, 0.05880814625010397,
        -6.006357155563154e-19,
    ]),
    "ugtv_demosaic_fidelity": ("demosaic", "gtv", dict(fidelity=0.5, skip_init=None, init="zeros",
                                                       colour_difference=False, rho_init=3.0),
        "metric mix log_fidelity log_rho log_alpha log_beta", -2.9740123190041716, [
        -0.0032486162541090855, 0.12467806365198007, 0.03315633635275676, 0.01932877297124604, -0.020757504109315296,
        0.004146055432470391, -0.06827300808241149, 0.009769228102290778, -0.008271532725860547,
        0.00031673656475449065, 0.012051655300158838, -8.56049664294827e-18, 0.006675204496657106, -4.890809325632879,
        -0.24789321223480526, -0.218545540587344, 0.08018809412577035, 0.0006044570698787793, -0.4654288095924742,
        0.044727676281338724, -0.5485336569100533, -0.1633090769413917, 0.2653722330836913, 2.117690530369128e-18,
    ]),
    "uglr_demosaic_dot_none": ("demosaic", "glr", dict(similarity="dot", normalization="none", clip=5.0, iters=1,
                                                       mask_features=False),
        "metric mix skip log_alpha", 101.42398795797445, [
        42.903527018762745, -46.14269129692268, -99.72596955748458, -228.6873012516436, -66.70323641212724,
        2.156251354230567, -19.72930733656856, -98.63292210532694, 42.52113249073834, -158.16927750853264,
        5.656856016936467, -51.59360280593256, 47.58641868845139, -16.41567394670331, -152.45620785459735,
        11.943846245522531, -295.7136254311298, 124.53137251615934, 869.7879683353208, 26.451023300549686,
    ]),
}


def _parity_fingerprint(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = torch.rand(1, 3, 8, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = model(model.observe(x))
    gen = torch.Generator().manual_seed(4)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), torch.stack([(g * torch.randn(p.shape, generator=gen, dtype=p.dtype)).sum()
                                       for p, g in zip(params, grads)])


@pytest.mark.parametrize("case", list(PARITY))
def test_networks_on_the_shared_graph_filter_match_the_recorded_ones(case):
    """Same outputs, gradients and checkpoint keys as the uGLR / uGTV code before the blocks shared GraphFilter."""
    task, prior, options, own, loss_ref, grads_ref = PARITY[case]
    torch.manual_seed(0)
    model = GraphInterpolationNet(task, prior, **{**PARITY_OPTIONS, **options}).double()
    keys = [f"blocks.{b}.{name}" for b in range(2) for name in own.split() + PARITY_CNN]
    assert [name for name, _ in model.named_parameters()] == keys  # old checkpoints load as they are
    loss, grads = _parity_fingerprint(model)
    torch.testing.assert_close(loss, torch.tensor(loss_ref, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads, torch.tensor(grads_ref, dtype=torch.float64), rtol=1e-9, atol=1e-12)
