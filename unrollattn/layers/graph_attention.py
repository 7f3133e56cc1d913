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

Steps 1 (the metric), 2 and 3 are :class:`GraphFilter`, the one implementation of "the graph is the attention":
the uGLR / uGTV restoration blocks (``unrollattn.vision.restoration.GraphBlock``) are built on it too, with
pixel-grid CNN features, the interpolation constraint H x = y and learned head mixing instead of W_f, W_v and
the output projection.
"""
from __future__ import annotations

import math
from abc import abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.graph import (
    NORMALIZATIONS, SIMILARITIES, Neighbourhood, build_neighbourhood, degree, edge_weights, equivalent_band,
    is_grid_kind, is_sequence_kind, laplacian_operator, metric_features, neighbour_mask, neighbourhood_size,
    row_inner_weights,
)
from ..core.solvers import glr_denoise, glr_interpolate, gtv_admm_denoise, gtv_admm_interpolate
from ..core.subspace import merge_heads
from ..core.validation import check_float, check_int
from ..registry import register_attention
from .attention import AttentionLayer
from .base import RecordsAttention

PRIORS = ("glr", "gtv")
METRICS = ("diagonal", "full")
STEP_SIZES = ("learned", "exact")


def _per_head(t: torch.Tensor) -> torch.Tensor:
    """[..., G] -> [..., G, 1, 1], broadcastable against node signals [B, G, N, C]."""
    return t[..., None, None]


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")


def _positive(name: str, value) -> float:
    return check_float(name, value, 0.0, open_min=True)


def _log_parameter(name: str, value, shape: tuple[int, ...], **factory) -> nn.Parameter:
    """A learned positive quantity of ``shape`` stored as its log, initialised at ``value`` (option ``name``, > 0)."""
    return nn.Parameter(torch.full(shape, math.log(_positive(name, value)), **factory))


class GraphFilter(nn.Module, RecordsAttention):
    """The learned graph and its unrolled low-pass filter, per head: the one implementation of "the graph is the
    attention" shared by the ``glr`` / ``gtv`` token mixers and the uGLR / uGTV restoration blocks.

    Owners subclass it (so the parameters keep their names in the owners' checkpoints), build their node-feature map
    and call :meth:`init_graph`, then :meth:`init_solver`. Given node features f [B, G, N, K] and values on a
    :class:`Neighbourhood`, :meth:`filter_values` returns the filtered values: the edge weights (:meth:`learned_graph`)
    and then either the denoising filter (:meth:`filter`: GLR (I + μL) out = v by CG, or GTV ADMM with λ) or, given
    the observed nodes, the interpolation (:meth:`interpolate`: min prior s.t. x_o = y, or the relaxed data term
    μ‖Hx − y‖² + prior), and the learned head mixing when ``mix_heads``.

    Learned, per head (positive quantities as logs):
      * ``metric``: log diag(M) [G, K] ("diagonal") or Q [G, K, K] with M = QᵀQ ("full"); M = ``metric_init``·I
        at init;
      * ``mix`` [G] (``mix_heads``): convex head mixing, 1/G at init;
      * ``log_mu`` [G] (glr) / ``log_lam`` [G] (gtv): the denoising strength (``smoothing``);
        ``log_fidelity`` [G]: the data-term weight of relaxed interpolation (``fidelity``);
      * ``log_rho`` [iters, G] (gtv): the ADMM penalty per iteration;
      * ``step_sizes="learned"``: CG's log α and log β — [iters, G] and [iters − 1, G] (glr), [iters, cg_iters, G]
        and [iters, cg_iters − 1, G] (gtv, per ADMM x-step); "exact": CG's own step sizes, in the degree-weighted
        inner product on a row-normalised graph (:attr:`needs_degrees`).
    """

    def init_graph(self, heads: int, feature_dim: int, *, metric: str = "diagonal", metric_init: float = 1.0,
                   normalization: str = "symmetric", similarity: str = "mahalanobis", clip: float | None = None,
                   mix_heads: bool = False, device=None, dtype=None) -> None:
        """The learned metric (and the head mixing) of ``heads`` graphs on K = ``feature_dim`` features per node."""
        for name, value, allowed in (("normalization", normalization, NORMALIZATIONS), ("metric", metric, METRICS),
                                     ("similarity", similarity, SIMILARITIES)):
            _check_choice(name, value, allowed)
        heads, feature_dim = check_int("heads", heads), check_int("feature_dim", feature_dim)
        self.metric_kind, self.normalization, self.similarity, self.clip = metric, normalization, similarity, clip
        self.mix_heads = bool(mix_heads)
        dd = {"device": device, "dtype": dtype}
        if metric == "diagonal":  # log diag(M)
            self.metric = _log_parameter("metric_init", metric_init, (heads, feature_dim), **dd)
        else:  # Q with M = QᵀQ
            scale = math.sqrt(_positive("metric_init", metric_init))
            self.metric = nn.Parameter(scale * torch.eye(feature_dim, **dd).repeat(heads, 1, 1))
        if self.mix_heads:
            self.mix = nn.Parameter(torch.full((heads,), 1.0 / heads, **dd))

    def init_solver(self, prior: str, iters: int, *, cg_iters: int | None = None, step_sizes: str = "learned",
                    alpha_init: float = 1.0, beta_init: float = 0.05, rho_init: float | None = None,
                    smoothing: float | None = None, fidelity: float | None = None, device=None, dtype=None) -> None:
        """The solver of ``prior`` ("glr": ``iters`` CG steps; "gtv": ``iters`` ADMM iterations of ``cg_iters`` CG
        steps, penalty ``rho_init``) with CG steps (α, β) at init ``alpha_init``, ``beta_init`` when learned;
        ``smoothing``: μ (glr) / λ (gtv) of the denoising filter; ``fidelity``: relaxed interpolation's data weight
        (None: the hard constraint x_o = y). Call after :meth:`init_graph`."""
        _check_choice("prior", prior, PRIORS)
        _check_choice("step_sizes", step_sizes, STEP_SIZES)
        _positive("alpha_init", alpha_init), _positive("beta_init", beta_init)  # checked even if exact steps
        self.prior, self.step_mode = prior, step_sizes
        self.iters = check_int("iters", iters)
        self.cg_iters = check_int("cg_iters", cg_iters) if prior == "gtv" else cg_iters
        self.relaxed = fidelity is not None
        g, dd = self.metric.shape[0], {"device": device, "dtype": dtype}
        if smoothing is not None:
            if prior == "glr":
                self.log_mu = _log_parameter("mu_init", smoothing, (g,), **dd)
            else:
                self.log_lam = _log_parameter("lam_init", smoothing, (g,), **dd)
        if self.relaxed:
            self.log_fidelity = _log_parameter("fidelity", fidelity, (g,), **dd)
        if prior == "gtv":
            self.log_rho = _log_parameter("rho_init", rho_init, (self.iters, g), **dd)
        if step_sizes == "learned":
            steps = (self.iters,) if prior == "glr" else (self.iters, self.cg_iters)  # CG steps per solve
            self.log_alpha = _log_parameter("alpha_init", alpha_init, (*steps, g), **dd)
            self.log_beta = (_log_parameter("beta_init", beta_init, (*steps[:-1], steps[-1] - 1, g), **dd)
                             if steps[-1] > 1 else None)

    # ------------------------------------------------------------------ graph
    def learned_graph(self, f: torch.Tensor, nbhd: Neighbourhood, *, mask: torch.Tensor | None = None,
                      with_degrees: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(edge weights [B, G, N, k] on ``nbhd`` from node features f [B, G, N, K] (A.4), their log-degrees
        [B, G, N] if ``with_degrees`` else None); ``mask`` [.., N, k]: edges to drop (bool) or log-weight offsets."""
        out = edge_weights(f, nbhd, metric=self.metric, normalization=self.normalization, similarity=self.similarity,
                           clip=self.clip, mask=mask, return_log_degree=with_degrees)
        return out if with_degrees else (out, None)

    @property
    def needs_degrees(self) -> bool:
        """Exact GLR-CG on a row-normalised (non-symmetric) Laplacian runs in the degree-weighted inner product, in
        which D⁻¹L is self-adjoint; GTV's C_wᵀC_w is symmetric for any weights."""
        return self.prior == "glr" and self.step_mode == "exact" and self.normalization == "row"

    def step_sizes(self):
        """None (exact CG); glr: (alpha [iters, G, 1, 1], beta [iters − 1, G, 1, 1] or None); gtv: one such pair
        (over ``cg_iters``) per ADMM iteration."""
        if self.step_mode == "exact":
            return None
        alpha = _per_head(self.log_alpha.exp())
        beta = _per_head(self.log_beta.exp()) if self.log_beta is not None else None
        if self.prior == "glr":
            return alpha, beta
        return [(alpha[t], None if beta is None else beta[t]) for t in range(self.iters)]

    # ------------------------------------------------------------------ solvers
    def _laplacian(self, weights: torch.Tensor, nbhd: Neighbourhood):
        return laplacian_operator(weights, nbhd.index, offsets=nbhd.flat_offsets)

    def _inner_weights(self, log_degree: torch.Tensor | None) -> torch.Tensor | None:
        return row_inner_weights(log_degree) if self.needs_degrees else None

    def _edges(self, weights: torch.Tensor, nbhd: Neighbourhood) -> tuple[torch.Tensor, torch.Tensor, list]:
        """(weights, index) of the undirected edge set and the per-iteration ρ [G, 1, 1] (GTV)."""
        index_e, _, cols = nbhd.edges()
        rho = _per_head(self.log_rho.exp())
        return weights.index_select(-1, cols), index_e, [rho[t] for t in range(self.iters)]

    def filter(self, v: torch.Tensor, weights: torch.Tensor, nbhd: Neighbourhood, causal: bool = False,
               log_degree: torch.Tensor | None = None) -> torch.Tensor:
        """Denoising low-pass filter of v [B, G, N, p] on the graph (weights [B, G, N, k], nbhd): glr
        (I + μL) out = v, gtv min ½‖out − v‖² + λ‖C_w out‖₁; ``causal``: past-only graph (gtv's directed x-step);
        ``log_degree`` [B, G, N]: the graph's log-degrees, required when :attr:`needs_degrees`."""
        steps = self.step_sizes()
        if self.prior == "glr":
            return glr_denoise(v, self._laplacian(weights, nbhd), _per_head(self.log_mu.exp()), self.iters,
                               step_sizes=steps, inner_weights=self._inner_weights(log_degree))
        w_e, index_e, rhos = self._edges(weights, nbhd)
        return gtv_admm_denoise(v, w_e, index_e, _per_head(self.log_lam.exp()), rhos, self.iters, self.cg_iters,
                                step_sizes=steps, directed=causal, offsets=nbhd.edge_flat_offsets)

    def interpolate(self, observed: torch.Tensor, y: torch.Tensor, x0: torch.Tensor, weights: torch.Tensor,
                    nbhd: Neighbourhood, log_degree: torch.Tensor | None = None) -> torch.Tensor:
        """Interpolation per head [B, G, N, C] of the samples y [B, 1|G, N, C] at the ``observed`` nodes (bool,
        broadcastable to y), warm-started at x0 (like y): glr min xᵀLx, gtv min ‖C_w x‖₁, s.t. x_o = y exactly,
        or with ``fidelity`` + μ‖x_o − y‖² (μ per head, the system balanced by the degrees)."""
        g = weights.shape[1]
        y, x0 = y.expand(-1, g, -1, -1), x0.expand(-1, g, -1, -1)
        fidelity = _per_head(self.log_fidelity.exp()) if self.relaxed else None
        steps = self.step_sizes()
        if self.prior == "glr":
            return glr_interpolate(observed, y, self._laplacian(weights, nbhd), self.iters, x0=x0, step_sizes=steps,
                                   fidelity=fidelity, diagonal=degree(weights) if self.relaxed else None,
                                   inner_weights=self._inner_weights(log_degree))
        w_e, index_e, rhos = self._edges(weights, nbhd)
        return gtv_admm_interpolate(observed, y, w_e, index_e, self.iters, self.cg_iters, rhos, x0=x0,
                                    step_sizes=steps, fidelity=fidelity, offsets=nbhd.edge_flat_offsets)

    def filter_values(self, f: torch.Tensor, v: torch.Tensor, nbhd: Neighbourhood, *,
                      observed: torch.Tensor | None = None, x0: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None, causal: bool = False, dropout=None) -> torch.Tensor:
        """The filtered values on the learned graph of node features f [B, G, N, K] on ``nbhd``: :meth:`filter` of
        v [B, G, N, p], or with ``observed`` :meth:`interpolate` of the samples v from x0; ``mask``: edge mask of
        :meth:`learned_graph`; ``dropout``: applied to the edge weights. Returns [B, G, N, C], or [B, N, C] with
        ``mix_heads``."""
        weights, log_degree = self.learned_graph(f, nbhd, mask=mask, with_degrees=self.needs_degrees)
        if self.record_attention:  # the graph is the attention (A.4): weights [B, G, N, k] on the neighbour table
            self.record(edge_weights=weights, neighbour_index=nbhd.index, neighbour_valid=nbhd.valid)
        if dropout is not None:
            weights = dropout(weights)
        if observed is None:
            out = self.filter(v, weights, nbhd, causal, log_degree)
        else:
            out = self.interpolate(observed, v, x0, weights, nbhd, log_degree)
        return torch.einsum("g,bgnc->bnc", self.mix, out) if self.mix_heads else out


class GraphAttentionBase(AttentionLayer, GraphFilter):
    """Shared graph learning for ``glr`` / ``gtv`` (see module docstring): node features f = W_f x, values W_v x,
    the :class:`GraphFilter` on the token neighbourhood, output projection.

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
    prior: str  # "glr" | "gtv": the solver of GraphFilter.init_solver, set by each layer class

    def __init__(self, dim, num_heads=8, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        opts = self.options
        self.neighbourhood = opts.get("neighbourhood", "window3")
        if not (is_grid_kind(self.neighbourhood) or (is_sequence_kind(self.neighbourhood)
                                                     and self.neighbourhood.startswith("band"))):
            raise ValueError(f"neighbourhood: expected '4', '8', 'window<k>' or 'band<w>' (causal bands come from "
                             f"is_causal=True), got {self.neighbourhood!r}")
        neighbourhood_size(self.neighbourhood)  # validates window sizes
        self.feature_dim = check_int("feature_dim", int(opts.get("feature_dim", 8)))
        self.normalize_features = bool(opts.get("normalize_features", False))
        g, k, dd = self.num_heads, self.feature_dim, self.factory
        self.features = nn.Linear(self.dim, g * k, bias=self.qkv_bias, **dd)  # f = F_θ(x), K per head (A.4)
        self.values = nn.Linear(self.dim, self.inner_dim, bias=self.qkv_bias, **dd)
        self.proj = nn.Linear(self.inner_dim, self.dim, bias=self.proj_bias, **dd)
        self.init_graph(g, k, metric=opts.get("metric", "diagonal"), metric_init=float(opts.get("metric_init", 1.0 / k)),
                        normalization=opts.get("normalization", "symmetric"),
                        similarity=opts.get("similarity", "mahalanobis"), clip=opts.get("clip"), **dd)
        self.init_solver(self.prior, int(opts.get("iters", self.default_iters)),
                         step_sizes=opts.get("step_sizes", "learned"), **self.solver_options(), **dd)
        self.attn_drop = nn.Dropout(self.attn_drop_p)

    @abstractmethod
    def solver_options(self) -> dict:
        """The prior's own keywords of :meth:`GraphFilter.init_solver` (smoothing, step sizes at init, ...)."""

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

    @staticmethod
    def _edge_mask(attn_mask, nbhd: Neighbourhood, prefix: int):
        return None if attn_mask is None else neighbour_mask(attn_mask, nbhd.index, offset=prefix)

    def graph(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False, grid=None, *,
              return_log_degree: bool = False):
        """The learned graph for tokens x [B, N, C]: (weights [B, G, N−P, k], neighbourhood, P), and with
        ``return_log_degree`` the log-degrees [B, G, N−P] of the un-normalised weights as a fourth item."""
        grid = grid or self.grid
        nbhd, prefix = self.plan(x.shape[1], is_causal, grid)
        weights, log_degree = self.learned_graph(self.node_features(x)[:, :, prefix:], nbhd,
                                                 mask=self._edge_mask(attn_mask, nbhd, prefix),
                                                 with_degrees=return_log_degree)
        return (weights, nbhd, prefix, log_degree) if return_log_degree else (weights, nbhd, prefix)

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
        weights = torch.softmax(logits, dim=-1)
        if self.record_attention:  # prefix rows [B, G, P, N]: dense like softmax attention
            self.record(prefix_weights=weights)
        return self.attn_drop(weights) @ v

    # ------------------------------------------------------------------ forward
    def attend(self, x, attn_mask, is_causal, grid):
        if is_causal and self.step_mode == "exact":
            raise ValueError("step_sizes='exact' cannot be causal: exact CG step sizes are inner products over all "
                             "tokens; use step_sizes='learned' with is_causal=True")
        b, n, _ = x.shape
        f = self.node_features(x)
        v = self.values(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, G, N, p]
        nbhd, prefix = self.plan(n, is_causal, grid)
        out = self.filter_values(f[:, :, prefix:], v[:, :, prefix:], nbhd, causal=is_causal, dropout=self.attn_drop,
                                 mask=self._edge_mask(attn_mask, nbhd, prefix))
        if prefix:
            out = torch.cat([self._prefix_rows(f, v, prefix, attn_mask), out], dim=2)
        return self.proj(merge_heads(out))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"neighbourhood={self.neighbourhood!r}, feature_dim={self.feature_dim}, "
                f"iters={self.iters}, normalization={self.normalization!r}, metric={self.metric_kind!r}, "
                f"step_sizes={self.step_mode!r}")


