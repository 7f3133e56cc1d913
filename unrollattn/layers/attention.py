"""Attention layers: the softmax baseline (``mhsa``) and multi-head subspace self-attention (``mssa``).

Every class follows one contract, so it can be handed to ``timm.create_model(..., attn_layer=cls)``::

    layer = cls(dim, num_heads=8, *, qkv_bias=False, attn_drop=0., proj_drop=0., **options)
    y = layer(x, attn_mask=None, is_causal=False)          # x, y: [B, N, C]
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.subspace import NONLINEARITIES, merge_heads, split_heads, subspace_self_attention
from ..core.validation import check_heads, check_mask, check_tokens
from ..registry import register_attention
from .base import Configurable


class AttentionLayer(Configurable, metaclass=ABCMeta):
    """Common constructor: width, heads, dropout, device/dtype; timm's extra keywords are ignored."""

    option_names: tuple[str, ...] = ()

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, proj_bias: bool = True, head_dim: int | None = None,
                 device=None, dtype=None, **options):
        super().__init__()
        options = {**self.bound_options, **options}
        own = {k: options.pop(k) for k in list(options) if k in self.option_names}
        self._drop_passthrough(type(self).__name__, options, set(self.option_names))
        self.dim = int(dim)
        self.num_heads = int(num_heads)
        self.head_dim = check_heads(self.dim, self.num_heads, head_dim)
        self.inner_dim = self.num_heads * self.head_dim
        self.qkv_bias, self.proj_bias = qkv_bias, proj_bias
        self.attn_drop_p = float(attn_drop)
        self.factory = {"device": device, "dtype": dtype}
        self.proj_drop = nn.Dropout(proj_drop)
        self.options = own
        self.grid: tuple[int, int] | None = None
        self.num_prefix_tokens = 0

    def set_geometry(self, grid: tuple[int, int] | None = None, num_prefix_tokens: int = 0) -> None:
        """Token layout for variants that need it: a (H, W) patch grid after ``num_prefix_tokens`` (cls, registers)."""
        if grid is not None and (len(grid) != 2 or min(grid) < 1):
            raise ValueError(f"grid: expected (H, W) with positive sizes, got {grid!r}")
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.num_prefix_tokens = int(num_prefix_tokens)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False, *,
                grid: tuple[int, int] | None = None) -> torch.Tensor:
        check_tokens(x, self.dim)
        check_mask(attn_mask, x.shape[0], self.num_heads, x.shape[1], x.shape[1])
        return self.proj_drop(self.attend(x, attn_mask, is_causal, grid or self.grid))

    @abstractmethod
    def attend(self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
               grid: tuple[int, int] | None) -> torch.Tensor:
        """Mix tokens; ``grid`` is the (H, W) patch layout when known (None for sequences)."""

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}{opts}"


@register_attention("mhsa", params_per_layer="4 d^2", summary="softmax(QK^T/sqrt(p))V with separate W_Q, W_K, W_V (SDPA)")
class MultiHeadSelfAttention(AttentionLayer):
    """The softmax baseline: separate query, key and value projections, fused SDPA kernel."""

    def __init__(self, dim, num_heads=8, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.qkv = nn.Linear(self.dim, 3 * self.inner_dim, bias=self.qkv_bias, **self.factory)
        self.proj = nn.Linear(self.inner_dim, self.dim, bias=self.proj_bias, **self.factory)

    def attend(self, x, attn_mask, is_causal, grid=None):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if attn_mask is not None and is_causal:
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            attn_mask = (attn_mask & causal) if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~causal, float("-inf"))
            is_causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                             dropout_p=self.attn_drop_p if self.training else 0.0)
        return self.proj(merge_heads(out))


@register_attention("mssa", params_per_layer="2 d^2 (1 d^2 with tied_output)",
                    summary="per head Q = K = V = U_k^T z (AoT / CRATE subspace self-attention)")
class MultiHeadSubspaceSelfAttention(AttentionLayer):
    """MSSA (docs/papers.md B.2-B.3): one shared projection U^T per head used as query, key and value.

    Options: ``nonlinearity`` in {softmax, relu, thresholded_softmax}; ``threshold`` tau for the
    thresholded softmax; ``scale`` (default 1/sqrt(p)); ``tied_output`` uses [U_1, ..., U_K] as the
    output map instead of a separate U_out (then ``step_size`` eta scales the update).
    """

    option_names = ("nonlinearity", "threshold", "scale", "tied_output", "step_size")

    def __init__(self, dim, num_heads=8, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.nonlinearity = self.options.get("nonlinearity", "softmax")
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity: expected one of {NONLINEARITIES}, got {self.nonlinearity!r}")
        self.threshold = self.options.get("threshold")
        self.scale = self.options.get("scale")
        self.tied_output = bool(self.options.get("tied_output", False))
        self.step_size = float(self.options.get("step_size", 1.0))
        self.subspace = nn.Linear(self.dim, self.inner_dim, bias=self.qkv_bias, **self.factory)  # U^T
        self.proj = None if self.tied_output else nn.Linear(self.inner_dim, self.dim, bias=self.proj_bias, **self.factory)

    def attend(self, x, attn_mask, is_causal, grid=None):
        heads = subspace_self_attention(
            x, self.subspace.weight, self.num_heads, subspace_bias=self.subspace.bias, attn_mask=attn_mask,
            is_causal=is_causal, scale=self.scale, dropout_p=self.attn_drop_p if self.training else 0.0,
            nonlinearity=self.nonlinearity, threshold=self.threshold)
        if self.tied_output:
            return self.step_size * F.linear(heads, self.subspace.weight.t())
        return self.proj(heads)


__all__ = ["AttentionLayer", "MultiHeadSelfAttention", "MultiHeadSubspaceSelfAttention", "split_heads"]
