"""The attention/block contract: timm injection, parity with references, bad inputs."""
import pytest
import timm
import torch
from timm.layers import Attention as TimmAttention

import unrollattn
from unrollattn.core.reference import mhsa_reference, mssa_reference
from unrollattn.layers import build_attention, build_block

ATTENTIONS = unrollattn.list_attentions()
TIMM_EXTRAS = dict(qk_norm=False, scale_norm=False, proj_bias=True, norm_layer=torch.nn.LayerNorm,
                   device=None, dtype=None)


@pytest.mark.parametrize("name", ATTENTIONS)
def test_attention_contract(name):
    cls = unrollattn.get_attention(name)
    layer = cls(32, num_heads=4, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, **TIMM_EXTRAS)
    x = torch.randn(2, 9, 32)
    assert layer(x).shape == (2, 9, 32)
    assert layer(x, attn_mask=None, is_causal=True).shape == (2, 9, 32)


@pytest.mark.parametrize("name", ATTENTIONS)
def test_wrong_token_dtype_is_a_clear_error(name):
    layer = unrollattn.get_attention(name)(32, num_heads=4)
    with pytest.raises(ValueError, match="floating-point token tensor \\(torch.float32\\), got torch.int64"):
        layer(torch.randint(0, 5, (2, 9, 32)))
    with pytest.raises(ValueError, match="expected dtype torch.float32 \\(the parameters' dtype\\), got torch.float64"):
        layer(torch.randn(2, 9, 32, dtype=torch.float64))
    assert layer.double()(torch.randn(2, 9, 32, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("name", ATTENTIONS)
def test_attention_plugs_into_timm_vit(name):
    model = timm.create_model("vit_tiny_patch16_224", attn_layer=unrollattn.get_attention(name), depth=2,
                              num_classes=5, img_size=32, patch_size=8)
    assert all(isinstance(b.attn, unrollattn.get_attention(name)) for b in model.blocks)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)
    out.sum().backward()


def test_options_bound_by_subclass_reach_timm():
    cls = unrollattn.get_attention("mssa").with_options(nonlinearity="relu", tied_output=True)
    assert isinstance(cls, type) and issubclass(cls, unrollattn.get_attention("mssa"))
    model = timm.create_model("vit_tiny_patch16_224", attn_layer=cls, depth=1, num_classes=3, img_size=32, patch_size=8)
    attn = model.blocks[0].attn
    assert attn.nonlinearity == "relu" and attn.proj is None
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_mhsa_matches_reference_and_timm_attention():
    torch.manual_seed(1)
    layer = build_attention("mhsa", 16, 4, qkv_bias=True).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    ref = mhsa_reference(x, layer.qkv.weight, layer.qkv.bias, layer.proj.weight, layer.proj.bias, 4, is_causal=True)
    out = layer(x, is_causal=True)
    torch.testing.assert_close(out, ref)
    g_fast = torch.autograd.grad(out.sum(), [x, layer.qkv.weight])
    g_ref = torch.autograd.grad(ref.sum(), [x, layer.qkv.weight])
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b)
    timm_attn = TimmAttention(16, num_heads=4, qkv_bias=True).double()
    timm_attn.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), timm_attn(x))


def test_mssa_layer_matches_reference_with_mask():
    layer = build_attention("mssa", 16, 4).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[0, 0, :, 3:] = False
    ref = mssa_reference(x, layer.subspace.weight, 4, layer.proj.weight, layer.proj.bias, attn_mask=mask, is_causal=True)
    torch.testing.assert_close(layer(x, attn_mask=mask, is_causal=True), ref)


def test_mssa_has_half_the_projection_parameters_of_mhsa():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    mssa, mhsa = build_attention("mssa", 64, 4), build_attention("mhsa", 64, 4)
    assert count(mhsa) == 4 * 64 * 64 + 64
    assert count(mssa) == 2 * 64 * 64 + 64
    assert count(build_attention("mssa", 64, 4, tied_output=True)) == 64 * 64


