"""Parity of the fast MSSA / ISTA paths with the slow references (values and gradients, float64)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

from unrollattn.core.reference import ista_reference, mssa_reference
from unrollattn.core.subspace import attention_weights, ista_step, mssa, subspace_self_attention

D, H, N, B = 12, 3, 6, 2


def _inputs(tied=False, bias=True):
    x = torch.randn(B, N, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(D, D, dtype=torch.float64, requires_grad=True)  # [K*p, d]
    ow = None if tied else torch.randn(D, D, dtype=torch.float64, requires_grad=True)
    ob = torch.randn(D, dtype=torch.float64, requires_grad=True) if bias else None
    return x, w, ow, ob


def _grads(out, tensors):
    return torch.autograd.grad(out.square().sum(), [t for t in tensors if t is not None])


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("is_causal", [False, True])
def test_mssa_matches_reference(tied, is_causal):
    x, w, ow, ob = _inputs(tied)
    fast = mssa(x, w, H, ow, ob, is_causal=is_causal)
    slow = mssa_reference(x, w, H, ow, ob, is_causal=is_causal)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    for g_fast, g_slow in zip(_grads(fast, (x, w, ow, ob)), _grads(slow, (x, w, ow, ob))):
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-9, atol=1e-9)


def test_mssa_bool_mask_and_causal_combined():
    x, w, ow, ob = _inputs()
    mask = torch.rand(B, 1, N, N) > 0.3
    mask[..., 0] = True  # every query keeps at least one key
    fast = mssa(x, w, H, ow, ob, attn_mask=mask, is_causal=True)
    slow = mssa_reference(x, w, H, ow, ob, attn_mask=mask, is_causal=True)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)


def test_causal_mssa_ignores_future_tokens():
    x, w, ow, ob = _inputs()
    out = mssa(x, w, H, ow, ob, is_causal=True)
    x2 = x.detach().clone()
    x2[:, -2:] += 5.0
    out2 = mssa(x2, w, H, ow, ob, is_causal=True)
    torch.testing.assert_close(out[:, :-2], out2[:, :-2])
    assert not torch.allclose(out[:, -2:], out2[:, -2:])


def test_query_key_value_are_tied():
    """One projection U^T z serves as query, key and value: SDPA with three copies gives the same."""
    x, w, _, _ = _inputs()
    heads = subspace_self_attention(x, w, H)
    coords = (x @ w.t()).view(B, N, H, D // H).transpose(1, 2)
    expected = torch.nn.functional.scaled_dot_product_attention(coords, coords.clone(), coords.clone())
    torch.testing.assert_close(heads, expected.transpose(1, 2).reshape(B, N, D))


def test_mssa_gradcheck():
    x, w, ow, ob = _inputs()
    assert gradcheck(lambda a, b, c, d: mssa(a, b, H, c, d, is_causal=True), (x, w, ow, ob))


def test_relu_and_thresholded_nonlinearities():
    scores = torch.tensor([[0.0, 2.0, -1.0], [3.0, float("-inf"), -2.0]], dtype=torch.float64)
    relu = attention_weights(scores, "relu")
    torch.testing.assert_close(relu, torch.tensor([[0.0, 2 / 3, 0.0], [1.5, 0.0, 0.0]], dtype=torch.float64))
    thr = attention_weights(scores, "thresholded_softmax", threshold=0.6)
    probs = scores.softmax(-1)
    torch.testing.assert_close(thr, 0.6 * (probs > 0.6).double())
    with pytest.raises(ValueError, match="threshold"):
        attention_weights(scores, "thresholded_softmax")
    with pytest.raises(ValueError, match="nonlinearity"):
        attention_weights(scores, "sigmoid")


def test_ista_matches_reference_and_crate_form():
    z = torch.randn(B, N, D, dtype=torch.float64, requires_grad=True)
    dic = torch.randn(D, D, dtype=torch.float64, requires_grad=True)
    fast, slow = ista_step(z, dic, 0.1, 0.1), ista_reference(z, dic, 0.1, 0.1)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    for g_fast, g_slow in zip(_grads(fast, (z, dic)), _grads(slow, (z, dic))):
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-10, atol=1e-10)
    assert (fast >= 0).all()


def test_ista_is_a_proximal_step_towards_sparse_codes():
    """With D = I the gradient term vanishes: the step is a shifted ReLU, z -> relu(z - eta*lambda)."""
    z = torch.randn(4, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(ista_step(z, torch.eye(8, dtype=torch.float64), 0.5, 0.2), torch.relu(z - 0.1))


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 7), heads=st.sampled_from([1, 2, 4]), p=st.integers(1, 4), causal=st.booleans())
def test_mssa_parity_property(n, heads, p, causal):
    d = heads * p
    x = torch.randn(1, n, d, dtype=torch.float64)
    w = torch.randn(d, d, dtype=torch.float64)
    torch.testing.assert_close(mssa(x, w, heads, is_causal=causal), mssa_reference(x, w, heads, is_causal=causal),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n_key", [1, 7])
def test_one_causal_query_sees_every_key(n_key):
    """A decoding step (one query, the last position) under is_causal builds no mask and equals the explicit
    offset-causal reference in values and gradients; SDPA's own is_causal would align it with key 0 instead."""
    from unrollattn.core.masks import additive_mask, offset_causal_mask
    from unrollattn.core.subspace import causal_sdpa

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, t, 4, dtype=torch.float64, requires_grad=True) for t in (1, n_key, n_key))
    assert additive_mask(None, True, 1, n_key, None, torch.float64) is None
    out = causal_sdpa(q, k, v, is_causal=True)
    keep = offset_causal_mask(1, n_key)
    scores = (q @ k.transpose(-2, -1) / 2.0).masked_fill(~keep, float("-inf"))
    reference = scores.softmax(-1) @ v
    torch.testing.assert_close(out, reference)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    torch.testing.assert_close(grads, torch.autograd.grad(reference.square().sum(), (q, k, v)))
