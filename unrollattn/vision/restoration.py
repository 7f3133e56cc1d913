"""uGLR / uGTV: interpretable image interpolation by unrolled graph-smoothness priors (docs/papers.md A.0-A.5).

Registered models (``unrollattn.build_model(name, **options)``, task "restoration"):

    uglr_demosaic   GLR by unrolled CG,   Bayer RGGB mosaic [B, 1, H, W] -> RGB [B, 3, H, W]
    ugtv_demosaic   GTV by unrolled ADMM, Bayer RGGB mosaic [B, 1, H, W] -> RGB [B, 3, H, W]
    uglr_sr2        GLR by unrolled CG,   ×2 grid [B, C, h, w] -> [B, C, 2h, 2w]
    ugtv_sr2        GTV by unrolled ADMM, ×2 grid [B, C, h, w] -> [B, C, 2h, 2w]

Every restoration model (these and the baselines of :mod:`unrollattn.vision.restoration_baselines`)
owns its forward operator H (:attr:`RestorationModel.forward_operator`, :mod:`unrollattn.vision.sampling`:
the Bayer mosaic or the ×2 grid) and is called as ``model(y) -> x_hat`` on ``y = model.observe(x)``.

Structure of :class:`GraphInterpolationNet` (A.0: "a chain of blocks, each preceded by a graph-learning module"):

1. x⁰ = bilinear interpolation of y by the sampling operator (``init="bilinear"``) or Hᵀy (``init="zeros"``);
2. per block b = 1..``blocks``:
   a. f = CNN_b([x^{b-1}, mask]) ∈ R^{G·K} per pixel — a shallow CNN (3×3 convs, ``width`` channels,
      replicate padding) of the current estimate and the sampling mask, K = ``feature_dim`` per head;
   b. per head g: w_ij = exp(−(f_i − f_j)ᵀ M_g (f_i − f_j)) on the pixel-grid ``neighbourhood``
      ("4", "8", "window{k}"), normalised (``normalization``: "symmetric" keeps L SPD for CG, "row" (exact CG
      then runs in the degree-weighted inner product, in which D⁻¹L is self-adjoint), "none"); M_g diagonal (exp
      of log-params) or full (M = QᵀQ) (A.4);
   c. the colour planes are graph signals on that one shared graph; the prior is minimised under the
      interpolation constraint H x = y, warm-started at x^{b-1}. With ``colour_difference`` (default for
      demosaicking) the signals are (R − ĝ, G, B − ĝ), ĝ the block's input green plane (observed there
      as y_R − ĝ, y_G, y_B − ĝ), and ĝ is added back after the solve: the classic colour-difference
      interpolation, exact on the samples like the RGB form (an option; "False" smooths R, G, B directly).
      ``green_smoothing`` = σ > 0 takes ĝ as the green plane blurred by a Gaussian of σ pixels
      (torchvision's ``gaussian_blur``, reflect padding): noise on the green samples then no longer enters
      the R and B differences at full strength, at the cost of the fine detail R and B share with green:
      * ``prior="glr"`` (uGLR, A.2): min xᵀLx s.t. Hx = y by ``iters`` CG steps on L_uu x_u = −L_uo y;
      * ``prior="gtv"`` (uGTV, A.3): min ‖C_w x‖₁ s.t. Hx = y by ``iters`` ADMM iterations, each
        x-step ``cg_iters`` CG steps, learned ρ per iteration and head;
      CG steps are ``step_sizes="learned"`` (α_k, β_k per step and head, stored as logs) or "exact";
   d. heads are mixed with learned weights (init 1/G), then the learned skip
      x^b = p·new + (1 − p)·x^{b−1} (p init ``skip_init`` = 0.95, A.5);
   e. the observed samples are written back bit-exactly (both mixtures are affine in x with weights
      summing to ~1, so this only removes rounding: the outputs keep y exactly).
   Option ``fidelity`` (not in the paper's formulation, which keeps Hx = y): the constraint becomes a data
   term μ‖Hx − y‖² with learned μ (step c solves (μP_o + L)x = μP_o y, resp. ADMM with that x-step, step e
   is skipped), so noisy samples are smoothed instead of copied (see the noise-shift results).
   Steps b, c (its solvers and learned scalars) and d's head mixing are the ``glr`` / ``gtv`` attention layers'
   :class:`~unrollattn.layers.graph_attention.GraphFilter` — the graph is the attention, implemented once; a
   :class:`GraphBlock` adds step a, the sampling operator's constraint, the colour difference and the skip.

Parameters: the CNNs, metrics, mixing, skips and solver scalars — a few thousand to tens of thousands
(default uglr_demosaic: about 27k). Cost per block: O(N·k) per mat-vec, never a dense N×N matrix.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn as nn

from ..core.graph import build_neighbourhood, is_grid_kind, neighbourhood_radius
from ..layers.graph_attention import PRIORS, GraphFilter
from ..registry import register_model
from .sampling import BAYER_PATTERNS, SamplingOperator, build_operator

__all__ = ["GraphInterpolationNet", "GraphBlock", "RestorationModel", "RESTORATION_TASKS"]

RESTORATION_TASKS = ("demosaic", "sr2")
INITS = ("bilinear", "zeros")


class RestorationModel(nn.Module, ABC):
    """Base of every restoration model: owns the forward operator H and validates observations.

    ``task`` "demosaic" (Bayer ``pattern``, RGB output) or "sr2" (×2 grid, ``in_chans`` channels).
    ``forward_operator`` (also ``operator``) is H; ``observe(x)`` = H x is what the model restores.
    Subclasses implement ``restore(y)``; ``forward(y)`` checks y first (rank, channels, NaN, size >= ``min_size``).
    """

    min_size = 4  # the bicubic lattice kernels need H, W >= 4

    def __init__(self, task: str = "demosaic", *, in_chans: int = 3, pattern: str = "RGGB"):
        super().__init__()
        if task not in RESTORATION_TASKS:
            raise ValueError(f"task: expected one of {RESTORATION_TASKS}, got {task!r}")
        if task == "demosaic" and in_chans != 3:
            raise ValueError(f"in_chans: demosaicking reconstructs RGB, expected 3, got {in_chans}")
        if in_chans < 1:
            raise ValueError(f"in_chans: expected >= 1, got {in_chans}")
        if pattern.upper() not in BAYER_PATTERNS:
            raise ValueError(f"pattern: expected one of {BAYER_PATTERNS}, got {pattern!r}")
        self.task = task
        self.in_chans = in_chans
        self.pattern = pattern.upper()
        self.forward_operator: SamplingOperator = build_operator(task, self.pattern)

    @property
    def operator(self) -> SamplingOperator:
        """The forward operator H (short name of :attr:`forward_operator`)."""
        return self.forward_operator

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """y = H x: the observation of an image x [B, C, H, W] that ``forward`` restores."""
        return self.forward_operator(x)

    @property
    def chans(self) -> int:
        """Channels of the reconstructed image."""
        return 3 if self.task == "demosaic" else self.in_chans

    def check(self, y: torch.Tensor) -> None:
        self.forward_operator.check_observation(y, chans=self.in_chans, min_size=self.min_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        self.check(y)
        return self.restore(y)

    @abstractmethod
    def restore(self, y: torch.Tensor) -> torch.Tensor:
        """The reconstruction of a checked observation ``y``."""

    def extra_repr(self) -> str:
        return f"task={self.task!r}, forward_operator={self.forward_operator!r}, in_chans={self.in_chans}"


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, padding_mode="replicate")


def _to_nodes(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 1, N, C] (one graph signal per channel, raster node order)."""
    b, c = x.shape[:2]
    return x.reshape(b, c, -1).transpose(1, 2).unsqueeze(1)