@pytest.mark.parametrize("name", ATTENTIONS)
def test_bad_inputs_raise_clear_errors(name):
    layer = build_attention(name, 32, 4)
    with pytest.raises(ValueError, match=r"\[B, N, 32\]"):
        layer(torch.randn(9, 32))
    with pytest.raises(ValueError, match=r"\[B, N, 32\]"):
        layer(torch.randn(2, 9, 16))
    bad = torch.randn(2, 9, 32)
    bad[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        layer(bad)
    with pytest.raises(ValueError, match="attn_mask"):
        layer(torch.randn(2, 9, 32), attn_mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        unrollattn.get_attention(name)(30, num_heads=4)


def test_finite_checks_can_be_switched_off():
    layer = build_attention("mssa", 8, 2)
    bad = torch.full((1, 3, 8), float("nan"))
    unrollattn.set_finite_checks(False)
    try:
        assert torch.isnan(layer(bad)).all()
    finally:
        unrollattn.set_finite_checks(True)


def test_unknown_names_list_close_matches():
    with pytest.raises(unrollattn.UnknownNameError, match="mssa"):
        unrollattn.get_attention("msa")
    with pytest.raises(ValueError, match="crate_tiny_patch16_224"):
        unrollattn.build_model("crate_tiny_patch16")
    with pytest.raises(KeyError, match="aot"):
        unrollattn.get_block("aott")


@pytest.mark.parametrize("block", unrollattn.list_blocks())
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_any_block_takes_any_attention(block, attention):
    layer = build_block(block, 32, 4, attention=attention)
    assert isinstance(layer.attn, unrollattn.get_attention(attention))
    x = torch.randn(2, 7, 32, requires_grad=True)
    y = layer(x, is_causal=True)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None


def test_crate_block_is_mssa_then_ista_without_residual():
    block = build_block("crate", 16, 2).double().eval()
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    half = x + block.attn(block.norm1(x))
    expected = torch.relu(block.norm2(half) - 0.1 * (block.norm2(half) @ block.ista.weight.t() - block.norm2(half))
                          @ block.ista.weight - 0.1 * 0.1)
    torch.testing.assert_close(block(x), expected)
    assert (block(x) >= 0).all()


def test_aot_block_without_norm_is_plain_skip_plus_attention():
    block = build_block("aot", 16, 2, use_norm=False).double()
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    torch.testing.assert_close(block(x), x + block.attn(x))
    assert not hasattr(build_block("aot", 16, 2), "mlp")


@pytest.mark.parametrize("block_name", ["aot", "transformer"])
def test_layer_scale_and_drop_path_act_on_the_residual_branches(block_name):
    """timm's init_values / drop_path reach the blocks' residual branches (forward and cached decoding)."""
    from transformers import DynamicCache

    block = build_block(block_name, 16, 2, init_values=0.5, drop_path=1.0).double().eval()
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    half = x + 0.5 * block.attn(block.norm1(x), is_causal=True)
    expected = half if block_name == "aot" else half + 0.5 * block.mlp(block.norm2(half))
    torch.testing.assert_close(block(x, is_causal=True), expected)
    torch.testing.assert_close(block.decode(x, DynamicCache(), 0), expected)
    block.train()  # drop_path=1.0 drops every sample's branch: the block passes its input through
    torch.testing.assert_close(block(x, is_causal=True), x)


def test_unknown_layer_keywords_raise_with_the_closest_option():
    """A typo must not silently keep the default (it used to warn only)."""
    with pytest.raises(ValueError, match="unknown option.*'nonlinearty' \\(did you mean 'nonlinearity'\\?\\)"):
        build_attention("mssa", 8, 2, nonlinearty="relu")
    from unrollattn.layers.base import UnknownOptionError

    with pytest.raises(UnknownOptionError, match="'use_nrom' \\(did you mean 'use_norm'\\?\\)"):
        build_block("aot", 8, 2, use_nrom=False)
    with pytest.raises(TypeError, match="unknown option"):  # also a TypeError, like any unexpected keyword
        unrollattn.get_attention("mssa").with_options(tresholds=0.1)(8, 2)
    # timm's own keywords stay accepted
    build_attention("mssa", 8, 2, qk_norm=False, scale_norm=False, norm_layer=torch.nn.LayerNorm, depth=3)
