"""Attention recorded from the layers' own forward (diagnostics.attention): the weights reproduce the layer's output
where that identity holds, every registered attention records, recording is off by default and leaves no trace."""
import pytest
import torch
import torch.nn as nn

import unrollattn
from unrollattn.core.subspace import merge_heads
from unrollattn.diagnostics import NoAttentionLayersError, attention_maps, recording
from unrollattn.diagnostics.attention import attention_name
from unrollattn.registry import ATTENTIONS, get_attention

GRID, PREFIX, DIM, HEADS = (3, 4), 1, 16, 2


def layer_and_tokens(name, dtype=torch.float64, **options):
    torch.manual_seed(0)
    layer = get_attention(name)(DIM, HEADS, qkv_bias=True, **options).to(dtype).eval()
    layer.set_geometry(grid=GRID, num_prefix_tokens=PREFIX)
    x = torch.randn(2, PREFIX + GRID[0] * GRID[1], DIM, dtype=dtype)
    return layer, x


def single(records):
    assert len(records) == 1
    return records[0]


@pytest.mark.parametrize("name", ["mhsa", "gaussian", "mahalanobis", "bilateral"])
def test_weights_times_values_is_the_output(name):
    layer, x = layer_and_tokens(name)
    rec = single(attention_maps(layer, x))
    w = rec.tensors["weights"]
    assert w.shape == (2, HEADS, x.shape[1], x.shape[1])
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w[..., 0]))
    _, _, v = layer.project_qkv(x)
    torch.testing.assert_close(layer.proj(merge_heads(w @ v)), layer(x))
    torch.testing.assert_close(rec.output, layer(x))
    assert rec.attention == name and rec.grid == GRID and rec.num_prefix_tokens == PREFIX


@pytest.mark.parametrize("options", [{}, {"tied_output": True, "step_size": 0.3},
                                     {"nonlinearity": "thresholded_softmax", "threshold": 0.6},
                                     {"nonlinearity": "relu"}])
def test_mssa_weights_average_the_subspace_projections(options):
    layer, x = layer_and_tokens("mssa", **options)
    w = single(attention_maps(layer, x)).tensors["weights"]
    heads = layer.project(x)
    mixed = merge_heads(w @ heads)
    out = layer.step_size * mixed @ layer.subspace.weight if layer.tied_output else layer.proj(mixed)
    torch.testing.assert_close(out, layer(x))


def test_twicing_output_is_two_a_minus_a_squared_times_v():
    layer, x = layer_and_tokens("twicing")
    a = single(attention_maps(layer, x)).tensors["weights"]
    _, _, v = layer.project_qkv(x)
    torch.testing.assert_close(layer.proj(merge_heads((2 * a - a @ a) @ v)), layer(x))  # C.4


def test_bilateral_factors_multiply_to_the_weights():
    layer, x = layer_and_tokens("bilateral")
    t = single(attention_maps(layer, x)).tensors
    product = t["range"] * t["spatial"]
    torch.testing.assert_close(product / product.sum(-1, keepdim=True), t["weights"])  # C.5: range x spatial
    # the spatial factor is input-independent and widest for the widest bandwidth; cls rows have no spatial term
    spatial = t["spatial"][0, :, PREFIX:, PREFIX:]
    assert spatial[-1].diagonal().mean() < spatial[0].diagonal().mean()
    torch.testing.assert_close(t["spatial"][:, :, 0], torch.full_like(t["spatial"][:, :, 0], 1 / x.shape[1]))


