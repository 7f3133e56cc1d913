"""Sampling operators of the interpolation problems (unrollattn.vision.sampling)."""
import pytest
import torch
import torch.nn.functional as F

from unrollattn.vision.sampling import BayerMosaic, Decimation2x, build_operator, crop_to, pad_to_even


def test_rggb_mask_pattern():
    m = BayerMosaic("RGGB").observed_mask(4, 6)[0].int()
    assert m.shape == (3, 4, 6)
    assert torch.equal(m.sum(0), torch.ones(4, 6, dtype=torch.int32))  # exactly one colour per pixel
    assert m[0, 0, 0] == 1 and m[1, 0, 1] == 1 and m[1, 1, 0] == 1 and m[2, 1, 1] == 1
    assert m[0].sum() == 6 and m[1].sum() == 12 and m[2].sum() == 6  # R 1/4, G 1/2, B 1/4
    assert torch.equal(m[:, :2, :2], m[:, 2:, 4:])  # 2x2 periodic


@pytest.mark.parametrize("pattern", ["BGGR", "GRBG", "GBRG"])
def test_other_patterns(pattern):
    m = BayerMosaic(pattern).observed_mask(2, 2)[0]
    colour = {"R": 0, "G": 1, "B": 2}
    for pos, ch in enumerate(pattern):
        assert m[colour[ch], pos // 2, pos % 2]


def test_mosaic_values_and_adjoint():
    op = BayerMosaic()
    x = torch.rand(2, 3, 6, 8, dtype=torch.float64)
    y = op(x)
    assert y.shape == (2, 1, 6, 8)
    assert y[0, 0, 0, 0] == x[0, 0, 0, 0] and y[0, 0, 0, 1] == x[0, 1, 0, 1] and y[0, 0, 1, 1] == x[0, 2, 1, 1]
    v = torch.randn_like(y)
    assert torch.allclose((op(x) * v).sum(), (x * op.adjoint(v)).sum(), atol=1e-12)  # <Hx, v> = <x, Hᵀv>
    assert torch.equal(op(op.adjoint(y)), y)  # H Hᵀ = I for a selection


def test_decimation_grid_and_adjoint():
    op = Decimation2x()
    x = torch.rand(1, 3, 8, 6, dtype=torch.float64)
    y = op(x)
    assert y.shape == (1, 3, 4, 3) and torch.equal(y, x[..., ::2, ::2])
    m = op.observed_mask(8, 6)
    assert m.shape == (1, 1, 8, 6) and m.sum() == 12 and m[0, 0, 0, 0] and not m[0, 0, 0, 1] and not m[0, 0, 1, 0]
    v = torch.randn_like(y)
    assert torch.allclose((op(x) * v).sum(), (x * op.adjoint(v)).sum(), atol=1e-12)
    assert torch.equal(op.adjoint(y) * m, op.adjoint(y))


@pytest.mark.parametrize("task", ["demosaic", "sr2"])
@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_interpolation_keeps_samples_and_constants(task, method):
    op = build_operator(task)
    x = torch.rand(2, 3, 10, 12, dtype=torch.float64)
    y = op(x)
    out = op.interpolate(y, method)
    assert out.shape == x.shape and torch.equal(op(out), y)
    const = torch.full((1, 3, 10, 12), 0.37, dtype=torch.float64)
    assert torch.allclose(op.interpolate(op(const), method), const, atol=1e-12)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_x2_interpolation_matches_torch_interpolate(method):
    lr = torch.rand(1, 2, 7, 9, dtype=torch.float64)
    ours = Decimation2x().interpolate(lr, method)
    ref = F.interpolate(lr, size=(13, 17), mode=method, align_corners=True)
    inner = slice(3, -3)  # away from the borders, where torch clamps and we reflect
    assert torch.allclose(ours[..., :13, :17][..., inner, inner], ref[..., inner, inner], atol=1e-12)
    if method == "bilinear":
        assert torch.allclose(ours[..., :13, :17], ref, atol=1e-12)


def test_bilinear_demosaic_is_the_neighbour_mean():
    op = BayerMosaic()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    out = op.interpolate(op(x), "bilinear")
    # G at the R site (2, 2) is the mean of its 4 G neighbours; R at the B site (3, 3) the mean of 4 diagonal Rs
    assert torch.isclose(out[0, 1, 2, 2], (x[0, 1, 1, 2] + x[0, 1, 3, 2] + x[0, 1, 2, 1] + x[0, 1, 2, 3]) / 4)
    assert torch.isclose(out[0, 0, 3, 3], (x[0, 0, 2, 2] + x[0, 0, 2, 4] + x[0, 0, 4, 2] + x[0, 0, 4, 4]) / 4)


def test_odd_sizes_bayer_accepted_decimation_rejected():
    x = torch.rand(1, 3, 7, 9)
    bayer = BayerMosaic()
    assert torch.equal(bayer.observed_mask(7, 9), bayer.observed_mask(8, 10)[..., :7, :9])
    assert bayer.interpolate(bayer(x)).shape == (1, 3, 7, 9)
    with pytest.raises(ValueError, match="even H and W.*pad_to_even"):
        Decimation2x()(x)
    padded, size = pad_to_even(x)
    assert padded.shape == (1, 3, 8, 10) and size == (7, 9)
    assert torch.equal(crop_to(padded, size), x)
    out = Decimation2x().interpolate(Decimation2x()(padded))
    assert crop_to(out, size).shape == x.shape


def test_bad_inputs():
    bayer, dec = BayerMosaic(), Decimation2x()
    with pytest.raises(ValueError, match="3 channels"):
        bayer(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="1 channel"):
        bayer.check_observation(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        bad = torch.rand(1, 1, 8, 8)
        bad[0, 0, 3, 3] = float("nan")
        bayer.interpolate(bad)
    with pytest.raises(ValueError, match="too small"):
        dec.interpolate(torch.rand(1, 3, 1, 1), "bicubic")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]|float image"):
        dec(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="pattern"):
        BayerMosaic("RGBG")
    with pytest.raises(ValueError, match="method"):
        bayer.interpolate(torch.rand(1, 1, 8, 8), "nearest")
    with pytest.raises(ValueError, match="task"):
        build_operator("sr4")