def _from_nodes(v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, N, C] -> [B, C, H, W]."""
    return v.transpose(1, 2).reshape(v.shape[0], v.shape[2], h, w)


class GraphBlock(GraphFilter):
    """One block (module doc, step 2): the graph filter of the ``glr`` / ``gtv`` layers (:class:`GraphFilter`: learned
    metric, edge weights and normalisation, solver step sizes, fidelity, head mixing) on the pixel grid, plus what
    restoration adds: CNN node features of the estimate (and the sampling mask), the interpolation constraint of
    the sampling operator (or its relaxed data term), the colour difference and the learned skip."""

    def __init__(self, chans: int, *, prior: str, iters: int, cg_iters: int, heads: int, feature_dim: int, width: int,
                 normalization: str, metric: str, similarity: str, clip: float | None, step_sizes: str,
                 metric_init: float, alpha_init: float, beta_init: float, rho_init: float, skip_init: float | None,
                 mask_features: bool, colour_difference: bool = False, green_smoothing: float = 0.0,
                 fidelity: float | None = None):
        super().__init__()
        self.colour_difference, self.mask_features = colour_difference, mask_features
        self.green_smoothing = float(green_smoothing)
        self.heads, self.feature_dim = heads, feature_dim
        cin = chans * (2 if mask_features else 1)
        self.features = nn.Sequential(_conv(cin, width), nn.ReLU(inplace=True), _conv(width, width),
                                      nn.ReLU(inplace=True), _conv(width, heads * feature_dim))
        self.init_graph(heads, feature_dim, metric=metric, metric_init=metric_init, normalization=normalization,
                        similarity=similarity, clip=clip, mix_heads=True)  # head mixing init 1/G (A.4)
        self.skip = nn.Parameter(torch.tensor(float(skip_init))) if skip_init is not None else None
        self.init_solver(prior, iters, cg_iters=cg_iters, step_sizes=step_sizes, alpha_init=alpha_init,
                         beta_init=beta_init, rho_init=rho_init, fidelity=fidelity)

    def node_features(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """f [B, G, N, K] from the estimate x [B, C, H, W] (and the sampling mask)."""
        b, _, h, w = x.shape
        inp = torch.cat([x, mask.to(x.dtype).expand_as(x)], 1) if self.mask_features else x
        f = self.features(inp).view(b, self.heads, self.feature_dim, h * w)
        return f.transpose(2, 3)

    def graph(self, x: torch.Tensor, mask: torch.Tensor, nbhd) -> torch.Tensor:
        """Edge weights [B, G, N, k] of the learned graph on ``nbhd`` (A.4)."""
        return self.learned_graph(self.node_features(x, mask), nbhd)[0]

    def smoothed_green(self, g: torch.Tensor) -> torch.Tensor:
        """ĝ of the colour difference: the green plane [B, 1, H, W], blurred when ``green_smoothing`` > 0."""
        if self.green_smoothing <= 0:
            return g
        from torchvision.transforms.functional import gaussian_blur

        radius = min(math.ceil(3 * self.green_smoothing), (min(g.shape[-2:]) - 1) // 2)  # reflect needs < size
        return gaussian_blur(g, [2 * radius + 1] * 2, [self.green_smoothing] * 2) if radius > 0 else g

    def forward(self, x: torch.Tensor, full: torch.Tensor, mask: torch.Tensor, nbhd) -> torch.Tensor:
        """x [B, C, H, W] current estimate, full = Hᵀy, mask bool [1, C|1, H, W] -> next estimate."""
        _, c, h, w = x.shape
        f = self.node_features(x, mask)
        obs = _to_nodes(mask.expand(1, c, h, w))  # bool [1, 1, N, C]
        offset = 0
        if self.colour_difference:  # signals (R − ĝ, G, B − ĝ) with ĝ the current green: y_R − ĝ observed at R sites
            g = self.smoothed_green(x[:, 1:2])
            offset = torch.cat([g, torch.zeros_like(g), g], 1)
        mixed = self.filter_values(f, _to_nodes(full - offset), nbhd, observed=obs, x0=_to_nodes(x - offset))
        new = _from_nodes(mixed, h, w) + offset
        if self.skip is not None:
            new = self.skip * new + (1 - self.skip) * x
        return new if self.relaxed else torch.where(mask, full, new)


class GraphInterpolationNet(RestorationModel):
    """uGLR (``prior="glr"``) / uGTV (``prior="gtv"``) for ``task`` "demosaic" or "sr2" (module doc).

    Options: ``blocks`` (4), ``iters`` (CG steps per block for glr, default 5; ADMM iterations per
    block for gtv, default 3), ``cg_iters`` (CG steps per ADMM x-step, 3), ``heads`` (parallel graphs,
    4), ``feature_dim`` (K per head, 6), ``width`` (CNN channels, 16), ``neighbourhood`` ("8"),
    ``normalization`` ("symmetric"), ``metric`` ("diagonal" | "full"), ``similarity`` ("mahalanobis" |
    "dot"), ``clip`` (None), ``step_sizes`` ("learned" | "exact"), ``init`` ("bilinear" | "zeros"),
    ``skip_init`` (0.95; None = no skip), ``metric_init`` (1.0), ``alpha_init`` / ``beta_init`` (CG
    steps at init; default 1.0 / 0.1 for glr — α = 1 is a Jacobi sweep of the normalised Laplacian —
    and 4.0 / 0.1 for gtv, whose x-step operator L_{w²} has a smaller scale), ``rho_init`` (gtv, 10.0),
    ``mask_features`` (True: the CNN also sees the sampling mask), ``colour_difference`` (None = True for
    demosaic, False for sr2), ``green_smoothing`` (σ in pixels of the Gaussian that smooths the green of the
    colour difference; 0 = the green as it is), ``fidelity`` (None = the hard constraint Hx = y of the paper; a float relaxes it
    to a data term, min μ‖Hx − y‖² + xᵀLx resp. μ‖Hx − y‖² + ‖C_w x‖₁, solved by the same CG / ADMM over all
    pixels, μ learned per block and head (log-stored) and initialised at this value; the outputs then do not
    copy the samples, so noise on them is filtered too), ``in_chans`` (sr2: 3 or 1), ``pattern`` (demosaic).
    """

    def __init__(self, task: str = "demosaic", prior: str = "glr", *, blocks: int = 4, iters: int | None = None,
                 cg_iters: int = 3, heads: int = 4, feature_dim: int = 6, width: int = 16, neighbourhood: str = "8",
                 normalization: str = "symmetric", metric: str = "diagonal", similarity: str = "mahalanobis",
                 clip: float | None = None, step_sizes: str = "learned", init: str = "bilinear",
                 skip_init: float | None = 0.95, metric_init: float = 1.0, alpha_init: float | None = None,
                 beta_init: float = 0.1, rho_init: float = 10.0, mask_features: bool = True,
                 colour_difference: bool | None = None, green_smoothing: float = 0.0, fidelity: float | None = None,
                 in_chans: int = 3, pattern: str = "RGGB"):
        super().__init__(task, in_chans=in_chans, pattern=pattern)
        colour_difference = (task == "demosaic") if colour_difference is None else bool(colour_difference)
        if colour_difference and self.chans != 3:
            raise ValueError(f"colour_difference: needs RGB images, got {self.chans} channel(s)")
        if isinstance(green_smoothing, bool) or not isinstance(green_smoothing, (int, float)) or \
                not math.isfinite(green_smoothing) or green_smoothing < 0:
            raise ValueError(f"green_smoothing: expected a Gaussian sigma >= 0 in pixels, got {green_smoothing!r}")
        if green_smoothing > 0 and not colour_difference:
            raise ValueError("green_smoothing: smooths the green of the colour difference; it needs "
                             "colour_difference=True")
        for name, value, allowed in (("prior", prior, PRIORS), ("init", init, INITS)):  # the rest: GraphFilter
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
        if not is_grid_kind(neighbourhood):
            raise ValueError(f"neighbourhood: expected a pixel-grid kind '4', '8' or 'window<k>' (k odd >= 3), "
                             f"got {neighbourhood!r}")
        iters = (5 if prior == "glr" else 3) if iters is None else iters
        alpha_init = (1.0 if prior == "glr" else 4.0) if alpha_init is None else alpha_init
        ints = {"blocks": blocks, "iters": iters, "cg_iters": cg_iters, "heads": heads, "feature_dim": feature_dim,
                "width": width}
        bad = {k: v for k, v in ints.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
        if bad:
            raise ValueError(f"expected ints >= 1, got {bad}")
        self.prior, self.init, self.neighbourhood = prior, init, neighbourhood
        self.min_size = max(RestorationModel.min_size, neighbourhood_radius(neighbourhood) + 1)
        self.options = dict(ints, neighbourhood=neighbourhood, normalization=normalization, metric=metric,
                            similarity=similarity, step_sizes=step_sizes, init=init, skip_init=skip_init,
                            colour_difference=colour_difference, green_smoothing=green_smoothing, fidelity=fidelity)
        self.blocks = nn.ModuleList(
            GraphBlock(self.chans, prior=prior, iters=iters, cg_iters=cg_iters, heads=heads, feature_dim=feature_dim,
                       width=width, normalization=normalization, metric=metric, similarity=similarity, clip=clip,
                       step_sizes=step_sizes, metric_init=metric_init, alpha_init=alpha_init, beta_init=beta_init,
                       rho_init=rho_init, skip_init=skip_init, mask_features=mask_features,
                       colour_difference=colour_difference, green_smoothing=green_smoothing, fidelity=fidelity)
            for _ in range(blocks))

    def initial(self, y: torch.Tensor) -> torch.Tensor:
        """x⁰: bilinear interpolation by the operator, or Hᵀy (zeros at unobserved pixels)."""
        op = self.forward_operator
        return op.interpolate(y, "bilinear") if self.init == "bilinear" else op.adjoint(y)

    def _unroll(self, y: torch.Tensor, graphs: list | None = None) -> torch.Tensor:
        """Run the blocks on a checked y; append each block's edge weights to ``graphs`` if given."""
        full = self.forward_operator.adjoint(y)
        h, w = full.shape[-2:]
        mask = self.forward_operator.observed_mask(h, w, device=y.device)
        nbhd = build_neighbourhood(self.neighbourhood, (h, w), device=y.device)
        x = self.initial(y)
        for block in self.blocks:
            if graphs is not None:
                graphs.append(block.graph(x, mask, nbhd))
            x = block(x, full, mask, nbhd)
        return x

    def restore(self, y: torch.Tensor) -> torch.Tensor:
        return self._unroll(y)

    def graphs(self, y: torch.Tensor) -> list[torch.Tensor]:
        """The learned edge weights [B, G, N, k] of every block (for inspection / diagnostics)."""
        self.check(y)
        out: list[torch.Tensor] = []
        self._unroll(y, out)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prior={self.prior!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def _builder(task: str, prior: str):
    def build(**options) -> GraphInterpolationNet:
        return GraphInterpolationNet(task, prior, **options)

    build.__name__ = f"u{prior}_{task}"
    build.__doc__ = f"{'uGLR (unrolled CG)' if prior == 'glr' else 'uGTV (unrolled ADMM)'} for " \
                    f"{'Bayer RGGB demosaicking' if task == 'demosaic' else 'x2 interpolation'}; options: GraphInterpolationNet."
    return build


# recipe config field -> builder option (metadata ``config_options``): the recipe passes the fields a model declares
_GRAPH_CONFIG = {key: key for key in ("blocks", "heads", "feature_dim", "width", "neighbourhood", "normalization",
                                      "metric", "step_sizes", "init", "skip_init", "colour_difference",
                                      "green_smoothing", "fidelity")}
_SOLVER_CONFIG = {"glr": {"iters": "iters"}, "gtv": {"admm_iters": "iters", "cg_iters": "cg_iters"}}

for _task in RESTORATION_TASKS:
    for _prior in PRIORS:
        register_model(f"u{_prior}_{_task}", family=f"u{_prior}", task="restoration", variant=f"u{_prior}", size=_task,
                       learned=True, config_options={**_GRAPH_CONFIG, **_SOLVER_CONFIG[_prior]},
                       summary=_builder(_task, _prior).__doc__)(_builder(_task, _prior))
