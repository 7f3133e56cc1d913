"""Kernel-regression attention: the identities of docs/papers.md C.10 and parity with the reference."""
import math

import pytest
import torch

from unrollattn.core.kernel import (
    SpatialKernel, boosting, default_range_bandwidth, kernel_attention, kernel_weights, last_query_spatial_log_kernel,
    spatial_coefficient, spatial_log_kernel, token_positions, twicing,
)
from unrollattn.core.reference import kernel_attention_reference
from unrollattn.layers import build_attention

N, D = 7, 16


def _normalize(k):
    return k / k.sum(-1, keepdim=True)


def test_softmax_with_additive_pe_is_bilateral_times_cross_factor_times_key_mass():
    """C.10 (1) and (2): softmax((Y+P)(Y+P)^T/sqrt d) = normalize[K_BF(p,p,y,y) K_BF(p,y,y,p) D_j]."""
    y, p = torch.randn(N, D, dtype=torch.float64), torch.randn(N, D, dtype=torch.float64)
    x = y + p
    softmax = torch.softmax(x @ x.T / math.sqrt(D), dim=-1)
    h2 = 2 * math.sqrt(D)
    assert math.isclose(math.sqrt(h2), default_range_bandwidth(D))  # h = (4d)^{1/4}
    sq = lambda a, b: torch.cdist(a, b).square()  # noqa: E731
    bilateral = torch.exp(-sq(p, p) / h2) * torch.exp(-sq(y, y) / h2)
    cross = torch.exp(-sq(p, y) / h2) * torch.exp(-sq(y, p) / h2)  # K_BF(p_i, y_j, y_i, p_j)
    key_mass = torch.exp((y.square().sum(-1) + p.square().sum(-1)) / math.sqrt(D))
    torch.testing.assert_close(_normalize(bilateral * cross * key_mass[None]), softmax, rtol=0, atol=1e-14)
    joint = torch.exp(-sq(x, x) / h2) * torch.exp(x.square().sum(-1) / h2)[None]
    torch.testing.assert_close(_normalize(joint), softmax, rtol=0, atol=1e-14)


def test_alibi_is_a_laplacian_bilateral_filter():
    """C.10 (3): softmax(q.k/sqrt d - m|i-j|) = normalize[exp(q.k/sqrt d) exp(-m|i-j|)], spatial h_p = 1/m."""
    q, k, v = (torch.randn(1, 2, N, D, dtype=torch.float64) for _ in range(3))
    slopes = torch.tensor([0.5, 0.125], dtype=torch.float64)
    idx = torch.arange(N, dtype=torch.float64)
    alibi = q @ k.transpose(-1, -2) / math.sqrt(D) - slopes[:, None, None] * (idx[:, None] - idx[None]).abs()
    expected = torch.softmax(alibi, -1) @ v
    bias = spatial_log_kernel(token_positions(N, dtype=torch.float64), token_positions(N, dtype=torch.float64),
                              1 / slopes, "laplacian")
    torch.testing.assert_close(kernel_attention(q, k, v, "dot", spatial_bias=bias), expected)


@pytest.mark.parametrize("kind", ["gaussian", "laplacian"])
@pytest.mark.parametrize("n_key", [1, 2, 9])
def test_the_decoding_row_of_the_spatial_kernel_is_the_last_row_of_the_full_one(kind, n_key):
    """The decoding step's spatial row (C.5 for one query at the last token position) equals the last row of the
    kernel built from the positions."""
    h_p = torch.tensor([0.7, 3.0, 16.0], dtype=torch.float64)
    pos = token_positions(n_key, dtype=torch.float64)
    expected = spatial_log_kernel(pos[-1:], pos, h_p, kind)
    row = last_query_spatial_log_kernel(n_key, spatial_coefficient(h_p, kind), kind)
    assert row.shape == (3, 1, n_key)
    torch.testing.assert_close(row, expected, rtol=1e-15, atol=0)


def test_one_dimensional_laplacian_kernel_is_minus_the_index_distance_over_the_bandwidth():
    """C.5 on 1-D token indices: S_ij = -|i - j| / h_p; pairs with a NaN (prefix) position get 0; the bandwidth
    gradient is |i - j| / h_p^2 (values and gradients against the square-root form of 2-D positions)."""
    pos = torch.tensor([[float("nan")], [0.0], [1.0], [3.0]], dtype=torch.float64)
    h_p = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    one_d = spatial_log_kernel(pos, pos, h_p, "laplacian")
    distance = (pos - pos.T).abs().nan_to_num(0.0)
    torch.testing.assert_close(one_d, -distance[None] / h_p.detach()[:, None, None], rtol=0, atol=0)
    padded = torch.cat([pos, torch.zeros_like(pos)], 1)  # the same distances through sqrt(sum of squares)
    h_ref = h_p.detach().clone().requires_grad_()
    reference = spatial_log_kernel(padded, padded, h_ref, "laplacian")
    torch.testing.assert_close(one_d, reference, rtol=0, atol=0)
    (grad,), (grad_ref,) = (torch.autograd.grad(out.square().sum(), h) for out, h in ((one_d, h_p), (reference, h_ref)))
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-15)


