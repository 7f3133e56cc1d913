"""Restoration baselines: interpolation, colour-demosaicing algorithms, the Swin transformer."""
import pytest
import torch

import unrollattn
from unrollattn.vision.restoration_baselines import (
    ClassicalDemosaic, Interpolator, SwinRestorer, colour_demosaicing_available,
)
from unrollattn.vision.sampling import BayerMosaic, Decimation2x

needs_colour = pytest.mark.skipif(not colour_demosaicing_available(),
                                  reason="pip install colour-demosaicing (install.sh does)")


def _smooth_rgb(h=24, w=28):
    r = torch.linspace(0, 1, h).view(h, 1)
    c = torch.linspace(0, 1, w).view(1, w)
    planes = [0.2 + 0.5 * r * c, 0.3 + 0.4 * r + 0 * c, 0.6 - 0.3 * c + 0 * r]
    return torch.stack(planes).unsqueeze(0).double()


@pytest.mark.parametrize("name", ["bilinear_demosaic", "bicubic_demosaic", "bilinear_sr2", "bicubic_sr2"])
def test_interpolators_have_no_parameters_and_keep_samples(name):
    model = unrollattn.build_model(name)
    assert isinstance(model, Interpolator) and sum(p.numel() for p in model.parameters()) == 0
    x = torch.rand(2, 3, 12, 16)
    y = model.operator(x)
    out = model(y)
    assert out.shape == x.shape and torch.equal(model.operator(out), y)


def test_bilinear_is_exact_on_linear_ramps():
    ramp = torch.stack([torch.linspace(0, 1, 28).expand(24, 28)] * 3).unsqueeze(0).double()
    out = Interpolator("sr2", "bilinear")(Decimation2x()(ramp))
    assert torch.allclose(out[..., :, :-1], ramp[..., :, :-1], atol=1e-12)  # interior of a ramp: exact


@needs_colour
@pytest.mark.parametrize("method", ["malvar2004", "menon2007"])
def test_classical_demosaicking(method):
    model = unrollattn.build_model(f"{method}_demosaic")
    assert sum(p.numel() for p in model.parameters()) == 0
    x = _smooth_rgb()
    out = model(BayerMosaic()(x))
    assert out.shape == x.shape and out.dtype == x.dtype
    err = (out - x)[..., 3:-3, 3:-3].abs().max()
    assert err < 0.02, err  # smooth image: accurate away from the borders
    assert (out - x).abs().max() > 0  # a real algorithm ran (not the ground truth passed through)


@needs_colour
def test_classical_rejects_x2_task():
    with pytest.raises(ValueError, match="demosaic"):
        ClassicalDemosaic("malvar2004", task="sr2")


def test_swin_size_and_training_step(observation):
    model = unrollattn.build_model("swin_demosaic")
    params = sum(p.numel() for p in model.parameters())
    assert 250_000 <= params <= 1_000_000, params  # a lightweight restoration transformer
    small = SwinRestorer("demosaic", embed_dim=16, depth=2, num_heads=2, window_size=4)
    x, y = observation("demosaic", h=10, w=14)  # not a multiple of the window: padded inside
    out = small(y)
    assert out.shape == x.shape and torch.equal(BayerMosaic()(out), y)
    # the head starts at zero: the untrained model is the bilinear initialisation
    assert torch.allclose(out, Interpolator("demosaic", "bilinear")(y), atol=1e-6)
    with torch.no_grad():
        small.head.weight.normal_(0, 0.01)
    (small(y) - x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in small.parameters())


def test_swin_x2_and_bad_inputs():
    model = SwinRestorer("sr2", embed_dim=16, depth=2, num_heads=2, window_size=4, in_chans=1)
    assert model(torch.rand(1, 1, 6, 5)).shape == (1, 1, 12, 10)
    with pytest.raises(ValueError, match="grayscale vs colour"):
        model(torch.rand(1, 3, 6, 6))
    with pytest.raises(ValueError, match="divisible"):
        SwinRestorer(embed_dim=10, num_heads=3)
