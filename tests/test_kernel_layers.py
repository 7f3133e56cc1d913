"""Kernel attention layers built in float64 keep every parameter (bandwidths, metric) and their output in float64."""
import pytest
import torch

from unrollattn import get_attention
from unrollattn.layers import build_attention

KERNELS = ("gaussian", "mahalanobis", "bilateral", "twicing")


@pytest.mark.parametrize("how", ["dtype", "default_dtype"])
@pytest.mark.parametrize("name", KERNELS)
def test_float64_build_has_float64_bandwidths(name, how):
    if how == "dtype":
        layer = get_attention(name)(16, 2, dtype=torch.float64)
    else:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            layer = get_attention(name)(16, 2)
        finally:
            torch.set_default_dtype(previous)
    assert {n: p.dtype for n, p in layer.named_parameters() if p.dtype != torch.float64} == {}
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x, is_causal=True)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert all(p.grad is None or p.grad.dtype == torch.float64 for p in layer.parameters())


def test_alibi_is_softmax_minus_alibis_linear_distance_bias():
    """The ALiBi control: softmax(q.k/sqrt(d) - m_h |i - j|) with m_h = 2^(-8h/H), nothing learned beyond GPT-2's."""
    import math

    from unrollattn.core.subspace import merge_heads
    from unrollattn.layers.kernel_attention import alibi_slopes

    torch.manual_seed(0)
    layer = build_attention("alibi", 32, 4).double()
    assert not any(p.requires_grad for n, p in layer.named_parameters() if "bandwidth" in n)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    q, k, v = layer.project_qkv(x)
    i = torch.arange(10)
    slopes = torch.tensor(alibi_slopes(4), dtype=torch.float64)[:, None, None]
    logits = q @ k.transpose(-1, -2) / math.sqrt(8) - slopes * (i[:, None] - i[None]).abs()
    logits = logits.masked_fill(i[None, :] > i[:, None], float("-inf"))
    torch.testing.assert_close(layer(x, is_causal=True), layer.proj(merge_heads(logits.softmax(-1) @ v)))


@pytest.mark.parametrize("block_bytes, table", [(3 * 21 * 8, False), (4096, True)])
def test_alibi_on_a_patch_grid_matches_the_explicit_distance_bias_in_values_and_gradients(monkeypatch, block_bytes,
                                                                                           table):
    """2-D ALiBi (Euclidean grid distance, a class token with no spatial term), built a few heads and query rows at
    a time through the CPU flash kernel from pairwise distances (a few rows per block) or from the grid's offset
    table (16 rows per block): output and the gradients of the input and the projections equal
    softmax(q.k/sqrt(d) - m_h ||p_i - p_j||) v written out."""
    import math

    import unrollattn.core.kernel as core_kernel
    from unrollattn.core.subspace import merge_heads
    from unrollattn.layers.kernel_attention import alibi_slopes

    monkeypatch.setattr(core_kernel, "SCORE_BLOCK_BYTES", block_bytes)
    grid_blocks = []
    grid_block = core_kernel._FixedBias._grid_block
    monkeypatch.setattr(core_kernel._FixedBias, "_grid_block",
                        lambda self, *a: grid_blocks.append(1) or grid_block(self, *a))
    torch.manual_seed(0)
    layer = build_attention("alibi", 48, 3).double()
    layer.set_geometry((4, 5), num_prefix_tokens=1)
    x = torch.randn(2, 21, 48, dtype=torch.float64, requires_grad=True)
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(5.0), indexing="ij")
    grid = torch.stack([rows.flatten(), cols.flatten()], -1).double()
    distance = torch.zeros(21, 21, dtype=torch.float64)
    distance[1:, 1:] = torch.cdist(grid, grid)
    slopes = torch.tensor(alibi_slopes(3), dtype=torch.float64)[:, None, None]

    def explicit(tokens):
        q, k, v = layer.project_qkv(tokens)
        return layer.proj(merge_heads((q @ k.transpose(-1, -2) / math.sqrt(16) - slopes * distance).softmax(-1) @ v))

    outputs, grads = [], []
    for forward in (layer, explicit):
        x.grad = None
        layer.zero_grad()
        out = forward(x)
        out.square().sum().backward()
        outputs.append(out)
        grads.append((x.grad.clone(), layer.qkv.weight.grad.clone(), layer.proj.weight.grad.clone()))
    assert bool(grid_blocks) == table
    torch.testing.assert_close(outputs[0], outputs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_tied_bilateral_bandwidths_are_one_parameter(tmp_path):
    tied = build_attention("bilateral", 32, 4, tie_bandwidths=True)
    assert not hasattr(tied, "log_spatial_bandwidth")
    assert sum(p.numel() for p in tied.parameters()) == sum(p.numel() for p in build_attention("bilateral", 32, 4)
                                                             .parameters()) - 4
    with torch.no_grad():
        tied.log_range_bandwidth.fill_(0.5)
    spatial = tied.spatial_bias(5, 5, None, "cpu", torch.float32)
    torch.testing.assert_close(spatial.bandwidth, torch.full((4,), 0.5).exp())  # h_p is h_y
    import unrollattn
    from transformers import AutoModelForCausalLM

    lm = unrollattn.build_model("bilateral_tied_lm_tiny", n_layer=1, n_embd=32, n_head=4)
    lm.save_pretrained(tmp_path)  # HF refuses shared tensors it does not know as tied: there must be none
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, lm.config.vocab_size, (1, 6))
    torch.testing.assert_close(reloaded.eval()(ids).logits, lm.eval()(ids).logits)
    with pytest.raises(ValueError, match="tie_bandwidths"):
        build_attention("gaussian", 32, 4, tie_bandwidths=True)
    with pytest.raises(ValueError, match="spatial"):
        build_attention("gaussian", 32, 4, spatial=True)
