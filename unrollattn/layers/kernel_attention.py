"""Kernel-regression attention layers (docs/papers.md family C): ``gaussian``, ``mahalanobis``,
``bilateral`` (range x spatial kernel, decoupled per-head bandwidths, no token-position cross term) and
``twicing`` ((2A - A^2) V smoother). Same contract as every attention layer; positions come from the
patch grid (``set_geometry`` / ``grid=``) or are 1-D token indices.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..core.kernel import (
    KERNELS, SPATIAL_KERNELS, SpatialKernel, boosting, check_bandwidth, default_range_bandwidth, kernel_attention,
    kernel_weights, last_query_spatial_log_kernel, spatial_coefficient, token_positions,
)
from ..core.subspace import merge_heads
from ..registry import register_attention
from .attention import AttentionLayer
from .decoding import append_to_cache

SMOOTHERS = ("single", "twicing", "boost")


class KernelAttention(AttentionLayer):
    """Nadaraya-Watson attention over learned queries/keys/values with an explicit kernel.

    Options: ``kernel`` in {dot, gaussian, mahalanobis, bilateral}; ``range_bandwidth`` h_y (default
    (4d)^{1/4}, per head); ``spatial_bandwidth`` h_p (float, a list of per-head values, or None for per-head values
    spaced geometrically from 1 to 16 grid steps); ``spatial_kernel`` in {gaussian, laplacian}; ``spatial`` (default:
    kernel is bilateral) multiplies a dot kernel by the spatial kernel too (softmax with ALiBi's bias, C.3);
    ``tie_bandwidths`` (bilateral) makes h_p = h_y, one learned bandwidth per head; ``learn_bandwidth`` (default
    True); ``smoother`` in {single, twicing, boost} with ``boost_steps``.

    Cached decoding (``decode``) stores the keys and values of every past token; their positions are their cache
    slots (slot j holds token j), so the spatial kernel of the new queries needs no recomputation. The ``twicing`` /
    ``boost`` smoothers apply the smoother to its own residual over all tokens and recompute the prefix instead.
    """

    decode_recomputes_prefix = False

    option_names = ("kernel", "range_bandwidth", "spatial_bandwidth", "spatial_kernel", "spatial", "tie_bandwidths",
                    "learn_bandwidth", "smoother", "boost_steps")

    def __init__(self, dim, num_heads=8, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        o = self.options
        self.kernel = o.get("kernel", "dot")
        self.spatial_kernel = o.get("spatial_kernel", "gaussian")
        self.smoother = o.get("smoother", "single")
        self.boost_steps = int(o.get("boost_steps", 1))
        for name, value, allowed in (("kernel", self.kernel, KERNELS), ("spatial_kernel", self.spatial_kernel, SPATIAL_KERNELS),
                                     ("smoother", self.smoother, SMOOTHERS)):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
        learn = bool(o.get("learn_bandwidth", True))
        h_y = o.get("range_bandwidth")
        h_y = default_range_bandwidth(self.head_dim) if h_y is None else _positive(h_y, "range_bandwidth")
        self.log_range_bandwidth = self._log_param(torch.full((num_heads,), math.log(h_y)), learn)
        self.spatial = bool(o.get("spatial", self.kernel == "bilateral"))
        if self.spatial and self.kernel not in ("bilateral", "dot"):
            raise ValueError(f"spatial: a spatial kernel multiplies the dot or bilateral kernel, not {self.kernel!r}")
        tie = bool(o.get("tie_bandwidths", False))
        if tie and (self.kernel != "bilateral" or o.get("spatial_bandwidth") is not None):
            raise ValueError("tie_bandwidths: for kernel='bilateral' without a spatial_bandwidth (h_p is h_y)")
        self.tie_bandwidths = tie  # h_p is h_y: the spatial kernel reads log_range_bandwidth (no second parameter)
        if self.spatial and not tie:
            self.log_spatial_bandwidth = self._log_param(self._spatial_init(o.get("spatial_bandwidth"), num_heads), learn)
        if self.kernel == "mahalanobis":  # diagonal metric M = exp(log_metric), initialised to I
            self.log_metric = nn.Parameter(torch.zeros(num_heads, self.head_dim, **self.factory))
        self.qkv = nn.Linear(self.dim, 3 * self.inner_dim, bias=self.qkv_bias, **self.factory)
        self.proj = nn.Linear(self.inner_dim, self.dim, bias=self.proj_bias, **self.factory)
        self.decode_recomputes_prefix = self.smoother != "single"

    @staticmethod
    def _spatial_init(h_p, heads: int) -> torch.Tensor:
        """Log of the initial spatial bandwidths: per-head values spaced geometrically from 1 to 16 grid steps, one
        value for every head, or one value per head."""
        if h_p is None:
            return torch.linspace(0, math.log(16), heads)
        values = list(h_p) if isinstance(h_p, (list, tuple)) else [h_p] * heads
        if len(values) != heads:
            raise ValueError(f"spatial_bandwidth: expected one value or {heads} (one per head), got {len(values)}")
        return torch.tensor([math.log(_positive(v, "spatial_bandwidth")) for v in values])

    def _log_param(self, log_init: torch.Tensor, learn: bool) -> nn.Parameter:
        """A log-bandwidth parameter; the values were validated as Python floats, so this also runs on the meta
        device (fast parameter counting); forward checks the bandwidths of real tensors (core.kernel)."""
        return nn.Parameter(log_init.to(**{k: v for k, v in self.factory.items() if v is not None}), requires_grad=learn)

    def init_weights(self) -> None:
        """Keep bandwidths and metric as constructed when timm re-initialises the model."""

    def spatial_bias(self, n_query: int, n_key: int, grid, device, dtype) -> SpatialKernel | None:
        """Spatial log-kernel of the last ``n_query`` positions against all ``n_key`` (bilateral only), by its parts:
        attention folds it into the queries and keys or builds it in blocks of query rows (``SpatialKernel.full()``
        is the [H, Tq, Tk] tensor). Without a grid the positions are the token indices (``ordered``)."""
        if not self.spatial:
            return None
        pos = token_positions(n_key, grid, self.num_prefix_tokens if grid is not None else 0, device=device, dtype=dtype)
        log_h_p = self.log_range_bandwidth if self.tie_bandwidths else self.log_spatial_bandwidth
        return SpatialKernel(pos[n_key - n_query:], pos, log_h_p.exp().to(dtype), self.spatial_kernel,
                             ordered=grid is None, grid=None if grid is None else tuple(map(int, grid)))

    def kernel_options(self, q, keys, attn_mask, is_causal: bool, grid) -> dict:
        """The keywords of ``core.kernel.kernel_attention`` / ``kernel_weights`` for these queries and keys. One
        new token on a 1-D sequence without gradients (a decoding step, eager) takes its bandwidths from
        :meth:`decoding_bandwidths` and its spatial row from ``last_query_spatial_log_kernel``."""
        if q.shape[-2] == 1 and grid is None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            range_bandwidth, coefficient = self.decoding_bandwidths(q.dtype)
            spatial = None if coefficient is None else last_query_spatial_log_kernel(keys.shape[-2], coefficient,
                                                                                     self.spatial_kernel)
        else:
            range_bandwidth = self.log_range_bandwidth.exp()
            spatial = self.spatial_bias(q.shape[-2], keys.shape[-2], grid, q.device, q.dtype)
        return {"range_bandwidth": range_bandwidth, "spatial_bias": spatial,
                "metric": self.log_metric.exp() if self.kernel == "mahalanobis" else None, "attn_mask": attn_mask,
                "is_causal": is_causal}

    def decoding_bandwidths(self, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h_y [H], the spatial term's ``spatial_coefficient`` [H] or None) in ``dtype``, for steps without
        gradients: computed (and checked) again only when a bandwidth parameter changes (its version counter or
        storage), not at every generated token and layer."""
        params = (self.log_range_bandwidth,) + ((self.log_spatial_bandwidth,) if hasattr(self, "log_spatial_bandwidth")
                                                else ())
        key = (dtype,) + tuple((p._version, p.data_ptr(), p.device) for p in params)
        memo = self.__dict__.get("_decoding_bandwidths")
        if memo is None or memo[0] != key:
            coefficient = None
            if self.spatial:
                h_p = (self.log_range_bandwidth if self.tie_bandwidths else self.log_spatial_bandwidth).exp().to(dtype)
                check_bandwidth(h_p, "spatial_bandwidth")
                coefficient = spatial_coefficient(h_p, self.spatial_kernel)
            memo = (key, self.log_range_bandwidth.exp(), coefficient)
            self.__dict__["_decoding_bandwidths"] = memo
        return memo[1], memo[2]

    def smooth(self, q, keys, values, attn_mask, is_causal: bool, grid) -> torch.Tensor:
        """Nadaraya-Watson average of ``values`` [B, H, Tk, p] for the queries [B, H, Tq, p] (C.9)."""
        return kernel_attention(q, keys, values, self.kernel, dropout_p=self.attn_dropout,
                                **self.kernel_options(q, keys, attn_mask, is_causal, grid))

    def attend(self, x, attn_mask, is_causal, grid=None):
        q, k, v = self.project_qkv(x)
        if self.record_attention:  # single: out = weights @ v; twicing (2A - A^2) v; boost [I - (I - A)^{k+1}] v (C.4)
            self.record(**kernel_weights(q, k, self.kernel, **self.kernel_options(q, k, attn_mask, is_causal, grid)))
        smooth = lambda values: self.smooth(q, k, values, attn_mask, is_causal, grid)  # noqa: E731
        if self.smoother == "single":
            out = smooth(v)
        else:
            out = boosting(smooth, v, 1 if self.smoother == "twicing" else self.boost_steps)  # twicing = 1 boosting step
        return self.proj(merge_heads(out))

    def decode_step(self, x, cache, layer_idx, attn_mask):
        if self.grid is not None:
            raise ValueError(f"{type(self).__name__}.decode: cached decoding is for 1-D sequences; this layer has the "
                             f"2-D grid {self.grid} (set_geometry(grid=None) first)")
        q, k, v = self.project_qkv(x)
        keys, values = append_to_cache(cache, layer_idx, k, v)
        return self.proj(merge_heads(self.smooth(q, keys, values, attn_mask, attn_mask is None, None)))


def _positive(value, name: str) -> float:
    """``value`` as a positive finite float, or a ValueError naming the option."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a positive bandwidth, got {value!r}") from None
    if not math.isfinite(out) or out <= 0:
        raise ValueError(f"{name}: expected a positive bandwidth, got {value!r}")
    return out


@register_attention("gaussian", summary="RBF kernel exp(-||q_i - k_j||^2 / h^2), learned per-head bandwidth")
class GaussianAttention(KernelAttention):
    bound_options = {"kernel": "gaussian"}


@register_attention("mahalanobis", summary="RBF kernel with a learned diagonal metric per head")
class MahalanobisAttention(KernelAttention):
    bound_options = {"kernel": "mahalanobis"}


@register_attention("bilateral", summary="range kernel on q/k x spatial kernel on positions, decoupled bandwidths")
class BilateralAttention(KernelAttention):
    bound_options = {"kernel": "bilateral"}
    encodes_position = True  # its spatial kernel on token positions replaces an additive position embedding


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's per-head slopes m_h = 2^(-8h/H), h = 1..H (C.3)."""
    return [2.0 ** (-8.0 * h / heads) for h in range(1, heads + 1)]


@register_attention("alibi", summary="softmax q.k/sqrt(d) minus ALiBi's m_h |i - j| (a Laplacian spatial kernel, "
                                     "fixed slopes)")
class ALiBiAttention(KernelAttention):
    """Softmax attention with ALiBi's linear distance bias: the dot kernel times a Laplacian spatial kernel with
    bandwidth 1/m_h per head, both fixed (C.3) — bilateral attention's locality prior without its learned range
    and spatial bandwidths, the control that tells the two apart."""

    bound_options = {"kernel": "dot", "spatial": True, "spatial_kernel": "laplacian", "learn_bandwidth": False}
    encodes_position = True

    def __init__(self, dim, num_heads=8, **kwargs):
        kwargs.setdefault("spatial_bandwidth", [1.0 / m for m in alibi_slopes(num_heads)])
        super().__init__(dim, num_heads, **kwargs)


@register_attention("twicing", summary="softmax attention smoother applied as twicing: (2A - A^2) V")
class TwicingAttention(KernelAttention):
    """Twicing needs the first smoothing A V at every past token to smooth its residual, so cached decoding stores the
    layer's inputs and recomputes the prefix (O(T^2) per new token)."""

    bound_options = {"kernel": "dot", "smoother": "twicing"}
    decode_recomputes_prefix = True
