"""timm creation of every registered backbone, published CRATE sizes, timm/HF API surface."""
import pytest
import timm
import torch

import unrollattn
from unrollattn.vision.crate import PUBLISHED_PARAMS

VISION = unrollattn.list_models(task="classification")
SMALL = dict(num_classes=10, img_size=28, patch_size=4, in_chans=1)


def test_expected_names_registered_in_both_registries():
    expected = {f"aot_{a}_{s}_patch16_224" for a in ("mssa", "mhsa") for s in ("tiny", "small", "base")}
    expected |= {f"crate_{s}_patch16_224" for s in ("tiny", "small", "base", "large")}
    assert expected <= set(VISION)
    for name in expected:
        assert timm.is_model(name)
        assert name in timm.list_models(module=name.split("_")[0])


@pytest.mark.parametrize("name", VISION)
def test_create_every_registered_backbone(name):
    model = timm.create_model(name, **SMALL, depth=2)
    x = torch.randn(3, 1, 28, 28)
    logits = model(x)
    assert logits.shape == (3, 10)
    feats = model.forward_features(x)
    assert feats.shape == (3, 1 + 49, model.embed_dim)
    torch.testing.assert_close(model.forward_head(feats), logits)
    assert model.forward_head(feats, pre_logits=True).shape == (3, model.embed_dim)
    model.reset_classifier(4)
    assert model(x).shape == (3, 4)
    logits = model(x)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("size", list(PUBLISHED_PARAMS))
def test_crate_parameter_counts_match_published(size):
    with torch.device("meta"):
        model = timm.create_model(f"crate_{size}_patch16_224")
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PUBLISHED_PARAMS[size]) / PUBLISHED_PARAMS[size] < 0.02, count
    assert abs(count - PUBLISHED_PARAMS[size]) < 0.006e6  # in fact exact to the published rounding


def test_features_only():
    model = timm.create_model("crate_tiny_patch16_224", **SMALL, depth=3, features_only=True, out_indices=(0, 2))
    feats = model(torch.randn(2, 1, 28, 28))
    assert [f.shape for f in feats] == [torch.Size([2, 384, 7, 7])] * 2
    assert len(model.feature_info.channels()) == 2


def test_intermediates_and_block_types():
    model = timm.create_model("aot_mssa_tiny_patch16_224", **SMALL, depth=3)
    assert type(model.blocks[0]).__name__ == "AoTBlock"
    assert not isinstance(model.blocks[0].norm1, torch.nn.LayerNorm)  # vision AoT has no LN before MSSA
    final, inter = model.forward_intermediates(torch.randn(1, 1, 28, 28))
    assert len(inter) == 3 and final.shape[-1] == model.embed_dim


def test_attention_and_block_swap_by_name():
    model = timm.create_model("aot_mssa_tiny_patch16_224", **SMALL, depth=1, attention="mhsa",
                              block_options={"use_norm": True})
    assert isinstance(model.blocks[0].attn, unrollattn.get_attention("mhsa"))
    assert isinstance(model.blocks[0].norm1, torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="closest"):
        timm.create_model("crate_tiny_patch16_224", **SMALL, attention="mssaa")


def test_build_model_equals_timm():
    torch.manual_seed(0)
    a = unrollattn.build_model("crate_tiny_patch16_224", **SMALL, depth=1)
    torch.manual_seed(0)
    b = timm.create_model("crate_tiny_patch16_224", **SMALL, depth=1)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_bad_image_inputs():
    model = timm.create_model("crate_tiny_patch16_224", **SMALL, depth=1)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        model(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="28x28"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"float image tensor \[B, 1, H, W\] \(normalised"):
        model(torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\], got shape \[1, 28, 28\]"):
        model(torch.randn(1, 28, 28))


@pytest.mark.parametrize("name", ["crate_tiny_patch16_224", "aot_mssa_tiny_patch16_224", "aot_mhsa_tiny_patch16_224"])
@pytest.mark.parametrize("option,value", [("patch_size", 0), ("patch_size", (4, -1)), ("embed_dim", -8),
                                          ("num_heads", 0), ("img_size", 0), ("in_chans", "1")])
def test_bad_sizes_name_the_option(name, option, value):
    with pytest.raises(ValueError, match=f"{option}: expected an integer >= 1"):
        timm.create_model(name, **{**SMALL, option: value}, depth=1)


def test_ista_dictionary_initialised_by_timm_init():
    model = timm.create_model("crate_tiny_patch16_224", **SMALL, depth=2)
    weight = model.blocks[0].ista.weight
    assert torch.isfinite(weight).all() and weight.std() > 0


def test_hf_timm_wrapper():
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    config = TimmWrapperConfig(architecture="aot_mhsa_tiny_patch16_224", num_labels=10,
                               model_args=dict(img_size=28, patch_size=4, in_chans=1, depth=1))
    model = TimmWrapperForImageClassification(config)
    out = model(pixel_values=torch.randn(2, 1, 28, 28), labels=torch.tensor([1, 2]))
    assert out.logits.shape == (2, 10) and out.loss is not None


def test_normalized_patch_embed_matches_unfold_and_conv_weight_order():
    import torch.nn.functional as F

    embed = unrollattn.vision.NormalizedPatchEmbed(32, 8, 3, 16)
    x = torch.randn(2, 3, 32, 32)
    patches = F.unfold(x, 8, stride=8).transpose(1, 2)  # (c, kh, kw) order, as Conv2d weights flatten
    expected = embed.norm(F.linear(embed.patch_norm(patches), embed.proj.weight.flatten(1), embed.proj.bias))
    torch.testing.assert_close(embed(x), expected)
