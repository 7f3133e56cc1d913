"""Attention masks: bool [.., Tq, Tk] (True = may attend) or additive float; the one mask -> bias function.

A cached decoding step has ``Tq`` new queries at the last positions of ``Tk`` keys (cached + new), so the causal
mask is the lower triangle shifted by ``Tk - Tq``.
"""
from __future__ import annotations

import torch


def offset_causal_mask(n_query: int, n_key: int, device=None) -> torch.Tensor:
    """Bool [Tq, Tk]: query i (absolute position n_key - n_query + i) sees the keys j <= its position."""
    return torch.ones(n_query, n_key, dtype=torch.bool, device=device).tril(n_key - n_query)


def additive_mask(attn_mask: torch.Tensor | None, is_causal: bool, n_query: int, n_key: int, device,
                  dtype) -> torch.Tensor | None:
    """The one additive attention bias: a bool (True = attend) or additive float ``attn_mask`` plus, with
    ``is_causal``, the causal mask with the queries at the last ``n_query`` of the ``n_key`` positions; None when
    neither is given (one causal query is the last position and sees every key: no bias)."""
    bias = None
    if is_causal and n_query > 1:
        bias = torch.zeros(n_query, n_key, device=device, dtype=dtype).masked_fill(
            ~offset_causal_mask(n_query, n_key, device), float("-inf"))
    if attn_mask is not None:
        extra = (torch.zeros(attn_mask.shape, device=device, dtype=dtype).masked_fill(~attn_mask, float("-inf"))
                 if attn_mask.dtype == torch.bool else attn_mask.to(dtype))
        bias = extra if bias is None else bias + extra
    return bias


def nonempty_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Let a query that may see no key (a padding token) see every key instead.

    Its output is never read by real tokens (they never attend to padding), while an empty row would give NaN
    that reaches them through 0 * NaN in the value average of the next layer.
    """
    return None if mask is None else mask | ~mask.any(dim=-1, keepdim=True)


def full_prefix_mask(mask: torch.Tensor | None, n_key: int, device=None) -> torch.Tensor | None:
    """Bool [B, 1, Tk, Tk] causal + key-padding mask of the whole prefix, rebuilt from the new queries' mask.

    ``mask`` [B, 1, Tq, Tk] is causal & key-is-a-token (before ``nonempty_rows``): a key is a token exactly when
    some new query attends to it. None (plain causal, no padding) stays None.
    """
    if mask is None:
        return None
    keys_valid = mask.to(torch.bool).any(dim=-2, keepdim=True)
    return nonempty_rows(offset_causal_mask(n_key, n_key, device) & keys_valid)


def as_bool_mask(mask: torch.Tensor | None, n_key: int | None = None) -> torch.Tensor | None:
    """An HF 4-D mask (bool, or additive float with -inf / dtype-min for masked) as bool [B, 1, Tq, Tk].

    ``n_key`` keeps the first ``n_key`` key columns: a fixed-size cache's mask spans its whole buffer, of which
    only the filled slots are keys.
    """
    if mask is None:
        return None
    if mask.ndim != 4:
        raise ValueError(f"attention_mask: expected a 4-D mask [B, 1, Tq, Tk], got shape {list(mask.shape)}")
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    if n_key is not None:
        if mask.shape[-1] < n_key:
            raise ValueError(f"attention_mask: covers {mask.shape[-1]} keys, expected at least {n_key} (cached + new)")
        mask = mask[..., :n_key]
    return mask


__all__ = ["additive_mask", "as_bool_mask", "full_prefix_mask", "nonempty_rows", "offset_causal_mask"]
