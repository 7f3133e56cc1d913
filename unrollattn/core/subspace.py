"""Subspace denoising operators (docs/papers.md, family B): MSSA and the CRATE ISTA step.

Tokens are rows: ``x`` is [B, N, d]. A weight ``subspace_weight`` of shape [K*p, d] stacks the
transposed bases U_1^T, ..., U_K^T, so ``x @ subspace_weight.T`` gives U_k^T z for every head k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import additive_mask

NONLINEARITIES = ("softmax", "relu", "thresholded_softmax")


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, N, H*p] -> [B, H, N, p]."""
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, p] -> [B, N, H*p]."""
    b, h, n, p = x.shape
    return x.transpose(1, 2).reshape(b, n, h * p)


def attention_weights(scores: torch.Tensor, nonlinearity: str = "softmax", threshold: float | None = None) -> torch.Tensor:
    """phi(scores) over the key axis; masked entries of ``scores`` are -inf."""
    if nonlinearity == "softmax":
        return scores.softmax(dim=-1)
    if nonlinearity == "thresholded_softmax":  # phi = h(softmax), h(x) = tau * 1{x > tau} (SNR theorem, B.4)
        if threshold is None:
            raise ValueError("nonlinearity='thresholded_softmax' needs threshold=tau in (1/2, 1]")
        probs = scores.softmax(dim=-1)
        return threshold * (probs > threshold).to(probs.dtype)
    if nonlinearity == "relu":  # ReLU(scores) averaged over the keys a query may see
        visible = torch.isfinite(scores)
        weights = torch.where(visible, scores, torch.zeros_like(scores)).relu()
        return weights / visible.sum(dim=-1, keepdim=True).clamp_min(1).to(scores.dtype)
    raise ValueError(f"unknown nonlinearity {nonlinearity!r}; expected one of {NONLINEARITIES}")


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, *, dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """SDPA whose causal flag aligns the Tq queries with the *last* Tq of the Tk keys (cached decoding), and which
    combines a causal flag with an explicit mask (SDPA itself accepts only one of them)."""
    n_query, n_key = q.shape[-2], k.shape[-2]
    if is_causal and n_query == 1:  # the one query is the last position (a decoding step): it sees every key
        is_causal = False
    elif is_causal and (attn_mask is not None or n_query != n_key):
        attn_mask, is_causal = additive_mask(attn_mask, True, n_query, n_key, q.device, q.dtype), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale)


def score_weights(queries: torch.Tensor, keys: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                  is_causal: bool = False, scale: float | None = None, nonlinearity: str = "softmax",
                  threshold: float | None = None) -> torch.Tensor:
    """The explicit weights phi(q_i . k_j * scale + m_ij) [B, H, Tq, Tk] that :func:`causal_sdpa` (softmax) and
    :func:`tied_attention` average the values with; ``scale`` defaults to 1/sqrt(p), causal aligned as there."""
    scale = queries.shape[-1] ** -0.5 if scale is None else scale
    scores = queries @ keys.transpose(-2, -1) * scale
    bias = additive_mask(attn_mask, is_causal, queries.shape[-2], keys.shape[-2], queries.device, scores.dtype)
    if bias is not None:
        scores = scores + bias
    return attention_weights(scores, nonlinearity, threshold)


def tied_attention(queries: torch.Tensor, keys: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                   is_causal: bool = False, scale: float | None = None, dropout_p: float = 0.0,
                   nonlinearity: str = "softmax", threshold: float | None = None) -> torch.Tensor:
    """phi(U^T z_i . U^T z_j) U^T z_j per head with the keys as values (B.2-B.3): [B, H, Tq, p] x [B, H, Tk, p]."""
    if nonlinearity == "softmax":
        return causal_sdpa(queries, keys, keys, attn_mask, is_causal, dropout_p=dropout_p, scale=scale)
    weights = score_weights(queries, keys, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                            nonlinearity=nonlinearity, threshold=threshold)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return weights @ keys


def subspace_self_attention(
    x: torch.Tensor,
    subspace_weight: torch.Tensor,
    num_heads: int,
    *,
    subspace_bias: torch.Tensor | None = None,
    **attention_options,
) -> torch.Tensor:
    """Per head SA(U_k^T z, U_k^T z, U_k^T z) with tied query = key = value; returns heads concatenated [B, N, K*p].

    ``attention_options``: those of :func:`tied_attention` (mask, causal flag, scale, dropout, nonlinearity)."""
    heads = split_heads(F.linear(x, subspace_weight, subspace_bias), num_heads)  # U_k^T Z (B.2)
    return merge_heads(tied_attention(heads, heads, **attention_options))


def mssa(
    x: torch.Tensor,
    subspace_weight: torch.Tensor,
    num_heads: int,
    out_weight: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
    **attention_options,
) -> torch.Tensor:
    """MSSA(Z) = U_out [SA(U_1^T Z); ...; SA(U_K^T Z)] + b (B.3); ``out_weight=None`` ties U_out = [U_1, ..., U_K] (B.2)."""
    heads = subspace_self_attention(x, subspace_weight, num_heads, **attention_options)
    return F.linear(heads, subspace_weight.t() if out_weight is None else out_weight, out_bias)


def ista_step(z: torch.Tensor, dictionary: torch.Tensor, step_size: float = 0.1, lambd: float = 0.1) -> torch.Tensor:
    """One proximal step ReLU(z - eta D^T (D z - z) - eta lambda) on tokens in rows (B.5)."""
    residual = F.linear(z, dictionary) - z  # (D z - z) for each token
    return F.relu(z - step_size * F.linear(residual, dictionary.t()) - step_size * lambd)
