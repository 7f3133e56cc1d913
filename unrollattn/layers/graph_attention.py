"""Graph-smoothness attention (docs/papers.md A.4): ``glr`` and ``gtv`` token mixers.

The learned graph *is* the attention matrix and an unrolled solver *is* the value aggregation:

1. per head g, low-dimensional node features f = W_f x ∈ R^K (``feature_dim``, tied query/key: no
   separate W_Q, W_K) and a per-head metric M (``metric`` "diagonal": exp of log-params, or "full":
   M = QᵀQ);
2. a sparse graph on the token neighbourhood, w_ij = exp(−(f_i − f_j)ᵀM(f_i − f_j)) (A.4), normalised
   (``normalization`` "symmetric" (default, keeps the operators symmetric PSD), "row" (softmax over the
   neighbourhood, the self-attention form; exact CG then runs in the degree-weighted inner product, in which
  I + μD⁻¹L is self-adjoint, see ``core.solvers``) or "none");
3. a graph low-pass filter of the value projection v = W_v x, per head:
   * ``glr``: K unrolled CG steps on (I + μL) out = v, i.e. min ‖out − v‖² + μ outᵀL out (A.2 without
     the interpolation constraint);
   * ``gtv``: unrolled ADMM for min ½‖out − v‖² + λ‖C_w out‖₁ (A.3), each x-step a few CG steps;
4. output projection.

Token geometry (which tokens are neighbours):
* a 2-D patch grid, when known from ``set_geometry(grid=(H, W), num_prefix_tokens=P)`` (the unrollattn
  vision builder calls it) or from ``forward(..., grid=(H, W))``: ``neighbourhood`` "4", "8" or
  "window{k}" on the H×W patch tokens. Prefix tokens (cls, registers) are not graph nodes: each one
  is a dense softmax average of v over all N tokens with the same learned similarity (one row-normalised
  graph-filter step, O(P·N)); patch tokens do not read from prefix tokens.
* otherwise a 1-D sequence over all N tokens: "band{w}" if given, else the band with as many neighbours
  as the 2-D kind ("window3"/"8" -> "band4", "4" -> "band2", "window5" -> "band12").
* ``is_causal=True``: the causal band "causal{w}" (same w, plus a self-loop so every node has degree > 0)
  over all N tokens, whatever the grid. The Laplacian of a causal graph is lower-triangular, so with the
  default learned CG steps every output depends on its past only; ``gtv`` uses the directed x-step
  (``gtv_admm_denoise(directed=True)``). Exact CG (``step_sizes="exact"``) is refused with is_causal:
  its step sizes are inner products over all tokens.

``attn_mask``: a bool mask (True = may attend) or an additive float mask, broadcastable to [B, H, N, N]
as for SDPA, is gathered onto the neighbourhood and applied to the edges before normalisation
(False / −inf drops the edge i -> j; the graph may then become non-symmetric).

Learned positive quantities (μ, λ, ρ, CG α/β, the diagonal metric) are stored as logs and exponentiated.
"""
from __future__ import annotations

import math
from abc import abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.graph import (
    NORMALIZATIONS, SIMILARITIES, Neighbourhood, build_neighbourhood, edge_weights, equivalent_band, is_grid_kind,
    is_sequence_kind, laplacian_matvec, metric_features, neighbour_mask, neighbourhood_size, row_inner_weights,
)
from ..core.solvers import glr_denoise, gtv_admm_denoise
from ..core.subspace import merge_heads
from ..registry import register_attention
from .attention import AttentionLayer

METRICS = ("diagonal", "full")
STEP_SIZES = ("learned", "exact")