@register_attention("glr", params_per_layer="2 d^2 + d*H*K (+ H*K metric)",
                    summary="learned sparse graph + unrolled CG on (I + mu L) out = v (uGLR low-pass filter)")
class GraphLaplacianAttention(GraphAttentionBase):
    """``glr``: out = (I + μL)^{-1} v approximated by ``iters`` unrolled CG steps (A.2, unconstrained form).

    Extra option ``mu_init`` (1.0). Learned per head: log μ; with ``step_sizes="learned"`` also log α_k
    (``iters`` values) and log β_k (``iters``−1), initialised as a stable Richardson iteration
    (α = 2/(2 + μ·λ_bound), β = 0.05).
    """

    option_names = GraphAttentionBase.option_names + ("mu_init",)
    prior = "glr"

    def solver_options(self):
        mu_init = _positive("mu_init", float(self.options.get("mu_init", 1.0)))
        return {"smoothing": mu_init, "alpha_init": self._initial_alpha(mu_init)}


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
    prior = "gtv"

    def solver_options(self):
        rho_init = _positive("rho_init", float(self.options.get("rho_init", 1.0)))
        return {"cg_iters": int(self.options.get("cg_iters", 2)), "rho_init": rho_init,
                "smoothing": float(self.options.get("lam_init", 0.1)), "alpha_init": self._initial_alpha(rho_init)}


__all__ = ["GraphAttentionBase", "GraphFilter", "GraphLaplacianAttention", "GraphTotalVariationAttention"]
