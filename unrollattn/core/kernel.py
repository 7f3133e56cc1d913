"""Kernel-regression attention (docs/papers.md family C): Nadaraya-Watson smoothing in log space.

out_i = sum_j w_ij v_j,  w_ij = softmax_j(l_ij + m_ij)  (C.9), with the log-kernel l_ij one of

    dot          q_i . k_j / sqrt(d)
    gaussian     -||q_i - k_j||^2 / h^2  =  (2 q_i . k_j - ||k_j||^2) / h^2 + const_i
    mahalanobis  gaussian on q, k rescaled by M^{1/2} (diagonal M)
    bilateral    gaussian range kernel + spatial log-kernel on positions, no token-position cross term

Every kernel runs through ``F.scaled_dot_product_attention`` with per-head query scaling and the terms that carry a
gradient folded into extra query/key coordinates, so SDPA keeps its fused path: the key-norm term of the range
kernels and, where it separates into a sum of query and key terms, the spatial term (a Gaussian kernel on any
positions; a Laplacian one on token indices under a causal mask). Other spatial terms are built a block of query
rows at a time, or inside FlexAttention's score function on CUDA. Tensors are [B, H, N, d]; bandwidths are [H].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .masks import additive_mask
from .validation import finite_checks_enabled

KERNELS = ("dot", "gaussian", "mahalanobis", "bilateral")
SPATIAL_KERNELS = ("gaussian", "laplacian")


def default_range_bandwidth(head_dim: int) -> float:
    """h_y = (4d)^{1/4}: the bandwidth softmax attention implicitly uses (h^2 = 2 sqrt(d), C.2)."""
    return (4 * head_dim) ** 0.25


def check_bandwidth(bandwidth: torch.Tensor, name: str) -> None:
    if finite_checks_enabled() and bool((bandwidth <= 0).any()):
        raise ValueError(f"{name}: expected positive bandwidths, got {bandwidth.detach().flatten().tolist()}")


def token_positions(n: int, grid: tuple[int, int] | None = None, num_prefix_tokens: int = 0, *,
                    device=None, dtype=torch.float32) -> torch.Tensor:
    """Positions [N, P]: 2-D patch coordinates (row, col) after ``num_prefix_tokens`` when ``grid`` is given,
    otherwise 1-D indices. Prefix tokens (cls, registers) get NaN: they take no spatial term."""
    if grid is None:
        return torch.arange(n, device=device, dtype=dtype)[:, None]
    h, w = grid
    if n != num_prefix_tokens + h * w:
        raise ValueError(f"positions: {n} tokens do not match grid {h}x{w} plus {num_prefix_tokens} prefix tokens "
                         f"(expected {num_prefix_tokens + h * w})")
    rows, cols = torch.meshgrid(torch.arange(h, device=device, dtype=dtype), torch.arange(w, device=device, dtype=dtype),
                                indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], dim=-1)
    prefix = torch.full((num_prefix_tokens, 2), float("nan"), device=device, dtype=dtype)
    return torch.cat([prefix, coords])


def spatial_log_kernel(positions_q: torch.Tensor, positions_k: torch.Tensor, bandwidth: torch.Tensor,
                       kind: str = "gaussian") -> torch.Tensor:
    """[H, Nq, Nk] spatial log-kernel: -||p_i - p_j||^2 / h_p^2 (gaussian) or -||p_i - p_j|| / h_p (laplacian,
    ALiBi's form on 1-D indices). Pairs involving a NaN (prefix) position get 0."""
    if kind not in SPATIAL_KERNELS:
        raise ValueError(f"spatial kernel: expected one of {SPATIAL_KERNELS}, got {kind!r}")
    if positions_q.ndim != 2 or positions_k.ndim != 2 or positions_q.shape[1] != positions_k.shape[1]:
        raise ValueError(f"positions: expected [N, P] tensors with equal P, got {list(positions_q.shape)} "
                         f"and {list(positions_k.shape)}")
    check_bandwidth(bandwidth, "spatial_bandwidth")
    distance = spatial_distance(positions_q, positions_k, kind)
    h = bandwidth.to(distance.dtype)[:, None, None]
    return -distance[None] / (h.square() if kind == "gaussian" else h)


def spatial_coefficient(bandwidth: torch.Tensor, kind: str) -> torch.Tensor:
    """The per-head factor of the spatial log-kernel's distance term (C.5): -1/h_p^2 (gaussian) or -1/h_p
    (laplacian)."""
    return -(bandwidth.square() if kind == "gaussian" else bandwidth).reciprocal()


def last_query_spatial_log_kernel(n_key: int, coefficient: torch.Tensor, kind: str) -> torch.Tensor:
    """[H, 1, n_key] spatial log-kernel of one query at the last of ``n_key`` 1-D token positions (a decoding step)
    from :func:`spatial_coefficient` [H]: coefficient * |i - j| (or its square), with j - i = 1 - n_key .. 0; equal to
    ``spatial_log_kernel(token_positions(n_key)[-1:], token_positions(n_key), h_p, kind)`` in three operations."""
    offsets = torch.arange(1 - n_key, 1, device=coefficient.device, dtype=coefficient.dtype)
    offsets = offsets.square_() if kind == "gaussian" else offsets.abs_()
    return coefficient[:, None, None] * offsets


def spatial_distance(positions_q: torch.Tensor, positions_k: torch.Tensor, kind: str, out: torch.Tensor | None = None,
                     scratch: torch.Tensor | None = None) -> torch.Tensor:
    """[Nq, Nk] the spatial log-kernel before its bandwidth (C.5): ||p_i - p_j||^2 (gaussian) or ||p_i - p_j||
    (laplacian); 0 for pairs involving a NaN (prefix) position. Positions are constants (no gradient), so the
    result is built in place: at most two [Nq, Nk] buffers, no [Nq, Nk, P] offsets; ``out`` and ``scratch``
    ([Nq, Nk] each, optional) are those two, for a caller that builds many blocks without allocating each anew."""
    if positions_q.requires_grad or positions_k.requires_grad:
        raise ValueError("positions: expected constant coordinates (requires_grad=False); the spatial kernel's "
                         "gradient reaches its bandwidths, not the positions")
    if kind == "laplacian" and positions_q.shape[1] == 1:  # 1-D token indices: ||p_i - p_j|| = |i - j| (ALiBi)
        return torch.sub(positions_q, positions_k[:, 0], out=out).abs_().nan_to_num_(0.0)
    distance = torch.sub(positions_q[:, :1], positions_k[:, 0], out=out).square_()
    for axis in range(1, positions_q.shape[1]):
        offset = torch.sub(positions_q[:, axis, None], positions_k[:, axis], out=scratch)
        distance.addcmul_(offset, offset)
    distance.nan_to_num_(0.0)
    return distance if kind == "gaussian" else distance.sqrt_()


@dataclass(frozen=True)
class SpatialKernel:
    """The spatial log-kernel S_ij of C.5 by its parts (query and key positions [Nq, P] / [Nk, P], bandwidths [H],
    kind), so that attention can fold it into the queries and keys or build it a block of query rows at a time
    instead of as one [H, Nq, Nk] tensor. ``ordered``: the positions are token indices (1-D, not decreasing with the
    key index, the queries at the last Nq keys' positions, as :func:`token_positions` gives them without a grid),
    so under a causal mask every visible key has p_j <= p_i."""

    positions_q: torch.Tensor
    positions_k: torch.Tensor
    bandwidth: torch.Tensor
    kind: str = "gaussian"
    ordered: bool = False
    grid: tuple[int, int] | None = None  # the keys are token_positions(Nk, grid, Nk - h * w): prefix tokens, then the
    # patch grid row by row; the queries are the last Nq keys. Lets a fixed bias be read from offset tables (_FixedBias)

    def __post_init__(self):
        if self.grid is not None:
            if not (isinstance(self.grid, tuple) and len(self.grid) == 2
                    and all(isinstance(n, int) and n > 0 for n in self.grid)):
                raise ValueError(f"SpatialKernel: grid expects (rows, cols), two positive ints, got {self.grid!r}")
            h, w = self.grid
            keys, queries = self.positions_k, self.positions_q
            if (keys.ndim != 2 or queries.ndim != 2 or keys.shape[1] != 2 or keys.shape[0] < h * w
                    or queries.shape[0] > keys.shape[0]):
                raise ValueError(f"SpatialKernel: grid {h}x{w} expects 2-D key positions [prefix + {h * w}, 2] and at "
                                 f"most as many queries, got keys {list(self.positions_k.shape)}, queries "
                                 f"{list(self.positions_q.shape)}")

    def separable(self, is_causal: bool) -> bool:
        """Whether S_ij = a_i . b_j + const_i for every visible pair, so it folds into extra q/k coordinates: always
        for the Gaussian kernel; for the Laplacian one on ordered 1-D positions under a causal mask (|p_i - p_j| =
        p_i - p_j there)."""
        return self.kind == "gaussian" or (self.ordered and is_causal and self.positions_q.shape[1] == 1)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.bandwidth.shape[0], self.positions_q.shape[0], self.positions_k.shape[0]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """S for query rows ``start:stop``: [H, stop - start, Nk]."""
        return spatial_log_kernel(self.positions_q[start:stop], self.positions_k, self.bandwidth, self.kind)

    def full(self) -> torch.Tensor:
        return self.rows(0, self.positions_q.shape[0])


def kernel_terms(q: torch.Tensor, k: torch.Tensor, kernel: str = "dot", *,
                 range_bandwidth: torch.Tensor | float | None = None, metric: torch.Tensor | None = None,
                 spatial_bias: "torch.Tensor | SpatialKernel | None" = None, attn_mask: torch.Tensor | None = None,
                 is_causal: bool = False) -> dict:
    """The log-kernel l_ij + m_ij of C.9 as SDPA takes it: ``l_ij = scale * q'_i . k'_j + key_bias_j + spatial_ij``.

    Returns ``q``, ``k`` (rescaled per kernel), ``scale`` (for SDPA), ``key_bias`` [B, H, 1, Nk] or None (the
    gaussian key-norm term -||k_j||^2/h^2), ``spatial`` [H, Nq, Nk] or None, ``mask`` (additive) or None and
    ``causal_only`` (the mask is exactly SDPA's ``is_causal``: square, no other mask; ``mask`` is then None and
    :func:`_dense_mask` builds it); the range part of the log-kernel is ``scale * q.k + key_bias`` and the spatial
    part ``spatial`` (C.5)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    if q.ndim != 4 or k.shape != q.shape[:2] + k.shape[2:]:
        raise ValueError(f"expected q, k of shape [B, H, N, d], got {list(q.shape)}, {list(k.shape)}")
    heads, n_q, n_k, d = q.shape[1], q.shape[2], k.shape[2], q.shape[-1]
    causal_only = is_causal and attn_mask is None and n_q == n_k  # built only where a path needs it: N x N
    mask = None if causal_only else additive_mask(attn_mask, is_causal, n_q, n_k, q.device, q.dtype)
    terms = {"mask": mask, "causal_only": causal_only}
    if kernel == "dot":
        scale = d ** -0.5
        if range_bandwidth is not None:  # dot logits q.k * 2/h^2 (h^2 = 2 sqrt(d) recovers 1/sqrt(d))
            q = q * _per_head(2.0 / _as_tensor(range_bandwidth, q).square(), heads)
            scale = 1.0
        return {"q": q, "k": k, "scale": scale, "key_bias": None, "spatial": spatial_bias, **terms}
    if kernel == "mahalanobis":
        if metric is None:
            raise ValueError("kernel='mahalanobis' needs metric= (diagonal weights [H, d], positive)")
        if metric.shape != (heads, d):
            raise ValueError(f"metric: expected shape [{heads}, {d}], got {list(metric.shape)}")
        check_bandwidth(metric, "metric")
        metric = metric.to(q.dtype)
    elif kernel == "gaussian" and spatial_bias is not None:
        raise ValueError("spatial_bias is for kernel='bilateral' (or 'dot'); the gaussian kernel is range-only")
    h = _as_tensor(default_range_bandwidth(d) if range_bandwidth is None else range_bandwidth, q)
    check_bandwidth(h, "range_bandwidth")
    inv_h2 = _per_head(1.0 / h.square(), heads)  # [1, H, 1, 1]
    if kernel == "mahalanobis":  # (q-k)^T M (q-k): q' = 2 M q / h^2 against k itself, key term -k^T M k / h^2
        key_bias = -(_WeightedSquareNorm.apply(k, metric) * inv_h2[..., 0])[:, :, None, :]
        return {"q": q * (2 * inv_h2 * metric[None, :, None, :]), "k": k, "scale": 1.0, "key_bias": key_bias,
                "spatial": None, **terms}
    key_bias = -(k.square().sum(-1) * inv_h2[..., 0])[:, :, None, :]  # -||k_j||^2 / h^2, [B, H, 1, Nk]
    return {"q": q * (2 * inv_h2), "k": k, "scale": 1.0, "key_bias": key_bias,
            "spatial": spatial_bias if kernel == "bilateral" else None, **terms}


class _WeightedSquareNorm(torch.autograd.Function):
    """k^T M k per key for k [B, H, N, d] and a diagonal metric M [H, d] -> [B, H, N], saving only k and M (both
    alive anyway): autograd's own form would keep a [B, H, N, d] copy (k² or M^{1/2} k) for the metric's gradient."""

    @staticmethod
    def forward(ctx, k: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(k, metric)
        return torch.einsum("bhnd,hd->bhn", k.square(), metric)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        k, metric = ctx.saved_tensors
        grad_k = grad_metric = None
        if ctx.needs_input_grad[0]:
            grad_k = 2 * k * metric[None, :, None, :] * grad[..., None]
        if ctx.needs_input_grad[1]:
            grad_metric = torch.einsum("bhnd,bhn->hd", k.square(), grad)
        return grad_k, grad_metric


def _sum_biases(*biases: torch.Tensor | None) -> torch.Tensor | None:
    """The additive biases' sum as a 4-D [B|1, H|1, Nq, Nk] mask: SDPA's CPU flash kernel takes only 4-D masks (a
    3-D [H, Nq, Nk] one sends it to the unfused math path, which materialises the scores)."""
    present = [b for b in biases if b is not None]
    if not present:
        return None
    return _as_4d(sum(present[1:], present[0]))


def _as_4d(bias: torch.Tensor) -> torch.Tensor:
    """An additive bias [Nq, Nk], [H|1, Nq, Nk] or 4-D as [B|1, H|1, Nq, Nk] (leading broadcast dimensions)."""
    return bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))


SPATIAL_BACKENDS = ("auto", "folded", "blocked", "flex")


def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "dot", *,
                     range_bandwidth: torch.Tensor | float | None = None, metric: torch.Tensor | None = None,
                     spatial_bias: "torch.Tensor | SpatialKernel | None" = None,
                     attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                     dropout_p: float = 0.0, spatial_backend: str = "auto") -> torch.Tensor:
    """Nadaraya-Watson attention [B, H, N, d] with the log-kernels of C.9 through one SDPA call.

    ``range_bandwidth`` h_y: scalar or [H] (default (4d)^{1/4}); ``metric``: diagonal Mahalanobis
    weights [H, d] (> 0); ``spatial_bias``: the spatial log-kernel (bilateral, or dot for ALiBi's form), a
    :class:`SpatialKernel` (no N x N tensor with a gradient: ``spatial_backend`` "folded" adds its query and key
    terms as extra coordinates where it separates (:meth:`SpatialKernel.separable`), "blocked" builds it in blocks
    of query rows for SDPA, "flex" computes it inside FlexAttention's score function; "auto" = flex on CUDA without
    dropout, else folded where it separates in float32 / float64, else blocked) or a tensor [H, N, N]. Under "auto",
    a bias that needs no gradient and fits in one score block (a decoding step) goes to SDPA as one additive mask.
    """
    if v.ndim != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"expected q, k, v of shape [B, H, N, d], got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if spatial_backend not in SPATIAL_BACKENDS:
        raise ValueError(f"spatial_backend: expected one of {SPATIAL_BACKENDS}, got {spatial_backend!r}")
    t = kernel_terms(q, k, kernel, range_bandwidth=range_bandwidth, metric=metric, spatial_bias=spatial_bias,
                     attn_mask=attn_mask, is_causal=is_causal)
    if spatial_backend == "auto" and _small_bias_without_gradient(t, v):
        return _explicit_bias(t, v, dropout_p)
    if isinstance(t["spatial"], SpatialKernel):
        foldable = t["spatial"].separable(is_causal)
        if spatial_backend == "auto":
            if q.is_cuda and dropout_p == 0:
                spatial_backend = "flex"
            else:  # folded coordinates reach O(N) in size: float32 / float64 keep the scores' rounding small
                full_precision = q.dtype in (torch.float32, torch.float64)
                spatial_backend = "folded" if foldable and full_precision else "blocked"
        if spatial_backend == "flex":
            return _flex_spatial_kernel(t, v, dropout_p)
        if spatial_backend == "folded":
            if not foldable:
                raise ValueError("spatial_backend='folded': the spatial term separates into query and key terms only "
                                 "for the Gaussian kernel, or the Laplacian one on ordered 1-D positions with "
                                 "is_causal=True; use 'blocked'")
            return _folded_kernel(t, v, dropout_p)
        return _blocked_spatial_kernel(t, v, dropout_p)
    if t["key_bias"] is not None and t["spatial"] is None:
        return _folded_kernel(t, v, dropout_p)
    if t["key_bias"] is None and t["spatial"] is None:
        return _sdpa(t["q"], t["k"], v, t, dropout_p, t["scale"])
    return _explicit_bias(t, v, dropout_p)


def _small_bias_without_gradient(t: dict, v: torch.Tensor) -> bool:
    """Whether the terms' additive bias fits in one score block and nothing needs its gradient (a decoding step, or
    inference on short sequences): SDPA's fused kernel then takes it as a plain mask, in fewer operations than
    folding it into extra coordinates."""
    spatial = t["spatial"]
    if t["key_bias"] is None and spatial is None:
        return False
    carried = (t["q"], t["k"], v, t["key_bias"], spatial.bandwidth if isinstance(spatial, SpatialKernel) else spatial)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in carried):
        return False
    batch, heads, n_q, n_k = t["q"].shape[0], t["q"].shape[1], t["q"].shape[2], t["k"].shape[2]
    return batch * heads * n_q * n_k * t["q"].element_size() <= SCORE_BLOCK_BYTES


def _explicit_bias(t: dict, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """SDPA with the key-norm, mask and spatial terms summed into one additive mask [B|1, H, Nq, Nk]."""
    spatial = t["spatial"].full() if isinstance(t["spatial"], SpatialKernel) else t["spatial"]
    bias = _sum_biases(t["key_bias"], _dense_mask(t), None if spatial is None else spatial.to(t["q"].dtype))
    return F.scaled_dot_product_attention(t["q"], t["k"], v, attn_mask=bias, dropout_p=dropout_p, scale=t["scale"])


def _dense_mask(t: dict) -> torch.Tensor | None:
    """The terms' additive mask as a tensor (the causal one built here when ``causal_only`` left it to SDPA)."""
    if t["causal_only"]:
        q, k = t["q"], t["k"]
        return additive_mask(None, True, q.shape[-2], k.shape[-2], q.device, q.dtype)
    return t["mask"]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: dict, dropout_p: float, scale: float) -> torch.Tensor:
    """SDPA under the terms' mask: a plain causal mask as ``is_causal`` (the fused kernels skip the masked blocks)."""
    if t["causal_only"]:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=t["mask"], dropout_p=dropout_p, scale=scale)


