"""Boosting residual rules B1/B2/B3 (docs/papers.md C.6) and the kernel ViTs that use them."""
import pytest
import timm
import torch

import unrollattn
from unrollattn.layers import LayerZeroInput, build_block

SMALL = dict(num_classes=10, img_size=28, patch_size=4, in_chans=1, depth=2)


def _block(rule, **options):
    return build_block("boost", 16, 2, attention="mhsa", rule=rule, mlp=False, **options).double().eval()


def test_sos_rule_is_strengthen_operate_subtract():
    block, x = _block("sos", strength=0.7), torch.randn(2, 5, 16, dtype=torch.float64)
    u = block.attn(block.norm1(x))
    operate = lambda s: s + block.attn(block.norm1(s))  # noqa: E731  F(s) = s + SA(LN(s))
    torch.testing.assert_close(block(x), operate(x + 0.7 * u) - 0.7 * u)


def test_twicing_rule_adds_the_smoothed_method_noise():
    block, x = _block("twicing", strength=0.3), torch.randn(2, 5, 16, dtype=torch.float64)
    u = block.attn(block.norm1(x))
    torch.testing.assert_close(block(x), x + u + 0.3 * block.attn(block.norm1(x) - u))


def test_anchor_rule_pulls_toward_layer_zero_input():
    block, x = _block("anchor", strength=0.6), torch.randn(2, 5, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="attach_layer_zero_input"):
        block(x)
    block.layer_zero = LayerZeroInput()
    x0 = torch.randn_like(x)
    block.layer_zero.set(x0)
    torch.testing.assert_close(block(x), x + block.attn(block.norm1(x)) + 0.6 * (x0 - x))


def test_none_rule_is_the_plain_residual_and_bad_rule_rejected():
    block, x = _block("none"), torch.randn(1, 3, 16, dtype=torch.float64)
    torch.testing.assert_close(block(x), x + block.attn(block.norm1(x)))
    with pytest.raises(ValueError, match="rule"):
        build_block("boost", 16, 2, rule="bregman")


def test_anchor_rule_in_a_timm_backbone_sees_the_first_block_input():
    model = timm.create_model("vit_bilateral_tiny_patch16_224", **SMALL, block="boost", block_options={"rule": "anchor"})
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.append(m.layer_zero.value))
    first_input = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: first_input.append(a[0]))
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    assert seen[0] is first_input[0]
    assert model.blocks[1].layer_zero.value is None  # released after the forward pass


@pytest.mark.parametrize("name", [f"vit_{a}_tiny_patch16_224" for a in ("gaussian", "mahalanobis", "bilateral", "twicing")])
def test_kernel_vits_match_timm_vit_except_attention(name):
    ours = timm.create_model(name, **SMALL)
    vit = timm.create_model("vit_tiny_patch16_224", **SMALL)
    extra = {k for k in ours.state_dict()} - {k for k in vit.state_dict()}
    assert all(k.split(".")[-1] in {"log_range_bandwidth", "log_spatial_bandwidth", "log_metric"} for k in extra)
    missing = {k for k in vit.state_dict()} - {k for k in ours.state_dict()}
    assert missing == ({"pos_embed"} if "bilateral" in name else set())  # bilateral: position via its spatial kernel
    assert ours(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert name in unrollattn.list_models(family="kernel")


# ----------------------------------------------------------------------------------- CRATE-alpha sparse coding


def test_sparse_coding_step_matches_explicit_ista_from_zero():
    """SparseCodingStep = decoder @ (steps of A <- ReLU(A - eta D^T (D A - z) - eta lambda) from A = 0), float64."""
    from unrollattn.layers.blocks import SparseCodingStep

    torch.manual_seed(0)
    layer = SparseCodingStep(6, expansion=3, steps=4, step_size=0.3, lambd=0.05).double()
    z = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    d = layer.encoder.weight.t()  # D in R^{d x m}
    a = torch.zeros(2, 5, 18, dtype=torch.float64)
    for _ in range(4):
        a = torch.relu(a - 0.3 * (a @ d.t() - z) @ d - 0.3 * 0.05)
    reference = a @ layer.decoder.weight.t()
    out = layer(z)
    torch.testing.assert_close(out, reference)
    g_out, g_ref = torch.autograd.grad(out.sum(), z)[0], torch.autograd.grad(reference.sum(), z)[0]
    torch.testing.assert_close(g_out, g_ref)


def test_crate_block_ista_kinds_and_bad_options():
    from unrollattn.layers.blocks import ISTA, CrateBlock, SparseCodingStep

    x = torch.randn(2, 5, 16)
    plain = CrateBlock(16, 4)
    assert isinstance(plain.ista, ISTA) and not plain.ista_residual
    h = x + plain.attn(plain.norm1(x), is_causal=True)
    torch.testing.assert_close(plain(x, is_causal=True), plain.ista(plain.norm2(h)))  # no residual around ISTA
    alpha = CrateBlock(16, 4, ista="alpha", ista_expansion=2)
    assert isinstance(alpha.ista, SparseCodingStep) and alpha.ista.encoder.out_features == 32
    h = x + alpha.attn(alpha.norm1(x), is_causal=True)
    torch.testing.assert_close(alpha(x, is_causal=True), h + alpha.ista(alpha.norm2(h)))
    residual = CrateBlock(16, 4, ista_residual=True)
    h = x + residual.attn(residual.norm1(x))
    torch.testing.assert_close(residual(x), h + residual.ista(residual.norm2(h)))
    for bad, match in ((dict(ista="fista"), "ista"), (dict(ista_expansion=2), "alpha"),
                       (dict(ista="alpha", ista_residual=False), "residual"),
                       (dict(ista="alpha", ista_steps=0), "steps"), (dict(ista="alpha", ista_step_size=0.0), "step_size")):
        with pytest.raises(ValueError, match=match):
            CrateBlock(16, 4, **bad)