class GraphAttentionBase(AttentionLayer):
    """Shared graph learning for ``glr`` / ``gtv`` (see module docstring).

    Options: ``neighbourhood`` ("window3"), ``feature_dim`` K (8), ``iters`` (3 for glr, 2 for gtv),
    ``normalization`` ("symmetric"), ``metric`` ("diagonal"), ``similarity`` ("mahalanobis" | "dot"),
    ``clip`` (None; clamps the log-weight like the reference codes' ±10), ``normalize_features`` (False;
    L2-normalise f per node), ``metric_init`` (M = metric_init·I at init, default 1/K so that initial
    distances are O(1)), ``step_sizes`` ("learned" | "exact" CG).

    Cached decoding (``decode``) recomputes the prefix (O(T^2) per new token): the unrolled solver couples every
    token with its graph neighbours over several steps, so a new token's output needs the filtered prefix again.
    """

    decode_recomputes_prefix = True
    option_names = ("neighbourhood", "feature_dim", "iters", "normalization", "metric", "similarity", "clip",
                    "normalize_features", "metric_init", "step_sizes")
    default_iters = 3

    def __init__(self, dim, num_heads=8, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        opts = self.options
        self.neighbourhood = opts.get("neighbourhood", "window3")
        if not (is_grid_kind(self.neighbourhood) or (is_sequence_kind(self.neighbourhood)
                                                     and self.neighbourhood.startswith("band"))):
            raise ValueError(f"neighbourhood: expected '4', '8', 'window<k>' or 'band<w>' (causal bands come from "
                             f"is_causal=True), got {self.neighbourhood!r}")
        neighbourhood_size(self.neighbourhood)  # validates window sizes
        self.feature_dim = int(opts.get("feature_dim", 8))
        self.iters = int(opts.get("iters", self.default_iters))
        self.normalization = opts.get("normalization", "symmetric")
        self.metric_kind = opts.get("metric", "diagonal")
        self.similarity = opts.get("similarity", "mahalanobis")
        self.clip = opts.get("clip")
        self.normalize_features = bool(opts.get("normalize_features", False))
        self.step_mode = opts.get("step_sizes", "learned")
        metric_init = float(opts.get("metric_init", 1.0 / max(self.feature_dim, 1)))
        for name, value, allowed in (("normalization", self.normalization, NORMALIZATIONS),
                                     ("metric", self.metric_kind, METRICS),
                                     ("similarity", self.similarity, SIMILARITIES),
                                     ("step_sizes", self.step_mode, STEP_SIZES)):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
        if self.feature_dim < 1 or self.iters < 1 or metric_init <= 0:
            raise ValueError(f"expected feature_dim >= 1, iters >= 1 and metric_init > 0, got feature_dim="
                             f"{self.feature_dim}, iters={self.iters}, metric_init={metric_init}")
        g, k, dd = self.num_heads, self.feature_dim, self.factory
        self.features = nn.Linear(self.dim, g * k, bias=self.qkv_bias, **dd)  # f = F_θ(x), K per head (A.4)
        self.values = nn.Linear(self.dim, self.inner_dim, bias=self.qkv_bias, **dd)
        self.proj = nn.Linear(self.inner_dim, self.dim, bias=self.proj_bias, **dd)
        if self.metric_kind == "diagonal":  # log diag(M)
            self.metric = nn.Parameter(torch.full((g, k), math.log(metric_init), **dd))
        else:  # Q with M = QᵀQ
            self.metric = nn.Parameter(math.sqrt(metric_init) * torch.eye(k, **dd).repeat(g, 1, 1))
        self.attn_drop = nn.Dropout(self.attn_drop_p)

    # ------------------------------------------------------------------ geometry and graph
    def _spectral_bound(self) -> float:
        """Bound used only to initialise step sizes: λ_max(L) ≲ 2 (normalised) or 2k (weights ≤ 1)."""
        return 2.0 if self.normalization != "none" else 2.0 * neighbourhood_size(self.neighbourhood)

    def _initial_alpha(self, strength: float) -> float:
        """Richardson step 2/(λ_min + λ_max) for I + strength·L, so the unrolled filter is stable at init."""
        return 2.0 / (2.0 + strength * self._spectral_bound())

    def plan(self, n: int, is_causal: bool, grid) -> tuple[Neighbourhood, int]:
        """(neighbourhood, number of prefix tokens outside the graph) for N = ``n`` tokens."""
        device = self.features.weight.device
        if is_causal:
            width = equivalent_band(self.neighbourhood)[len("band"):]
            return build_neighbourhood(f"causal{width}", (n,), include_self=True, device=device), 0
        if grid is None or is_sequence_kind(self.neighbourhood):
            return build_neighbourhood(equivalent_band(self.neighbourhood), (n,), device=device), 0
        h, w = int(grid[0]), int(grid[1])
        prefix = self.num_prefix_tokens
        if n - prefix != h * w:
            raise ValueError(f"grid: expected N = num_prefix_tokens + H*W = {prefix} + {h}*{w} = {prefix + h * w} "
                             f"tokens for grid ({h}, {w}), got N = {n}")
        return build_neighbourhood(self.neighbourhood, (h, w), device=device), prefix

    def node_features(self, x: torch.Tensor) -> torch.Tensor:
        """f [B, G, N, K] per head."""
        b, n, _ = x.shape
        f = self.features(x).view(b, n, self.num_heads, self.feature_dim).transpose(1, 2)
        return F.normalize(f, dim=-1) if self.normalize_features else f

    def graph(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False, grid=None, *,
              return_log_degree: bool = False):
        """The learned graph for tokens x [B, N, C]: (weights [B, G, N−P, k], neighbourhood, P), and with
        ``return_log_degree`` the log-degrees [B, G, N−P] of the un-normalised weights as a fourth item."""
        grid = grid or self.grid
        nbhd, prefix = self.plan(x.shape[1], is_causal, grid)
        weights, log_degree = self._weights(self.node_features(x), nbhd, prefix, attn_mask, return_log_degree)
        return (weights, nbhd, prefix, log_degree) if return_log_degree else (weights, nbhd, prefix)

    @property
    def needs_degrees(self) -> bool:
        """Whether ``filter`` needs the graph's log-degrees (exact CG on a row-normalised graph)."""
        return False

    def _weights(self, f, nbhd, prefix, attn_mask, with_degrees: bool = False):
        """(edge weights [B, G, N−P, k], their log-degrees [B, G, N−P] if ``with_degrees`` else None)."""
        mask = None if attn_mask is None else neighbour_mask(attn_mask, nbhd.index, offset=prefix)
        out = edge_weights(f[:, :, prefix:], nbhd, metric=self.metric, normalization=self.normalization,
                           similarity=self.similarity, clip=self.clip, mask=mask, return_log_degree=with_degrees)
        return out if with_degrees else (out, None)

    def _prefix_rows(self, f, v, prefix, attn_mask):
        """Prefix tokens: dense softmax over all tokens of the same similarity, applied to v (O(P·N))."""
        g = metric_features(f, self.metric)
        gp = g[:, :, :prefix]
        if self.similarity == "mahalanobis":
            logits = -(gp.unsqueeze(-2) - g.unsqueeze(-3)).square().sum(-1)
            if self.clip is not None:
                logits = logits.clamp_min(-float(self.clip))
        else:
            logits = gp @ g.transpose(-2, -1)
            if self.clip is not None:
                logits = logits.clamp(-float(self.clip), float(self.clip))
        if attn_mask is not None:
            rows = attn_mask[..., :prefix, :]
            logits = logits.masked_fill(~rows, float("-inf")) if rows.dtype == torch.bool else logits + rows.to(logits.dtype)
        return self.attn_drop(torch.softmax(logits, dim=-1)) @ v

    # ------------------------------------------------------------------ forward
    def attend(self, x, attn_mask, is_causal, grid):
        if is_causal and self.step_mode == "exact":
            raise ValueError("step_sizes='exact' cannot be causal: exact CG step sizes are inner products over all "
                             "tokens; use step_sizes='learned' with is_causal=True")
        b, n, _ = x.shape
        f = self.node_features(x)
        v = self.values(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, G, N, p]
        nbhd, prefix = self.plan(n, is_causal, grid)
        weights, log_degree = self._weights(f, nbhd, prefix, attn_mask, self.needs_degrees)
        out = self.filter(v[:, :, prefix:], self.attn_drop(weights), nbhd, is_causal, log_degree)
        if prefix:
            out = torch.cat([self._prefix_rows(f, v, prefix, attn_mask), out], dim=2)
        return self.proj(merge_heads(out))

    @abstractmethod
    def filter(self, v: torch.Tensor, weights: torch.Tensor, nbhd: Neighbourhood, causal: bool,
               log_degree: torch.Tensor | None = None) -> torch.Tensor:
        """Graph low-pass filter of v [B, G, N, p] on the graph (weights [B, G, N, k], nbhd); ``causal``: past-only graph;
        ``log_degree`` [B, G, N]: the graph's log-degrees, required when ``needs_degrees``."""

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"neighbourhood={self.neighbourhood!r}, feature_dim={self.feature_dim}, "
                f"iters={self.iters}, normalization={self.normalization!r}, metric={self.metric_kind!r}, "
                f"step_sizes={self.step_mode!r}")


