"""Incremental decoding storage shared by the layers and blocks (docs/integration.md 2.7, 3.1).

Every layer and block has ``decode(x, cache, layer_idx, attn_mask=None) -> [B, Tq, C]``: ``x`` holds the new tokens
only, ``cache`` is an HF ``Cache`` used as plain storage (``update`` and ``get_seq_length`` only, so a growing
``DynamicCache`` and a fixed-size ``StaticCache`` both work), ``attn_mask`` is bool [B, 1, Tq, Tk] = causal &
key-is-a-token over the Tk = cached + new keys (True = attend; a padded query may have an empty row), or None
for plain causal attention with the new queries at the last Tq positions. The layer decides what it stores.

Layers that cannot extend their output from stored keys alone (a smoother applied twice, a graph filter) store
their *inputs* and recompute over the prefix (:func:`decode_by_recompute`, O(T^2) per new token); their class says
so with ``decode_recomputes_prefix = True``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..core.masks import full_prefix_mask


def append_to_cache(cache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Append [B, H, Tq, *] ``keys`` / ``values`` at ``layer_idx``; return every stored key/value [B, H, Tk, *].

    ``values=None`` stores a zero-width value (for layers whose values are their keys). A fixed-size cache returns
    its whole buffer: only the Tk = cached + new filled slots are returned.
    """
    if not hasattr(cache, "update") or not hasattr(cache, "get_seq_length"):
        raise ValueError(f"cache: expected a transformers Cache (DynamicCache, StaticCache, ...), got {type(cache).__name__}")
    past = int(cache.get_seq_length(layer_idx))
    all_keys, all_values = cache.update(keys, keys[..., :0] if values is None else values, layer_idx)
    total = past + keys.shape[-2]
    if all_keys.shape[-2] < total:
        raise ValueError(f"{type(cache).__name__} kept {all_keys.shape[-2]} of {total} tokens at layer {layer_idx}: "
                         "unrollattn layers need every past token (no sliding-window or cropping cache)")
    if all_keys.shape[-2] == total:  # a growing cache returns exactly the filled slots
        return all_keys, all_values
    return all_keys[..., :total, :], all_values[..., :total, :]


def cached_prefix(cache, layer_idx: int, x: torch.Tensor, attn_mask: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Store the new inputs ``x`` [B, Tq, C]; return the whole input prefix [B, Tk, C] and its causal mask."""
    inputs, _ = append_to_cache(cache, layer_idx, x[:, None])
    prefix = inputs[:, 0]
    return prefix, full_prefix_mask(attn_mask, prefix.shape[1], x.device)


def decode_by_recompute(module: nn.Module, x: torch.Tensor, cache, layer_idx: int,
                        attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Decode with any causal ``module(x, attn_mask=, is_causal=True)``: store its inputs, rerun it over the prefix
    and keep the new positions (O(T^2) per new token; exact, as the module is causal)."""
    prefix, prefix_mask = cached_prefix(cache, layer_idx, x, attn_mask)
    return module(prefix, attn_mask=prefix_mask, is_causal=True)[:, -x.shape[1]:]


__all__ = ["append_to_cache", "cached_prefix", "decode_by_recompute"]
