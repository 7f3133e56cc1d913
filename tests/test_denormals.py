"""Subnormal floats flushed to zero on CPU (unrollattn/utils/denormals.py): the setting, its restoration, and that
kernel attention's results do not move with it."""
import pytest
import torch

from unrollattn.core.kernel import SpatialKernel, kernel_attention, token_positions
from unrollattn.utils.denormals import flush_denormals, set_flush_denormals

SUBNORMAL = 1e-320  # float64: below 2.2e-308

if not torch.set_flush_denormal(False):
    pytest.skip("this CPU has no flush-to-zero mode", allow_module_level=True)


def subnormals_survive() -> bool:
    return bool(torch.tensor([SUBNORMAL], dtype=torch.float64).mul(1.0).item() != 0)


def test_flush_denormals_flushes_inside_and_restores_after():
    assert subnormals_survive()
    with flush_denormals():
        assert not subnormals_survive()
        with flush_denormals(False):
            assert subnormals_survive()
        assert not subnormals_survive()
    assert subnormals_survive()


def test_set_flush_denormals_returns_the_previous_setting():
    try:
        assert set_flush_denormals(True) is False
        assert set_flush_denormals(True) is True
    finally:
        set_flush_denormals(False)
    assert subnormals_survive()


def test_fit_and_the_command_leave_subnormals_as_they_found_them(tmp_path):
    from unrollattn.cli import main

    assert main(["train", "classify", "--preset", "digits_debug", f"loop.out_dir={tmp_path}", "loop.max_steps=2",
                 "loop.eval_every=0", "data.max_test=64"]) == 0
    assert subnormals_survive()


def test_bilateral_attention_is_the_same_with_subnormals_flushed():
    """A Gaussian spatial kernel on a 16 x 16 grid puts many weights below 1e-38 (the slow subnormal range in
    float32): flushing them moves outputs and gradients by float32 rounding only."""
    torch.manual_seed(0)
    n, heads = 256, 2
    q, k, v = (torch.randn(1, heads, n, 16, requires_grad=True) for _ in range(3))
    h_p = torch.tensor([1.0, 0.5], requires_grad=True)
    pos = token_positions(n, (16, 16))

    def run():
        out = kernel_attention(q, k, v, "bilateral", spatial_bias=SpatialKernel(pos, pos, h_p))
        return (out, *torch.autograd.grad(out.square().sum(), (q, k, v, h_p)))

    kept = run()
    with flush_denormals():
        flushed = run()
    for a, b in zip(kept, flushed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