@pytest.mark.parametrize("name", ["glr", "gtv"])
def test_graph_layers_record_the_graph_their_filter_used(name):
    layer, x = layer_and_tokens(name)
    t = single(attention_maps(layer, x)).tensors
    weights, nbhd, prefix = layer.graph(x)
    torch.testing.assert_close(t["edge_weights"], weights)
    assert torch.equal(t["neighbour_index"], nbhd.index) and torch.equal(t["neighbour_valid"], nbhd.valid)
    assert (t["edge_weights"][..., ~nbhd.valid] == 0).all()
    b, n, _ = x.shape
    v = layer.values(x).view(b, n, HEADS, layer.head_dim).transpose(1, 2)
    patches = layer.filter(v[:, :, prefix:], t["edge_weights"], nbhd)  # the filter on the recorded graph
    rows = torch.cat([t["prefix_weights"] @ v, patches], dim=2)
    torch.testing.assert_close(layer.proj(merge_heads(rows)), layer(x))


def test_every_registered_attention_records_something():
    for name in ATTENTIONS.names():
        layer, x = layer_and_tokens(name, dtype=torch.float32)
        t = single(attention_maps(layer, x)).tensors
        assert "weights" in t or "edge_weights" in t, name


def test_recording_is_off_by_default_and_leaves_nothing_behind():
    layer, x = layer_and_tokens("bilateral")
    layer(x)
    assert not layer.record_attention and "recorded" not in layer.__dict__
    with recording(layer) as records:
        assert layer.record_attention
        layer(x)
        layer(x)
    assert [r.call for r in records] == [0, 1]
    assert not layer.record_attention and "recorded" not in layer.__dict__ and not layer._forward_hooks
    layer(x)
    assert len(records) == 2


def test_vit_model_records_every_block_and_boost_blocks_record_each_call():
    model = unrollattn.build_model("vit_bilateral_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2,
                                   num_heads=2, num_classes=3).eval()
    records = attention_maps(model, torch.randn(1, 3, 16, 16))
    assert [(r.layer, r.attention) for r in records] == [(0, "bilateral"), (1, "bilateral")]
    assert records[0].tensors["weights"].shape == (1, 2, 17, 17) and records[0].grid == (4, 4)
    boost = unrollattn.build_model("vit_unrolled_tiny_patch16_224", attention="mhsa", block="boost", img_size=16,
                                   patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                                   block_options={"rule": "twicing"}).eval()
    assert [r.call for r in attention_maps(boost, torch.randn(1, 3, 16, 16))] == [0, 1]


def test_restoration_blocks_record_graph_and_image():
    model = unrollattn.build_model("uglr_demosaic", blocks=2, heads=2).eval()
    x = torch.rand(1, 3, 16, 16)
    records = attention_maps(model, model.observe(x))
    assert [r.attention for r in records] == ["uglr", "uglr"]
    assert records[-1].output.shape == (1, 3, 16, 16)
    torch.testing.assert_close(records[-1].output, model(model.observe(x)))
    for rec, graph in zip(records, model.graphs(model.observe(x))):
        torch.testing.assert_close(rec.tensors["edge_weights"], graph)


def test_a_model_without_attention_layers_is_refused():
    with pytest.raises(NoAttentionLayersError, match="no unrollattn attention layer"):
        attention_maps(nn.Sequential(nn.Linear(4, 4)), torch.randn(1, 4))
    assert attention_name(nn.Linear(2, 2)) == "Linear"


def test_timm_vit_attention_is_recorded_from_its_own_unfused_path():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32,
                              depth=2, num_heads=2, num_classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    fused = [blk.attn.fused_attn for blk in model.blocks]
    reference = model(x)
    records = attention_maps(model, x)
    assert [r.attention for r in records] == ["mhsa (timm)"] * 2 and records[0].grid == (4, 4)
    assert records[0].num_prefix_tokens == 1 and records[0].tensors["weights"].shape == (2, 2, 17, 17)
    attn = model.blocks[0].attn
    tokens = model.blocks[0].norm1(model._pos_embed(model.patch_embed(x)))
    b, n, _ = tokens.shape
    v = attn.qkv(tokens).view(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4)[2]
    torch.testing.assert_close(attn.proj(merge_heads(records[0].tensors["weights"] @ v)), records[0].output)
    assert [blk.attn.fused_attn for blk in model.blocks] == fused  # restored
    torch.testing.assert_close(model(x), reference)
