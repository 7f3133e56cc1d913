"""Attention layers: the softmax baseline (``mhsa``) and multi-head subspace self-attention (``mssa``).

Every class follows one contract, so it can be handed to ``timm.create_model(..., attn_layer=cls)``::

    layer = cls(dim, num_heads=8, *, qkv_bias=False, attn_drop=0., proj_drop=0., **options)
    y = layer(x, attn_mask=None, is_causal=False)          # x, y: [B, N, C]
    y_new = layer.decode(x_new, cache, layer_idx, attn_mask=None)   # cached causal decoding (layers/decoding.py)
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.masks import nonempty_rows
from ..core.subspace import NONLINEARITIES, causal_sdpa, merge_heads, score_weights, split_heads, tied_attention
from ..core.validation import check_heads, check_mask, check_tokens
from ..registry import register_attention
from .base import Configurable, RecordsAttention
from .decoding import append_to_cache, decode_by_recompute


class AttentionLayer(Configurable, RecordsAttention, metaclass=ABCMeta):
    """Common constructor: width, heads, dropout, device/dtype; timm's extra keywords are ignored.

    With ``record_attention`` set, ``forward`` records its attention weights (``RecordsAttention``): ``weights``
    [B, H, N, N] for the dense layers, the learned graph for ``glr`` / ``gtv``.

    ``decode`` (cached causal decoding of new tokens) defaults to storing the inputs and recomputing the layer over
    the prefix; a layer that extends its output from stored keys/values overrides it and sets
    ``decode_recomputes_prefix = False``.
    """

    option_names: tuple[str, ...] = ()
    decode_recomputes_prefix: bool = True
    encodes_position: bool = False  # True: the layer models token positions itself (models add no position embedding)

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
        check_tokens(x, self.dim, dtype=self.param_dtype)
        check_mask(attn_mask, x.shape[0], self.num_heads, x.shape[1], x.shape[1])
        return self.proj_drop(self.attend(x, attn_mask, is_causal, grid or self.grid))

    def decode(self, x: torch.Tensor, cache, layer_idx: int, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal output [B, Tq, C] of the new tokens ``x`` given what ``cache`` (an HF ``Cache``) holds for
        ``layer_idx``, which this call extends. ``attn_mask``: bool [B, 1, Tq, Tk] = causal & key-is-a-token over
        the cached + new keys, or None (plain causal). See ``unrollattn.layers.decoding``."""
        check_tokens(x, self.dim, dtype=self.param_dtype)
        step = getattr(self, "decode_step", None)  # (x, cache, layer_idx, mask without empty rows) -> token mixing
        if self.decode_recomputes_prefix or step is None:
            return decode_by_recompute(self, x, cache, layer_idx, attn_mask)
        mixed = step(x, cache, layer_idx, nonempty_rows(attn_mask))
        return self.proj_drop(mixed) if self.training else mixed  # eval: no module call per layer and token

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values [B, H, N, p] from the fused ``self.qkv`` map (layers that have one)."""
        b, n, _ = x.shape
        return self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # a subclass that changes the token mixing but not the cached step falls back to the exact recomputation
        if "attend" in cls.__dict__ and "decode_step" not in cls.__dict__ and "decode_recomputes_prefix" not in cls.__dict__:
            cls.decode_recomputes_prefix = True

    @property
    def attn_dropout(self) -> float:
        return self.attn_drop_p if self.training else 0.0

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

    decode_recomputes_prefix = False  # caches per-head keys and values: O(T d) per new token

    @torch.no_grad()
    def load_projections(self, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None, proj_weight: torch.Tensor,
                         proj_bias: torch.Tensor | None) -> None:
        """Copy fused [W_Q; W_K; W_V] [3 H p, d] and output [d, H p] maps (nn.Linear layout) from another model."""
        for linear, weight, bias in ((self.qkv, qkv_weight, qkv_bias), (self.proj, proj_weight, proj_bias)):
            if tuple(weight.shape) != tuple(linear.weight.shape) or (bias is None) != (linear.bias is None):
                raise ValueError(f"load_projections: expected weight {list(linear.weight.shape)} and "
                                 f"{'a' if linear.bias is not None else 'no'} bias, got {list(weight.shape)}, "
                                 f"{'no bias' if bias is None else 'a bias'}")
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)

    def attend(self, x, attn_mask, is_causal, grid=None):
        q, k, v = self.project_qkv(x)
        if self.record_attention:  # out = weights @ v per head
            self.record(weights=score_weights(q, k, attn_mask=attn_mask, is_causal=is_causal))
        return self.proj(merge_heads(causal_sdpa(q, k, v, attn_mask, is_causal, dropout_p=self.attn_dropout)))

    def decode_step(self, x, cache, layer_idx, attn_mask):
        q, k, v = self.project_qkv(x)
        k, v = append_to_cache(cache, layer_idx, k, v)
        return self.proj(merge_heads(causal_sdpa(q, k, v, attn_mask, attn_mask is None, dropout_p=self.attn_dropout)))


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

    decode_recomputes_prefix = False  # caches U_k^T z once (keys = values): d numbers per token, O(T d) per new token

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """U_k^T z per head [B, H, N, p] (B.2)."""
        return split_heads(F.linear(x, self.subspace.weight, self.subspace.bias), self.num_heads)

    def mix(self, queries: torch.Tensor, keys: torch.Tensor, attn_mask, is_causal: bool) -> torch.Tensor:
        """SA(U^T z_i, U^T Z, U^T Z) per head, then the output map: U_out, or [U_1, ..., U_K] scaled by eta (B.2)."""
        heads = merge_heads(tied_attention(queries, keys, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                                           dropout_p=self.attn_dropout, nonlinearity=self.nonlinearity,
                                           threshold=self.threshold))
        if self.tied_output:
            return self.step_size * F.linear(heads, self.subspace.weight.t())
        return self.proj(heads)

    def attend(self, x, attn_mask, is_causal, grid=None):
        heads = self.project(x)
        if self.record_attention:  # SA_k = weights @ (U_k^T Z)
            self.record(weights=score_weights(heads, heads, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                                              nonlinearity=self.nonlinearity, threshold=self.threshold))
        return self.mix(heads, heads, attn_mask, is_causal)

    def decode_step(self, x, cache, layer_idx, attn_mask):
        heads = self.project(x)
        keys, _ = append_to_cache(cache, layer_idx, heads)
        return self.mix(heads, keys, attn_mask, attn_mask is None)


__all__ = ["AttentionLayer", "MultiHeadSelfAttention", "MultiHeadSubspaceSelfAttention", "split_heads"]