def _per_head(t: torch.Tensor) -> torch.Tensor:
    """[..., G] -> [..., G, 1, 1], broadcastable against node signals [B, G, N, C]."""
    return t[..., None, None]


@register_attention("glr", params_per_layer="2 d^2 + d*H*K (+ H*K metric)",
                    summary="learned sparse graph + unrolled CG on (I + mu L) out = v (uGLR low-pass filter)")
class GraphLaplacianAttention(GraphAttentionBase):
    """``glr``: out = (I + μL)^{-1} v approximated by ``iters`` unrolled CG steps (A.2, unconstrained form).

    Extra option ``mu_init`` (1.0). Learned per head: log μ; with ``step_sizes="learned"`` also log α_k
    (``iters`` values) and log β_k (``iters``−1), initialised as a stable Richardson iteration
    (α = 2/(2 + μ·λ_bound), β = 0.05).
    """

    option_names = GraphAttentionBase.option_names + ("mu_init",)

    def __init__(self, dim, num_heads=8, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        mu_init = float(self.options.get("mu_init", 1.0))
        if mu_init <= 0:
            raise ValueError(f"mu_init: expected > 0, got {mu_init}")
        g, dd = self.num_heads, self.factory
        self.log_mu = nn.Parameter(torch.full((g,), math.log(mu_init), **dd))
        if self.step_mode == "learned":
            self.log_alpha = nn.Parameter(torch.full((self.iters, g), math.log(self._initial_alpha(mu_init)), **dd))
            self.log_beta = (nn.Parameter(torch.full((self.iters - 1, g), math.log(0.05), **dd))
                             if self.iters > 1 else None)

    def step_sizes(self):
        """(alpha [K, G, 1, 1], beta [K−1, G, 1, 1]) for ``conjugate_gradient``, or None for exact CG."""
        if self.step_mode == "exact":
            return None
        beta = _per_head(self.log_beta.exp()) if self.log_beta is not None else None
        return _per_head(self.log_alpha.exp()), beta

    @property
    def needs_degrees(self) -> bool:
        """Exact CG on the row-normalised (non-symmetric) I + μD⁻¹L runs in the degree-weighted inner product."""
        return self.step_mode == "exact" and self.normalization == "row"

    def filter(self, v, weights, nbhd, causal, log_degree=None):
        inner = row_inner_weights(log_degree) if self.needs_degrees else None
        lap = lambda s: laplacian_matvec(weights, nbhd.index, s, offsets=nbhd.flat_offsets)  # noqa: E731
        return glr_denoise(v, lap, _per_head(self.log_mu.exp()), self.iters, step_sizes=self.step_sizes(),
                           inner_weights=inner)


@register_attention("gtv", params_per_layer="2 d^2 + d*H*K (+ H*K metric)",
                    summary="learned sparse graph + unrolled ADMM for min |out - v|^2/2 + lam |C_w out|_1 (uGTV)")
class GraphTotalVariationAttention(GraphAttentionBase):
    """``gtv``: ``iters`` unrolled ADMM iterations of ``gtv_admm_denoise`` on the undirected edge set
    (each neighbour pair once), ``cg_iters`` CG steps per x-step.

    Extra options ``cg_iters`` (2), ``lam_init`` (0.1), ``rho_init`` (1.0). Learned per head: log λ,
    log ρ per ADMM iteration, and with ``step_sizes="learned"`` log α [iters, cg_iters, G] and
    log β [iters, cg_iters − 1, G] (traffic-code layout, A.5).
    """

    option_names = GraphAttentionBase.option_names + ("cg_iters", "lam_init", "rho_init")
    default_iters = 2

    def __init__(self, dim, num_heads=8, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.cg_iters = int(self.options.get("cg_iters", 2))
        lam_init, rho_init = float(self.options.get("lam_init", 0.1)), float(self.options.get("rho_init", 1.0))
        if self.cg_iters < 1 or lam_init <= 0 or rho_init <= 0:
            raise ValueError(f"expected cg_iters >= 1, lam_init > 0 and rho_init > 0, got cg_iters={self.cg_iters}, "
                             f"lam_init={lam_init}, rho_init={rho_init}")
        g, dd = self.num_heads, self.factory
        self.log_lam = nn.Parameter(torch.full((g,), math.log(lam_init), **dd))
        self.log_rho = nn.Parameter(torch.full((self.iters, g), math.log(rho_init), **dd))
        if self.step_mode == "learned":
            alpha0 = self._initial_alpha(rho_init)
            self.log_alpha = nn.Parameter(torch.full((self.iters, self.cg_iters, g), math.log(alpha0), **dd))
            self.log_beta = (nn.Parameter(torch.full((self.iters, self.cg_iters - 1, g), math.log(0.05), **dd))
                             if self.cg_iters > 1 else None)

    def step_sizes(self):
        """One (alpha [cg_iters, G, 1, 1], beta [cg_iters−1, G, 1, 1]) pair per ADMM iteration, or None (exact)."""
        if self.step_mode == "exact":
            return None
        alpha = _per_head(self.log_alpha.exp())
        beta = _per_head(self.log_beta.exp()) if self.log_beta is not None else [None] * self.iters
        return [(alpha[t], beta[t]) for t in range(self.iters)]

    def filter(self, v, weights, nbhd, causal, log_degree=None):  # C_wᵀC_w is symmetric for any weights: no degrees
        index_e, _, cols = nbhd.edges()
        w_e = weights.index_select(-1, cols)
        rho = _per_head(self.log_rho.exp())
        return gtv_admm_denoise(v, w_e, index_e, _per_head(self.log_lam.exp()), [rho[t] for t in range(self.iters)],
                                self.iters, self.cg_iters, step_sizes=self.step_sizes(), directed=causal,
                                offsets=nbhd.edge_flat_offsets)


__all__ = ["GraphAttentionBase", "GraphLaplacianAttention", "GraphTotalVariationAttention"]
