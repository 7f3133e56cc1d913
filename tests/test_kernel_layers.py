"""Kernel attention layers built in float64 keep every parameter (bandwidths, metric) and their output in float64."""
import pytest
import torch

from unrollattn import get_attention

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