SCORE_BLOCK_BYTES = 8 * 2**20  # the score block of one query-row block of the spatial path


def _blocked_spatial_kernel(t: dict, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """SDPA with a spatial term (bilateral; dot + spatial = ALiBi-like) in blocks of query rows, each block's bias
    (key-norm + mask + S rows) built inside it and recomputed in backward (activation checkpointing): the bandwidth
    gradient never needs an [B, H, N, N] score map alive, only one block of about SCORE_BLOCK_BYTES. Exact: the rows
    of a softmax over keys are independent. A spatial term without a gradient (ALiBi's fixed slopes) takes
    :class:`_FixedBiasFlash` on CPU instead, which runs the forward once."""
    if _fixed_bias_flash_applies(t, v, dropout_p):
        return _fixed_spatial_kernel(t, v)
    q, k, spatial, key_bias, mask = t["q"], t["k"], t["spatial"], t["key_bias"], _dense_mask(t)
    batch, heads, n_q, n_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    rows_per_block = max(1, SCORE_BLOCK_BYTES // max(1, batch * heads * n_k * q.element_size()))
    if mask is not None:
        mask = mask.expand(mask.shape[:-2] + (n_q, n_k))

    def block(q_rows, keys, values, bandwidth, start: int, stop: int):
        part = replace(spatial, bandwidth=bandwidth).rows(start, stop)
        bias = _sum_biases(key_bias, None if mask is None else mask[..., start:stop, :], part.to(q_rows.dtype))
        return F.scaled_dot_product_attention(q_rows, keys, values, attn_mask=bias, dropout_p=dropout_p,
                                              scale=t["scale"])

    recompute = torch.is_grad_enabled() and n_q > rows_per_block
    outputs = []
    for start in range(0, n_q, rows_per_block):
        stop = min(n_q, start + rows_per_block)
        args = (q[..., start:stop, :], k, v, spatial.bandwidth, start, stop)
        outputs.append(checkpoint(block, *args, use_reentrant=False) if recompute else block(*args))
    return torch.cat(outputs, dim=-2)


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _fixed_bias_flash_applies(t: dict, v: torch.Tensor, dropout_p: float) -> bool:
    """Whether the spatial term needs no gradient and SDPA's CPU flash kernel, forward and backward, can take the
    blocks directly (no dropout: its mask would have to be replayed in backward)."""
    q, spatial = t["q"], t["spatial"]
    return (q.device.type == "cpu" and dropout_p == 0 and _CPU_FLASH is not None and _CPU_FLASH_BACKWARD is not None
            and q.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and spatial.bandwidth.requires_grad))


@dataclass(frozen=True)
class _FixedBias:
    """The additive bias S_ij + m_ij of C.9 that carries no gradient, built a block of heads and query rows at a
    time: ``spatial`` (its bandwidths fixed) and ``mask`` (4-D additive [B|1, H|1, Nq, Nk] or None). Every block is
    written into one :meth:`workspace` (fresh multi-megabyte blocks cost a page fault per 4 KB on every call). On a
    patch grid (``spatial.grid``) the distances are read from ``table`` (:func:`grid_distance_table`) instead of
    computed pair by pair."""

    spatial: SpatialKernel
    mask: torch.Tensor | None
    table: torch.Tensor | None = None  # grid_distance_table(spatial, dtype), where there is one

    def workspace(self, rows: int, heads: int, dtype) -> tuple[torch.Tensor | None, torch.Tensor]:
        """([rows, Nk] distances, or None with a grid table; a flat buffer for the [B|1, heads, rows, Nk] bias,
        whose front is the distances' scratch while they are built)."""
        positions, batch = self.spatial.positions_k, 1 if self.mask is None else self.mask.shape[0]
        distances = positions.new_empty(rows, positions.shape[0]) if self.table is None else None
        return distances, positions.new_empty(batch * heads * rows * positions.shape[0], dtype=dtype)

    def distance(self, rows: slice, workspace) -> torch.Tensor | None:
        """The spatial term of query rows ``rows`` before the bandwidth, shared by every head: [r, Nk] (None on a
        grid: :meth:`block` reads the table)."""
        if self.table is not None:
            return None
        buffer, flat = workspace
        positions_q = self.spatial.positions_q[rows]
        size = positions_q.shape[0] * buffer.shape[1]
        scratch = flat[:size].view(-1, buffer.shape[1]) if flat.dtype == buffer.dtype else None
        return spatial_distance(positions_q, self.spatial.positions_k, self.spatial.kind,
                                out=buffer[:positions_q.shape[0]], scratch=scratch)

    def block(self, distance: torch.Tensor | None, heads: slice, rows: slice, workspace) -> torch.Tensor:
        """[B|1, g, r, Nk] bias of heads ``heads`` and query rows ``rows`` from their ``distance`` (or the grid
        table), in ``workspace``."""
        flat = workspace[1]
        coefficient = spatial_coefficient(self.spatial.bandwidth[heads].to(flat.dtype), self.spatial.kind)
        batch = 1 if self.mask is None else self.mask.shape[0]
        n_rows, n_k = rows.stop - rows.start, self.spatial.positions_k.shape[0]
        shape = (batch, coefficient.shape[0], n_rows, n_k)
        bias = flat[:math.prod(shape)].view(shape)
        coefficient = coefficient.view(1, -1, 1, 1).expand(batch, -1, 1, 1)
        if distance is None:
            self._grid_block(bias, coefficient, rows)
        else:
            torch.mul(distance.to(flat.dtype), coefficient, out=bias)
        if self.mask is not None:
            bias.add_(self.mask[:, heads if self.mask.shape[1] > 1 else slice(None), rows])
        return bias

    def _grid_block(self, bias: torch.Tensor, coefficient: torch.Tensor, rows: slice) -> None:
        """Fill ``bias`` [B|1, g, r, Nk] from the grid table: one strided multiply per grid row the block touches;
        0 where a prefix token takes part."""
        h, w = self.spatial.grid
        n_k = bias.shape[-1]
        prefix = n_k - h * w
        first = n_k - self.spatial.positions_q.shape[0] + rows.start - prefix  # grid index of the block's first row
        if prefix:
            bias[..., :prefix].zero_()
        if first < 0:
            bias[:, :, :-first].zero_()
        scale = coefficient[..., None]  # [B|1, g, 1, 1, 1]
        index, end = max(first, 0), first + bias.shape[2]
        while index < end:
            y, x = divmod(index, w)
            stop = min(end, (y + 1) * w)
            out = bias[:, :, index - first:stop - first, prefix:].unflatten(-1, (h, w))
            torch.mul(self.table[x:x + stop - index, h - 1 - y:2 * h - 1 - y], scale, out=out)
            index = stop


def grid_distance_table(spatial: SpatialKernel, dtype) -> torch.Tensor | None:
    """On an h x w patch grid, the spatial term before its bandwidth by offset (C.5): T[x_q, h - 1 + y_k - y_q, x_k]
    = ||(y_k - y_q, x_k - x_q)|| (squared for the Gaussian kernel), [w, 2h - 1, w], so the keys of one query are
    the strided slice T[x_q, h - 1 - y_q : 2h - 1 - y_q] ([h, w]) and a block of the bias is a few multiplies
    instead of pairwise distances. None off a grid or when the table would take more than half of
    SCORE_BLOCK_BYTES."""
    if spatial.grid is None:
        return None
    h, w = spatial.grid
    if w * (2 * h - 1) * w * torch.finfo(dtype).bits // 8 > SCORE_BLOCK_BYTES // 2:
        return None
    positions = spatial.positions_k  # the distances in the positions' dtype, as spatial_distance computes them
    dy = torch.arange(1 - h, h, device=positions.device, dtype=positions.dtype)
    x = torch.arange(w, device=positions.device, dtype=positions.dtype)
    table = dy[None, :, None].square() + (x[None, None, :] - x[:, None, None]).square()
    return (table if spatial.kind == "gaussian" else table.sqrt_()).to(dtype)


class _FixedBiasFlash(torch.autograd.Function):
    """softmax(scale * q.k + bias) v through SDPA's CPU flash kernel, a block of heads and query rows at a time, for
    a bias with no gradient (C.9): forward keeps each block's output and log-sum-exp, backward rebuilds the block's
    bias and runs the flash backward on it. The forward runs once (activation checkpointing would run it twice) and
    no bias outlives its block. Blocks of each pass: (``head_groups``, ``row_blocks``), lists of slices."""

    @staticmethod
    def forward(ctx, q, k, v, bias: _FixedBias, forward_blocks: tuple, backward_blocks: tuple, scale: float):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        lse = q.new_empty(q.shape[:-1])
        head_groups, row_blocks = forward_blocks
        workspace = _workspace(bias, head_groups, row_blocks, q.dtype)
        for rows in row_blocks:
            distance = bias.distance(rows, workspace)
            for heads in head_groups:
                out[:, heads, rows], lse[:, heads, rows] = _CPU_FLASH(
                    q[:, heads, rows], k[:, heads], v[:, heads], 0.0, False,
                    attn_mask=bias.block(distance, heads, rows, workspace), scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.blocks = (bias, *backward_blocks, scale)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        bias, head_groups, row_blocks, scale = ctx.blocks
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        workspace = _workspace(bias, head_groups, row_blocks, q.dtype)
        for rows in row_blocks:
            distance = bias.distance(rows, workspace)
            for heads in head_groups:
                dq, dk, dv = _CPU_FLASH_BACKWARD(
                    grad_out[:, heads, rows], q[:, heads, rows], k[:, heads], v[:, heads], out[:, heads, rows],
                    lse[:, heads, rows], 0.0, False, attn_mask=bias.block(distance, heads, rows, workspace),
                    scale=scale)
                grad_q[:, heads, rows] = dq
                grad_k[:, heads] += dk
                grad_v[:, heads] += dv
                del dq, dk, dv  # before the next block's are made: one block's key gradients alive at a time
        return grad_q, grad_k, grad_v, None, None, None, None


def _workspace(bias: _FixedBias, head_groups: list, row_blocks: list, dtype):
    """The buffers of :meth:`_FixedBias.workspace` for the largest block (slices with explicit start and stop)."""
    return bias.workspace(max(r.stop - r.start for r in row_blocks), max(g.stop - g.start for g in head_groups), dtype)


def _fixed_spatial_kernel(t: dict, v: torch.Tensor) -> torch.Tensor:
    """The blocked spatial path for a spatial term without a gradient (:class:`_FixedBiasFlash`); the key-norm term,
    which carries the keys' gradient, folded into the queries and keys (:func:`_augmented_qkv`). Heads per call: one
    in forward (the CPU flash forward splits its work over query blocks too, and the fewer heads, the more rows a
    block holds); in backward at least one per thread over the batch (the flash backward splits its work over batch
    x heads only). Query rows per call: as many as keep one bias block, with the distances or the grid table it is
    built from, within SCORE_BLOCK_BYTES, a multiple of 32 (the CPU flash kernel's smallest split of the queries)
    where more than 32 fit."""
    q, k, v_aug, scale = _augmented_qkv(t, v, fold_spatial=False)
    batch, heads, n_q, n_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    mask = _dense_mask(t)
    if mask is not None:
        mask = _as_4d(mask)
        mask = mask.expand(mask.shape[:2] + (n_q, n_k))
    table = grid_distance_table(t["spatial"], q.dtype)
    mask_batch = 1 if mask is None else mask.shape[0]

    def blocks(per_call: int) -> tuple[list, list]:
        row_bytes = n_k * q.element_size()
        if table is None:  # the block's bias and the distances it is built from
            rows = max(1, SCORE_BLOCK_BYTES // ((mask_batch * per_call + 1) * row_bytes))
        else:  # the block's bias beside the table
            free = SCORE_BLOCK_BYTES - table.numel() * table.element_size()
            rows = max(1, free // (mask_batch * per_call * row_bytes))
        rows -= rows % 32 if rows > 32 else 0
        return ([slice(h, min(heads, h + per_call)) for h in range(0, heads, per_call)],
                [slice(r, min(n_q, r + rows)) for r in range(0, n_q, rows)])

    backward_blocks = blocks(min(heads, -(-torch.get_num_threads() // batch)))
    out = _FixedBiasFlash.apply(q, k, v_aug, _FixedBias(t["spatial"], mask, table), blocks(1), backward_blocks, scale)
    return out[..., :v.shape[-1]]


_COMPILED_FLEX = None


def _flex_attention(device: torch.device):
    """FlexAttention: as it is inside a compiled region or off CUDA, else compiled once (eager flex_attention
    materialises the scores: a reference, not a fast path)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling() or device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def _flex_spatial_kernel(t: dict, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """The spatial path through FlexAttention: scale * q.k plus, in its score function, the key-norm term, the
    additive mask and S_ij computed from the two position indices (C.5), so no N x N tensor exists in forward or
    backward; gradients reach the bandwidths through the captured tensors. Backward needs CUDA (torch 2.14 has no
    CPU backward for FlexAttention); the CPU forward runs unfused (a parity check, not a fast path)."""
    if dropout_p:
        raise ValueError("spatial_backend='flex': FlexAttention has no attention dropout; use 'blocked'")
    q, k, spatial, key_bias, mask = t["q"], t["k"], t["spatial"], t["key_bias"], _dense_mask(t)
    if not q.is_cuda and torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (q, k, v, key_bias, spatial.bandwidth)):
        raise ValueError("spatial_backend='flex' on CPU runs forward only (torch has no CPU backward for "
                         "FlexAttention); train with 'blocked' or on CUDA")
    pos_q, pos_k = spatial.positions_q.to(q.dtype), spatial.positions_k.to(q.dtype)
    valid_q, valid_k = ~pos_q.isnan().any(-1), ~pos_k.isnan().any(-1)  # prefix tokens take no spatial term
    pos_q, pos_k = pos_q.nan_to_num(0.0), pos_k.nan_to_num(0.0)
    bandwidth, gaussian, dims = spatial.bandwidth.to(q.dtype), spatial.kind == "gaussian", pos_q.shape[1]
    keys = None if key_bias is None else key_bias[:, :, 0, :]  # [B|1, H, Nk]
    if mask is not None:
        mask = _as_4d(mask)
    pick = lambda size, index: index if size > 1 else 0  # noqa: E731  (broadcast dimensions of the captured tensors)

    def score_mod(score, b, h, i, j):
        sq_dist = sum((pos_q[i, p] - pos_k[j, p]).square() for p in range(dims))
        sq_dist = torch.where(valid_q[i] & valid_k[j], sq_dist, torch.zeros_like(sq_dist))
        h_p = bandwidth[h]
        score = score + (-sq_dist / (h_p * h_p) if gaussian else -torch.sqrt(sq_dist) / h_p)
        if keys is not None:
            score = score + keys[pick(keys.shape[0], b), h, j]
        if mask is not None:
            score = score + mask[pick(mask.shape[0], b), pick(mask.shape[1], h), pick(mask.shape[2], i),
                                 pick(mask.shape[3], j)]
        return score

    return _flex_attention(q.device)(q, k, v, score_mod=score_mod, scale=t["scale"])


def _spatial_coordinates(spatial: SpatialKernel, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key coordinates [H, Nq, c] / [Nk, c] with a_i . b_j = S_ij + const_i for every visible pair (C.5).

    Gaussian: -||p_i - p_j||^2/h^2 = (2 p_i . p_j - ||p_j||^2 - ||p_i||^2)/h^2, positions centred (S is shift
    invariant) to keep the coordinates small; a pair with a prefix token (NaN position) takes 0, which the columns
    [2 p_i/h^2, 1/h^2, ||p_i||^2/h^2] (zero for a prefix query) . [p_j, -||p_j||^2, 1 - valid_j] give. Laplacian on
    ordered positions under a causal mask: -(p_i - p_j)/h = p_j/h + const_i, one column."""
    pos_q, pos_k = spatial.positions_q.to(dtype), spatial.positions_k.to(dtype)
    valid_q, valid_k = ~pos_q.isnan().any(-1), ~pos_k.isnan().any(-1)
    center = pos_k.nan_to_num(0.0).sum(0) / valid_k.sum().clamp_min(1)
    pos_q, pos_k = (pos_q - center).nan_to_num(0.0), (pos_k - center).nan_to_num(0.0)
    inv = (1.0 / spatial.bandwidth.to(dtype))[:, None, None]  # [H, 1, 1]
    if spatial.kind == "laplacian":
        return inv * torch.ones_like(pos_q), pos_k
    gate = valid_q.to(dtype)[:, None]
    query = torch.cat([2 * pos_q * gate, gate, pos_q.square().sum(-1, keepdim=True) * gate], -1)
    key = torch.cat([pos_k, -pos_k.square().sum(-1, keepdim=True), (~valid_k).to(dtype)[:, None]], -1)
    return query[None] * inv.square(), key


def _folded_kernel(t: dict, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """SDPA with the terms that carry a gradient folded into extra query/key coordinates (C.9): the key-norm term
    [q', 1] . [k, -||k||^2/h^2] = 2 q.k/h^2 - ||k||^2/h^2 (the ||q||^2 term cancels in the softmax) and a separable
    spatial term (:func:`_spatial_coordinates`). An additive bias with a gradient (the bandwidths') would send SDPA
    to its math path and an N x N score map; this keeps the fused kernel, whose CPU path wants one head size for q,
    k and v: v gets zero columns, dropped afterwards."""
    q, k, v_aug, scale = _augmented_qkv(t, v)
    return _sdpa(q, k, v_aug, t, dropout_p, scale)[..., :v.shape[-1]]


def _augmented_qkv(t: dict, v: torch.Tensor, fold_spatial: bool = True):
    """(q, k, v, scale) with the key-norm term and, with ``fold_spatial``, the separable spatial term as extra
    coordinates (:func:`_folded_kernel`); q is multiplied by the terms' scale (and the scale returned is 1) only when
    a coordinate is added, so with none the inputs come back as they are, without a copy of q."""
    key_bias, spatial = t["key_bias"], t["spatial"]
    if key_bias is None and (spatial is None or not fold_spatial):
        return t["q"], t["k"], v, t["scale"]
    q, k = t["q"] * t["scale"], t["k"]
    q_cols, k_cols = [q], [k]
    if key_bias is not None:
        q_cols.append(q.new_ones(q.shape[:-1] + (1,)))
        k_cols.append(key_bias.transpose(-2, -1).expand(k.shape[:-1] + (1,)))
    if spatial is not None and fold_spatial:
        query, key = _spatial_coordinates(spatial, q.dtype)
        q_cols.append(query.expand(q.shape[:1] + query.shape))
        k_cols.append(key.expand(k.shape[:2] + key.shape))
    q_aug, k_aug = (torch.cat(q_cols, -1), torch.cat(k_cols, -1)) if len(q_cols) > 1 else (q, k)
    extra = q_aug.shape[-1] - v.shape[-1]
    v_aug = torch.cat([v, v.new_zeros(v.shape[:-1] + (extra,))], -1) if extra > 0 else v
    return q_aug, k_aug, v_aug, 1.0


def kernel_weights(q: torch.Tensor, k: torch.Tensor, kernel: str = "dot", **options) -> dict[str, torch.Tensor]:
    """The explicit weights of :func:`kernel_attention` (same keywords but ``v`` / ``dropout_p``): ``weights``
    w_ij [B, H, Nq, Nk] (C.9) and, with a spatial term, its two factors each normalised over the keys — ``range``
    softmax_j(range log-kernel + m_ij) and ``spatial`` softmax_j(S_ij + m_ij) — whose renormalised product is
    ``weights`` (C.5)."""
    t = kernel_terms(q, k, kernel, **options)
    if isinstance(t["spatial"], SpatialKernel):
        t["spatial"] = t["spatial"].full()
    mask = _dense_mask(t)
    range_logits = _sum_biases(t["q"] @ t["k"].transpose(-2, -1) * t["scale"], t["key_bias"], mask)
    out = {"weights": _sum_biases(range_logits, t["spatial"]).softmax(-1)}
    if t["spatial"] is not None:
        out["range"] = range_logits.softmax(-1)
        out["spatial"] = _sum_biases(t["spatial"].expand(range_logits.shape), mask).softmax(-1)
    return out


def twicing(smooth: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    """Twicing (2A - A^2) V = AV + A(V - AV): smooth, then add back the smoothed method noise (C.4)."""
    first = smooth(v)
    return first + smooth(v - first)


def boosting(smooth: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor, steps: int) -> torch.Tensor:
    """k-step L2 boosting z_k = z_{k-1} + A(V - z_{k-1}), z_0 = AV, i.e. [I - (I - A)^{k+1}] V (C.4)."""
    if steps < 0:
        raise ValueError(f"steps: expected >= 0, got {steps}")
    z = smooth(v)
    for _ in range(steps):
        z = z + smooth(v - z)
    return z


def _as_tensor(value, like: torch.Tensor) -> torch.Tensor:
    return value.to(like.dtype) if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=like.dtype,
                                                                                        device=like.device)


def _per_head(values: torch.Tensor, heads: int) -> torch.Tensor:
    if values.ndim == 0:
        return values.reshape(1, 1, 1, 1)
    if values.shape != (heads,):
        raise ValueError(f"bandwidth: expected a scalar or shape [{heads}], got {list(values.shape)}")
    return values.reshape(1, heads, 1, 1)


__all__ = [
    "KERNELS", "SCORE_BLOCK_BYTES", "SPATIAL_BACKENDS", "SPATIAL_KERNELS", "SpatialKernel", "boosting",
    "check_bandwidth", "default_range_bandwidth", "kernel_attention", "kernel_terms", "kernel_weights",
    "last_query_spatial_log_kernel", "spatial_coefficient", "spatial_log_kernel",
    "token_positions", "twicing",
]