def test_twicing_identity():
    """C.10 (4): AV + A(V - AV) = (2A - A^2) V; k-step boosting = [I - (I - A)^{k+1}] V."""
    a = torch.softmax(torch.randn(N, N, dtype=torch.float64), -1)
    v = torch.randn(N, D, dtype=torch.float64)
    smooth = lambda values: a @ values  # noqa: E731
    torch.testing.assert_close(twicing(smooth, v), (2 * a - a @ a) @ v)
    eye = torch.eye(N, dtype=torch.float64)
    for steps in (0, 1, 3):
        torch.testing.assert_close(boosting(smooth, v, steps), (eye - torch.linalg.matrix_power(eye - a, steps + 1)) @ v)


@pytest.mark.parametrize("kernel", ["dot", "gaussian", "mahalanobis", "bilateral"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_kernel_attention_matches_reference(kernel, is_causal):
    """Values and gradients (queries, keys, values, bandwidths, metric) of the fast path against the explicit one."""
    heads = 2
    q, k, v = (torch.randn(1, heads, N, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    h_y = torch.tensor([1.5, 3.0], dtype=torch.float64, requires_grad=True)
    metric = (torch.rand(heads, D, dtype=torch.float64) + 0.5).requires_grad_()
    pos = token_positions(N, (2, 3), 1, dtype=torch.float64) if kernel == "bilateral" else None
    h_p = torch.tensor([1.0, 4.0], dtype=torch.float64, requires_grad=True)
    bias = spatial_log_kernel(pos, pos, h_p) if pos is not None else None
    fast = kernel_attention(q, k, v, kernel, range_bandwidth=h_y, metric=metric if kernel == "mahalanobis" else None,
                            spatial_bias=bias, is_causal=is_causal)
    slow = kernel_attention_reference(q[0], k[0], v[0], kernel, range_bandwidth=h_y, metric=metric, positions=pos,
                                      spatial_bandwidth=h_p, is_causal=is_causal)[None]
    torch.testing.assert_close(fast, slow)
    inputs = (q, k, v, h_y) + ((metric,) if kernel == "mahalanobis" else ()) + ((h_p,) if kernel == "bilateral" else ())
    g_fast = torch.autograd.grad(fast.square().sum(), inputs)
    g_slow = torch.autograd.grad(slow.square().sum(), inputs)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kernel", ["gaussian", "mahalanobis"])
@pytest.mark.parametrize("needs_grad", [True, False])
def test_range_kernels_with_a_padding_mask_match_the_reference(kernel, needs_grad):
    """The key-norm term with a boolean key mask (padding) against the explicit weights: folded into the queries and
    keys when it needs a gradient, one additive mask when not."""
    heads = 2
    q, k, v = (torch.randn(2, heads, N, D, dtype=torch.float64, requires_grad=needs_grad) for _ in range(3))
    h_y = torch.tensor([1.5, 3.0], dtype=torch.float64)
    metric = torch.rand(heads, D, dtype=torch.float64) + 0.5 if kernel == "mahalanobis" else None
    keep = torch.ones(2, 1, 1, N, dtype=torch.bool)
    keep[1, ..., -2:] = False  # the second sequence has two padded keys
    fast = kernel_attention(q, k, v, kernel, range_bandwidth=h_y, metric=metric, attn_mask=keep)
    weights = kernel_weights(q, k, kernel, range_bandwidth=h_y, metric=metric, attn_mask=keep)["weights"]
    torch.testing.assert_close(fast, weights @ v)
    assert weights[1, ..., -2:].abs().max() == 0


def test_range_kernels_keep_sdpa_on_its_fused_path():
    """Gaussian attention's forward+backward holds no N x N tensor: its peak tensor memory stays near softmax SDPA's
    (an additive bias with a bandwidth gradient would materialise [B, H, N, N] scores, 25 MB here)."""
    from unrollattn.utils.memory import peak_memory_mb

    n, heads, d = 512, 2, 32
    q, k, v = (torch.randn(2, heads, n, d, requires_grad=True) for _ in range(3))
    h_y = torch.tensor([2.0, 3.0], requires_grad=True)

    def step(kernel):
        def run():
            kernel_attention(q, k, v, kernel, range_bandwidth=h_y).sum().backward()
        return run

    softmax, gaussian = (peak_memory_mb(step(kernel), torch.device("cpu")) for kernel in ("dot", "gaussian"))
    scores_mb = 2 * heads * n * n * 4 / 2**20
    assert gaussian < softmax + scores_mb / 2, (gaussian, softmax, scores_mb)


def test_a_plain_causal_mask_is_never_built_as_a_tensor():
    """is_causal without another mask goes to SDPA as its flag: no [N, N] mask (16 MB at N = 2048) for the folded
    kernels: peak memory stays a few copies of q, k, v."""
    from unrollattn.utils.memory import peak_memory_mb

    n = 2048
    q, k, v = (torch.randn(1, 1, n, 16, requires_grad=True) for _ in range(3))
    pos = token_positions(n)

    def step(kernel, **options):
        return lambda: kernel_attention(q, k, v, kernel, is_causal=True, **options).sum().backward()

    inputs_mb = 3 * n * 16 * 4 / 2**20  # q, k, v: 0.375 MB
    for kernel, options in (("dot", {}), ("gaussian", {}), ("bilateral", {"spatial_bias": SpatialKernel(
            pos, pos, torch.ones(1, requires_grad=True), "laplacian", ordered=True)})):
        assert peak_memory_mb(step(kernel, **options), torch.device("cpu")) < 8 * inputs_mb, kernel


def test_gaussian_default_bandwidth_is_softmax_without_key_mass():
    """With h^2 = 2 sqrt(d) the Gaussian kernel equals dot-product softmax once ||k_j|| is constant."""
    q, k, v = (torch.randn(1, 1, N, D, dtype=torch.float64) for _ in range(3))
    k = k / k.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(kernel_attention(q, k, v, "gaussian"), kernel_attention(q, k, v, "dot"))


def test_bad_kernel_inputs():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="kernel"):
        kernel_attention(q, q, q, "cosine")
    with pytest.raises(ValueError, match="positive"):
        kernel_attention(q, q, q, "gaussian", range_bandwidth=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="metric"):
        kernel_attention(q, q, q, "mahalanobis")
    with pytest.raises(ValueError, match="grid 3x3"):
        token_positions(8, (3, 3), 0)
    with pytest.raises(ValueError, match="positions"):
        spatial_log_kernel(torch.zeros(4, 2), torch.zeros(4, 1), torch.ones(2))
    with pytest.raises(ValueError, match="positive"):
        build_attention("bilateral", 16, 2, spatial_bandwidth=0.0)
    with pytest.raises(ValueError, match="spatial_kernel"):
        build_attention("bilateral", 16, 2, spatial_kernel="box")


def test_bilateral_layer_uses_the_patch_grid():
    layer = build_attention("bilateral", 16, 2)
    x = torch.randn(2, 1 + 6, 16)
    layer.set_geometry((2, 3), num_prefix_tokens=1)
    out_grid = layer(x)
    with pytest.raises(ValueError, match="grid 2x3"):
        layer(torch.randn(2, 9, 16))
    layer.set_geometry(None)
    assert not torch.allclose(layer(x), out_grid)  # 1-D positions differ from 2-D ones


@pytest.mark.parametrize("kernel", ["bilateral", "dot"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_blocked_spatial_path_matches_the_full_bias_in_values_and_gradients(monkeypatch, kernel, is_causal):
    """A SpatialKernel is built a few query rows at a time (here 1-3 rows per block) and recomputed in backward:
    the same values and gradients, bandwidths included, as one [H, N, N] bias."""
    import unrollattn.core.kernel as core_kernel

    heads, n = 2, 9
    q, k, v = (torch.randn(2, heads, n, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    h_y = torch.tensor([1.5, 3.0], dtype=torch.float64, requires_grad=True)
    h_p = torch.tensor([1.0, 4.0], dtype=torch.float64, requires_grad=True)
    pos = token_positions(n, (2, 4), 1, dtype=torch.float64)
    keep = torch.ones(2, 1, 1, n, dtype=torch.bool)
    keep[1, ..., -1] = False
    options = dict(range_bandwidth=h_y, attn_mask=None if is_causal else keep, is_causal=is_causal)
    inputs = (q, k, v, h_y, h_p)
    full = kernel_attention(q, k, v, kernel, spatial_bias=spatial_log_kernel(pos, pos, h_p, "laplacian"), **options)
    full_grads = torch.autograd.grad(full.square().sum(), inputs)
    for block_bytes in (1, 3 * 2 * heads * n * 8):
        monkeypatch.setattr(core_kernel, "SCORE_BLOCK_BYTES", block_bytes)
        blocked = kernel_attention(q, k, v, kernel, spatial_bias=core_kernel.SpatialKernel(pos, pos, h_p, "laplacian"),
                                   **options)
        torch.testing.assert_close(blocked, full)
        for a, b in zip(torch.autograd.grad(blocked.square().sum(), inputs), full_grads):
            torch.testing.assert_close(a, b)


def test_blocked_spatial_bias_reaches_sdpa_as_a_4d_mask(monkeypatch):
    """SDPA's CPU flash kernel takes only 4-D masks (a 3-D [H, Nq, Nk] one sends it to the math path, which
    materialises the scores): every bias of the blocked path, with or without a key-norm term, is 4-D."""
    import unrollattn.core.kernel as core_kernel

    seen, sdpa = [], core_kernel.F.scaled_dot_product_attention

    def recording(*args, attn_mask=None, **kwargs):
        seen.append(None if attn_mask is None else attn_mask.ndim)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(core_kernel.F, "scaled_dot_product_attention", recording)
    monkeypatch.setattr(core_kernel, "SCORE_BLOCK_BYTES", 2 * 2 * 16 * 4)  # two query rows a block
    q, k, v = (torch.randn(1, 2, 16, D, requires_grad=True) for _ in range(3))
    pos = token_positions(16, (4, 4))
    for kernel in ("dot", "bilateral"):  # ALiBi's form on a grid and bilateral, both with learned bandwidths
        h_p = torch.tensor([1.0, 2.0], requires_grad=True)
        kernel_attention(q, k, v, kernel, spatial_bias=SpatialKernel(pos, pos, h_p, "laplacian"),
                         spatial_backend="blocked").sum().backward()
    assert seen and set(seen) == {4}, seen


@pytest.mark.parametrize("kernel, kind", [("dot", "laplacian"), ("bilateral", "laplacian"), ("bilateral", "gaussian")])
@pytest.mark.parametrize("masking", ["none", "padding", "causal"])
def test_fixed_spatial_bias_runs_the_forward_once_and_matches_the_full_bias(monkeypatch, kernel, kind, masking):
    """A spatial term without a gradient (ALiBi's fixed slopes on a patch grid with a class token) goes through
    the CPU flash kernel a block of heads and query rows at a time, its backward rebuilding each block's bias
    instead of recomputing the forward: values and query/key/value gradients equal one [B, H, N, N] bias, for
    one block and for blocks of one head and a few rows."""
    import unrollattn.core.kernel as core_kernel

    forwards = []
    flash = core_kernel._CPU_FLASH
    monkeypatch.setattr(core_kernel, "_CPU_FLASH", lambda *a, **kw: forwards.append(1) or flash(*a, **kw))
    heads, n = 3, 9
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, heads, n, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    h_y = torch.tensor([1.5, 3.0, 2.0], dtype=torch.float64, requires_grad=True)
    h_p = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    pos = token_positions(n, (2, 4), 1, dtype=torch.float64)
    keep = torch.ones(2, 1, 1, n, dtype=torch.bool)
    keep[1, ..., -2:] = False
    options = dict(range_bandwidth=h_y if kernel == "bilateral" else None,
                   attn_mask=keep if masking == "padding" else None, is_causal=masking == "causal")
    inputs = (q, k, v, h_y) if kernel == "bilateral" else (q, k, v)
    full = kernel_attention(q, k, v, kernel, spatial_bias=spatial_log_kernel(pos, pos, h_p, kind), **options)
    full_grads = torch.autograd.grad(full.square().sum(), inputs)
    monkeypatch.setattr(core_kernel.torch, "get_num_threads", lambda: 1)  # one head per call at batch 2
    bias_batch = 2 if masking == "padding" else 1  # a padding mask gives every batch row its own bias
    two_rows = 2 * (bias_batch + 1) * n * 8  # a block of two rows: its bias and the distances it is built from
    for block_bytes, calls in ((2**20, heads), (two_rows, heads * math.ceil(n / 2))):
        monkeypatch.setattr(core_kernel, "SCORE_BLOCK_BYTES", block_bytes)
        forwards.clear()
        blocked = kernel_attention(q, k, v, kernel, spatial_bias=SpatialKernel(pos, pos, h_p, kind),
                                   spatial_backend="blocked", **options)
        grads = torch.autograd.grad(blocked.square().sum(), inputs)
        assert len(forwards) == calls  # each block's forward once: nothing recomputed in backward
        torch.testing.assert_close(blocked, full)
        for a, b in zip(grads, full_grads):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["laplacian", "gaussian"])
@pytest.mark.parametrize("prefix, n_query", [(0, 15), (1, 16), (2, 9)])
@pytest.mark.parametrize("masking", ["none", "padding"])
def test_grid_table_bias_equals_the_pairwise_bias(monkeypatch, kind, prefix, n_query, masking):
    """On a patch grid the fixed spatial bias is read from the offset table (one strided multiply per grid row)
    instead of pairwise distances: values and query/key/value gradients equal one dense [H, Nq, Nk] bias, with
    blocks of eight query rows that start and end inside grid rows, prefix tokens among the keys and queries, and
    fewer queries than keys."""
    import unrollattn.core.kernel as core_kernel

    grid_blocks = []
    grid_block = core_kernel._FixedBias._grid_block
    monkeypatch.setattr(core_kernel._FixedBias, "_grid_block",
                        lambda self, *a: grid_blocks.append(1) or grid_block(self, *a))
    monkeypatch.setattr(core_kernel.torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(core_kernel, "SCORE_BLOCK_BYTES", 2048)  # table 5 x 5 x 5 x 8 B, then blocks of 8 rows
    heads, grid = 2, (3, 5)
    n = prefix + 15
    torch.manual_seed(1)
    q = torch.randn(2, heads, n_query, D, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, heads, n, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pos = token_positions(n, grid, prefix, dtype=torch.float64)
    h_p = torch.tensor([1.5, 4.0], dtype=torch.float64)
    keep = torch.ones(2, 1, 1, n, dtype=torch.bool)
    keep[1, ..., -3:] = False
    mask = keep if masking == "padding" else None
    dense = kernel_attention(q, k, v, "dot", spatial_bias=spatial_log_kernel(pos[n - n_query:], pos, h_p, kind),
                             attn_mask=mask)
    table = kernel_attention(q, k, v, "dot", attn_mask=mask, spatial_backend="blocked",
                             spatial_bias=SpatialKernel(pos[n - n_query:], pos, h_p, kind, grid=grid))
    assert grid_blocks  # the table path ran
    torch.testing.assert_close(table, dense)
    for a, b in zip(torch.autograd.grad(table.square().sum(), (q, k, v)),
                    torch.autograd.grad(dense.square().sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["laplacian", "gaussian"])
def test_grid_table_blocks_are_bitwise_the_pairwise_blocks_in_float32(kind):
    """In the benchmarks' float32 the table's distances are computed by the same operations as the pairwise ones:
    every bias block (two heads, blocks of 24 rows across the class token and grid rows) is bitwise equal."""
    import unrollattn.core.kernel as core_kernel

    grid = (6, 7)
    n = 1 + 42
    pos = token_positions(n, grid, 1)
    spatial = SpatialKernel(pos, pos, torch.tensor([0.7, 3.0]), kind, grid=grid)
    table = core_kernel.grid_distance_table(spatial, torch.float32)
    pairwise = core_kernel._FixedBias(spatial, None)
    tabled = core_kernel._FixedBias(spatial, None, table)
    for start in range(0, n, 24):
        rows, heads = slice(start, min(n, start + 24)), slice(0, 2)
        blocks = []
        for bias in (pairwise, tabled):
            workspace = bias.workspace(24, 2, torch.float32)
            blocks.append(bias.block(bias.distance(rows, workspace), heads, rows, workspace))
        assert torch.equal(blocks[0], blocks[1])


def test_spatial_kernel_grid_must_match_the_positions():
    pos = token_positions(10, (3, 3), 1)
    SpatialKernel(pos, pos, torch.ones(2), "laplacian", grid=(3, 3))
    with pytest.raises(ValueError, match="grid 4x3"):
        SpatialKernel(pos, pos, torch.ones(2), "laplacian", grid=(4, 3))
    with pytest.raises(ValueError, match="grid 3x3"):
        SpatialKernel(pos[:, 0], pos[:, 0], torch.ones(2), "laplacian", grid=(3, 3))
    for bad in ((3,), (3, 3, 1), (3.0, 3), (0, 3), 9):
        with pytest.raises(ValueError, match="two positive ints"):
            SpatialKernel(pos, pos, torch.ones(2), "laplacian", grid=bad)


def test_fixed_spatial_bias_holds_no_full_score_map(monkeypatch):
    """2-D ALiBi (fixed slopes, Laplacian on a 32 x 32 grid) forward+backward stays within half a score map of
    softmax SDPA with blocks of a thirty-second of one: no [B, H, N, N] bias is kept for backward."""
    import unrollattn.core.kernel as core_kernel
    from unrollattn.utils.memory import peak_memory_mb

    monkeypatch.setattr(core_kernel, "SCORE_BLOCK_BYTES", 2**18)

    n, heads, d = 1024, 2, 32
    q, k, v = (torch.randn(1, heads, n, d, requires_grad=True) for _ in range(3))
    spatial = SpatialKernel(token_positions(n, (32, 32)), token_positions(n, (32, 32)), torch.tensor([2.0, 8.0]),
                            "laplacian")

    def alibi():
        kernel_attention(q, k, v, "dot", spatial_bias=spatial).sum().backward()

    def softmax():
        kernel_attention(q, k, v, "dot").sum().backward()

    scores_mb = heads * n * n * 4 / 2**20
    alibi_mb, softmax_mb = (peak_memory_mb(f, torch.device("cpu")) for f in (alibi, softmax))
    assert alibi_mb < softmax_mb + scores_mb / 2, (alibi_mb, softmax_mb, scores_mb)


@pytest.mark.parametrize("table", [False, True])
def test_fixed_spatial_bias_memory_beyond_sdpa_is_one_block_and_the_gradient_accumulators(monkeypatch, table):
    """2-D ALiBi forward+backward holds, beyond softmax SDPA, one block's bias with the distances or the grid table
    it is built from (together within SCORE_BLOCK_BYTES), the query/key/value gradient accumulators and one block's
    key/value gradients (each at most the size of q): no copy of q for the scale, no distances beside a full-size
    block, no two blocks' key gradients at once."""
    import unrollattn.core.kernel as core_kernel
    from unrollattn.utils.memory import peak_memory_mb

    monkeypatch.setattr(core_kernel, "SCORE_BLOCK_BYTES", 2**19)  # the 32 x 63 x 32 table takes half of it
    n, heads, d = 1024, 2, 32
    q, k, v = (torch.randn(1, heads, n, d, requires_grad=True) for _ in range(3))
    grid = token_positions(n, (32, 32))
    spatial = SpatialKernel(grid, grid, torch.tensor([2.0, 8.0]), "laplacian", grid=(32, 32) if table else None)
    assert (core_kernel.grid_distance_table(spatial, q.dtype) is not None) == table
    alibi_mb, softmax_mb = (peak_memory_mb(f, torch.device("cpu")) for f in (
        lambda: kernel_attention(q, k, v, "dot", spatial_bias=spatial).sum().backward(),
        lambda: kernel_attention(q, k, v, "dot").sum().backward()))
    q_mb = q.numel() * q.element_size() / 2**20
    budget = core_kernel.SCORE_BLOCK_BYTES / 2**20 + 5 * q_mb
    assert alibi_mb - softmax_mb <= budget + 0.05, (alibi_mb, softmax_mb, budget)


@pytest.mark.parametrize("backend", ["folded", "blocked"])
def test_bilateral_forward_backward_holds_no_full_score_map(monkeypatch, backend):
    """Causal bilateral attention (Laplacian spatial kernel on token indices, as in the LM) with learned bandwidths:
    forward+backward stays within two score maps of softmax SDPA on either memory-bounded path."""
    import unrollattn.core.kernel as core_kernel
    from unrollattn.utils.memory import peak_memory_mb

    monkeypatch.setattr(core_kernel, "SCORE_BLOCK_BYTES", 2**20)  # blocks of 128 query rows here
    n, heads, d = 1024, 2, 32
    q, k, v = (torch.randn(1, heads, n, d, requires_grad=True) for _ in range(3))
    h_y, h_p = (torch.tensor([2.0, 8.0], requires_grad=True) for _ in range(2))
    pos = token_positions(n)
    spatial = SpatialKernel(pos, pos, h_p, "laplacian", ordered=True)

    def bilateral():
        kernel_attention(q, k, v, "bilateral", range_bandwidth=h_y, spatial_bias=spatial, is_causal=True,
                         spatial_backend=backend).sum().backward()

    def softmax():
        kernel_attention(q, k, v, "dot", is_causal=True).sum().backward()

    scores_mb = heads * n * n * 4 / 2**20  # one [1, H, N, N] float32 map: 8 MB
    bilateral_mb, softmax_mb = (peak_memory_mb(f, torch.device("cpu")) for f in (bilateral, softmax))
    assert bilateral_mb < softmax_mb + 2 * scores_mb, (bilateral_mb, softmax_mb, scores_mb)


@pytest.mark.parametrize("kernel", ["bilateral", "dot"])
@pytest.mark.parametrize("kind, grid, is_causal", [("gaussian", (2, 4), False), ("gaussian", (2, 4), True),
                                                   ("gaussian", None, False), ("laplacian", None, True)])
def test_folded_spatial_path_matches_the_reference(kernel, kind, grid, is_causal):
    """The spatial term folded into extra q/k coordinates (Gaussian on a patch grid with a class token, whose NaN
    position takes no spatial term; Laplacian on token indices, causal): values and gradients of queries, keys,
    values and both bandwidths against the explicit weights, in float64."""
    heads, n = 2, 9
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    h_y = torch.tensor([1.5, 3.0], dtype=torch.float64, requires_grad=True)
    h_p = torch.tensor([0.7, 4.0], dtype=torch.float64, requires_grad=True)
    pos = token_positions(n, grid, 1 if grid else 0, dtype=torch.float64)
    spatial = SpatialKernel(pos, pos, h_p, kind, ordered=grid is None)
    h_y_fast = h_y if kernel == "bilateral" else None
    fast = kernel_attention(q, k, v, kernel, range_bandwidth=h_y_fast, spatial_bias=spatial, is_causal=is_causal,
                            spatial_backend="folded")
    inputs = (q, k, v, h_p) + ((h_y,) if kernel == "bilateral" else ())
    if kernel == "bilateral":
        slow = kernel_attention_reference(q[0], k[0], v[0], "bilateral", range_bandwidth=h_y, positions=pos,
                                          spatial_bandwidth=h_p, spatial_kernel=kind, is_causal=is_causal)[None]
    else:  # softmax x spatial kernel, renormalised: the dot kernel's weights with S_ij added (C.3)
        allowed = torch.ones(n, n, dtype=torch.bool).tril() if is_causal else torch.ones(n, n, dtype=torch.bool)
        logits = q @ k.transpose(-2, -1) / math.sqrt(D) + spatial_log_kernel(pos, pos, h_p, kind)
        slow = logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(fast, slow)
    for a, b in zip(torch.autograd.grad(fast.square().sum(), inputs), torch.autograd.grad(slow.square().sum(), inputs)):
        torch.testing.assert_close(a, b)


def test_folded_spatial_path_with_a_padding_mask_and_in_float32():
    """With a key-padding mask the folded path equals the blocked one; at N = 1024 in float32 (coordinates of size
    N) it stays within float32 attention's rounding of the float64 result."""
    heads, n = 2, 10
    q, k, v = (torch.randn(2, heads, n, D, dtype=torch.float64) for _ in range(3))
    keep = torch.ones(2, 1, 1, n, dtype=torch.bool)
    keep[1, ..., -3:] = False
    pos = token_positions(n, (3, 3), 1, dtype=torch.float64)
    spatial = SpatialKernel(pos, pos, torch.tensor([1.0, 4.0], dtype=torch.float64))
    common = dict(range_bandwidth=torch.tensor([1.5, 3.0], dtype=torch.float64), spatial_bias=spatial, attn_mask=keep)
    torch.testing.assert_close(kernel_attention(q, k, v, "bilateral", spatial_backend="folded", **common),
                               kernel_attention(q, k, v, "bilateral", spatial_backend="blocked", **common))
    n = 1024
    q, k, v = (torch.randn(1, heads, n, D, dtype=torch.float64) for _ in range(3))
    pos = token_positions(n, dtype=torch.float64)
    h_p = torch.tensor([0.5, 64.0], dtype=torch.float64)

    def run(dtype):
        spatial = SpatialKernel(pos.to(dtype), pos.to(dtype), h_p.to(dtype), "laplacian", ordered=True)
        return kernel_attention(q.to(dtype), k.to(dtype), v.to(dtype), "bilateral", spatial_bias=spatial,
                                is_causal=True, spatial_backend="folded")

    torch.testing.assert_close(run(torch.float32), run(torch.float64).float(), atol=2e-4, rtol=1e-3)


def test_folded_spatial_path_refuses_a_term_that_does_not_separate():
    q = torch.randn(1, 2, 6, D)
    pos = token_positions(6)
    for spatial, is_causal in ((SpatialKernel(pos, pos, torch.ones(2), "laplacian", ordered=True), False),
                               (SpatialKernel(pos, pos, torch.ones(2), "laplacian"), True)):
        with pytest.raises(ValueError, match="separates into query and key terms only"):
            kernel_attention(q, q, q, "bilateral", spatial_bias=spatial, is_causal=is_causal,
                             spatial_backend="folded")
        auto = kernel_attention(q, q, q, "bilateral", spatial_bias=spatial, is_causal=is_causal)  # falls back
        torch.testing.assert_close(auto, kernel_attention(q, q, q, "bilateral", spatial_bias=spatial,
                                                          is_causal=is_causal, spatial_backend="blocked"))


@pytest.mark.parametrize("kind", ["gaussian", "laplacian"])
@pytest.mark.parametrize("kernel", ["bilateral", "dot"])
def test_flex_spatial_path_matches_the_blocked_one(kind, kernel):
    """spatial_backend='flex' (FlexAttention with the spatial log-kernel, key-norm term and mask in its score
    function) gives the blocked path's values: causal, with a padding mask, and with prefix tokens (NaN
    positions). Forward only here: torch has no CPU backward for FlexAttention (CUDA trains through it)."""
    import warnings

    torch.manual_seed(0)
    heads, n = 2, 10
    q, k, v = (torch.randn(2, heads, n, D, dtype=torch.float64) for _ in range(3))
    h_y = torch.tensor([1.5, 3.0], dtype=torch.float64)
    pos = token_positions(n, (3, 3), 1, dtype=torch.float64)  # a class token, then a 3 x 3 grid
    spatial = SpatialKernel(pos, pos, torch.tensor([1.0, 4.0], dtype=torch.float64), kind)
    keep = torch.ones(2, 1, 1, n, dtype=torch.bool)
    keep[1, ..., -3:] = False
    for options in (dict(is_causal=True), dict(attn_mask=keep)):
        common = dict(range_bandwidth=h_y if kernel == "bilateral" else None, spatial_bias=spatial, **options)
        blocked = kernel_attention(q, k, v, kernel, spatial_backend="blocked", **common)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # eager FlexAttention says it is unfused
            flex = kernel_attention(q, k, v, kernel, spatial_backend="flex", **common)
        torch.testing.assert_close(flex, blocked)
    with pytest.raises(ValueError, match="forward only"):
        kernel_attention(q, k, v.requires_grad_(), "bilateral", spatial_bias=spatial, spatial_backend="flex")
    with pytest.raises(ValueError, match="spatial_backend: expected one of"):
        kernel_attention(q, k, v, "bilateral", spatial_bias=spatial, spatial_backend="triton")


@pytest.mark.parametrize("kernel, kind, grid", [("gaussian", None, None), ("mahalanobis", None, None),
                                                ("bilateral", "gaussian", (2, 4)), ("bilateral", "laplacian", None),
                                                ("dot", "laplacian", None)])
def test_a_small_bias_without_gradient_reaches_sdpa_as_one_mask(monkeypatch, kernel, kind, grid):
    """Without gradients (a decoding step) the key-norm and spatial terms go to SDPA as one additive 4-D mask, with
    the queries and keys left at their head size; the values equal the explicit reference, for all queries and for
    the last query alone against every key (causal decoding). With a gradient the terms are folded as before."""
    import torch.nn.functional as F

    heads, n = 2, 9
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, D, dtype=torch.float64) for _ in range(3))
    h_y = torch.tensor([1.5, 3.0], dtype=torch.float64)
    h_p = torch.tensor([0.7, 4.0], dtype=torch.float64)
    metric = torch.rand(heads, D, dtype=torch.float64) + 0.5 if kernel == "mahalanobis" else None
    pos = token_positions(n, grid, 1 if grid else 0, dtype=torch.float64)
    is_causal = grid is None

    def fast(queries, positions_q):
        spatial = None if kind is None else SpatialKernel(positions_q, pos, h_p, kind, ordered=grid is None)
        return kernel_attention(queries, k, v, kernel, range_bandwidth=None if kernel == "dot" else h_y, metric=metric,
                                spatial_bias=spatial, is_causal=is_causal)

    if kernel == "dot":  # softmax x Laplacian spatial kernel (ALiBi's form, C.3)
        logits = q @ k.transpose(-2, -1) / math.sqrt(D) + spatial_log_kernel(pos, pos, h_p, kind)
        slow = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")).softmax(-1) @ v
    else:
        slow = kernel_attention_reference(q[0], k[0], v[0], kernel, range_bandwidth=h_y, metric=metric,
                                          positions=None if kind is None else pos, spatial_bandwidth=h_p,
                                          spatial_kernel=kind or "gaussian", is_causal=is_causal)[None]
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q_, k_, v_, **kw: calls.append((q_.shape[-1], kw.get("attn_mask"))) or sdpa(q_, k_, v_, **kw))
    with torch.no_grad():
        torch.testing.assert_close(fast(q, pos), slow)
        if is_causal:
            torch.testing.assert_close(fast(q[..., -1:, :], pos[-1:]), slow[..., -1:, :])
    assert calls and all(width == D and mask is not None and mask.ndim == 4 for width, mask in calls), calls
    calls.clear()
    q.requires_grad_()
    torch.testing.assert_close(fast(q, pos), slow)
    assert [width > D for width, _ in calls] == [True], calls  # folded into extra coordinates


@pytest.mark.parametrize("kernel", ["gaussian", "bilateral", "mahalanobis"])
def test_non_positive_bandwidths_are_refused_by_name_unless_value_checks_are_off(kernel):
    import unrollattn

    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    good = torch.ones(2, dtype=torch.float64)
    bad = torch.tensor([1.0, 0.0], dtype=torch.float64)
    spatial = lambda h: SpatialKernel(token_positions(5, dtype=torch.float64), token_positions(5, dtype=torch.float64),  # noqa: E731
                                      h, "laplacian", ordered=True)
    cases = {"gaussian": ("range_bandwidth", dict(range_bandwidth=bad)),
             "bilateral": ("spatial_bandwidth", dict(range_bandwidth=good, spatial_bias=spatial(bad))),
             "mahalanobis": ("metric", dict(metric=torch.tensor([[1.0] * 4, [1.0, 1.0, -1.0, 1.0]], dtype=torch.float64)))}
    name, options = cases[kernel]
    with pytest.raises(ValueError, match=f"{name}: expected positive bandwidths"):
        kernel_attention(q, k, v, kernel, is_causal=True, **options)
    unrollattn.set_finite_checks(False)  # the value checks that sync with the host go off together
    try:
        assert kernel_attention(q, k, v, kernel, is_causal=True, **options).shape == q.shape
    finally:
        unrollattn.set_finite_checks(True)


def test_positions_that_carry_a_gradient_are_rejected_with_a_clear_error():
    """The spatial kernel's gradient reaches its bandwidths; positions are constant coordinates."""
    pos = token_positions(4, (2, 2)).requires_grad_()
    with pytest.raises(ValueError, match="positions: expected constant coordinates"):
        spatial_log_kernel(pos, pos.detach(), torch.tensor([1.0]))
