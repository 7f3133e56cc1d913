"""Kernel ViTs: bilateral without additive position embedding, meta-device construction (fast parameter
counts equal to real builds), bandwidth initialisation and validation."""
import math

import pytest
import timm
import torch

from unrollattn import build_attention
from unrollattn.cli import model_params
from unrollattn.registry import build_model

SMALL = dict(num_classes=10, img_size=28, patch_size=4, in_chans=1, depth=2, embed_dim=32, num_heads=2)
KERNEL_VITS = [f"vit_{a}_tiny_patch16_224" for a in ("gaussian", "mahalanobis", "bilateral", "twicing")]


def test_bilateral_vit_has_no_additive_position_embedding_unless_asked():
    bilateral = timm.create_model("vit_bilateral_tiny_patch16_224", **SMALL)
    assert bilateral.pos_embed is None and "pos_embed" not in bilateral.state_dict()
    assert bilateral(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert bilateral.blocks[0].attn.grid == (7, 7) and bilateral.blocks[0].attn.num_prefix_tokens == 1
    with_pe = timm.create_model("vit_bilateral_tiny_patch16_224", **SMALL, pos_embed="learn")
    assert with_pe.pos_embed.shape == (1, 1 + 49, 32)
    for name in ("vit_gaussian_tiny_patch16_224", "vit_twicing_tiny_patch16_224", "vit_tiny_patch16_224"):
        assert timm.create_model(name, **SMALL).pos_embed is not None, name


def test_bilateral_vit_sees_position_only_through_the_spatial_kernel():
    """Without PE, permuting the patches changes the output only because of the spatial term."""
    torch.manual_seed(0)
    model = timm.create_model("vit_bilateral_tiny_patch16_224", **SMALL, global_pool="avg").eval()
    tokens = torch.randn(1, 49, 32)
    perm = torch.randperm(49)

    def features(x):
        return model.forward_head(model.norm(model.blocks(torch.cat([model.cls_token, x], 1))), pre_logits=True)

    with torch.no_grad():
        shuffled = features(tokens[:, perm])
        assert not torch.allclose(features(tokens), shuffled, atol=1e-5)
        for block in model.blocks:  # flat spatial kernel: permutation invariant again
            block.attn.log_spatial_bandwidth.fill_(math.log(1e4))
        torch.testing.assert_close(features(tokens), features(tokens[:, perm]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", KERNEL_VITS)
def test_bad_images_and_sizes_are_clear_errors(name):
    model = timm.create_model(name, **SMALL)
    with pytest.raises(ValueError, match=r"expected an image batch \[B, 1, H, W\], got shape \[1, 28, 28\]"):
        model(torch.randn(1, 28, 28))  # [C, H, W]: one image without its batch axis
    with pytest.raises(ValueError, match=r"expected an image batch \[B, 1, H, W\], got shape \[2, 28, 28\]"):
        model(torch.randn(2, 28, 28))  # [B, H, W]: grey images without the channel axis
    with pytest.raises(ValueError, match=r"expected a float image tensor \[B, 1, H, W\] \(normalised.*torch.uint8"):
        model(torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected dtype torch.float32"):
        model(torch.randn(2, 1, 28, 28, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected 28x28 images, got 32x32"):
        model(torch.randn(2, 1, 32, 32))
    for option, value, message in (("patch_size", 0, "patch_size: expected an integer >= 1, got 0"),
                                   ("embed_dim", -8, "embed_dim: expected an integer >= 1, got -8"),
                                   ("depth", "2", "depth: expected an integer >= 1, got '2' \\(str\\)")):
        with pytest.raises(ValueError, match=message):
            timm.create_model(name, **{**SMALL, option: value})


@pytest.mark.parametrize("name", KERNEL_VITS)
def test_kernel_vits_build_on_meta_and_counts_match_real_builds(name):
    with torch.device("meta"):
        meta = build_model(name)
    assert next(meta.parameters()).is_meta
    real = build_model(name)
    assert model_params(name) == sum(p.numel() for p in real.parameters())
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in real.parameters())


def test_bandwidth_initialisation_matches_the_reference():
    layer = build_attention("bilateral", 32, 4)
    reference = torch.logspace(0, math.log10(16), 4).log()  # 1 .. 16 grid steps, geometric (the earlier init)
    torch.testing.assert_close(layer.log_spatial_bandwidth.data, reference)
    torch.testing.assert_close(layer.log_range_bandwidth.exp().data, torch.full((4,), (4 * 8) ** 0.25))
    fixed = build_attention("gaussian", 32, 4, range_bandwidth=2.5, learn_bandwidth=False)
    torch.testing.assert_close(fixed.log_range_bandwidth.data, torch.full((4,), math.log(2.5)))
    assert not fixed.log_range_bandwidth.requires_grad


@pytest.mark.parametrize("option", ["range_bandwidth", "spatial_bandwidth"])
@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf, "wide"])
def test_bad_bandwidths_raise_clear_errors(option, value):
    with pytest.raises(ValueError, match=f"{option}: expected a positive bandwidth"):
        build_attention("bilateral", 16, 2, **{option: value})
