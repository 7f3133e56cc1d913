"""Sparse neighbourhood graphs for graph-smoothness priors (docs/papers.md, family A).

Everything here costs O(N·k) for N nodes with k neighbours each; no dense N×N matrix is ever built
(the dense versions live in ``core/reference.py`` for parity tests only).

Layout conventions
------------------
* A graph signal is ``x [B, G, N, C]``: batch, graphs (= heads), nodes, channels. The C channels are
  independent signals on the same graph (e.g. colour planes, or a head's value dimensions).
* A neighbourhood is a fixed list of offsets. For N nodes it gives ``index [N, k]`` (the neighbour of
  node i in column c is ``index[i, c]``) and ``valid [N, k]`` (False where the offset leaves the grid
  or the causal support). Invalid columns point at the node itself, so gathers never go out of range.
* Edge weights are ``w [B, G, N, k]`` aligned with ``index`` and are exactly 0 where ``valid`` is False.
  Row i of the adjacency is W[i, index[i, c]] = w[..., i, c]; mat-vecs gather along the node axis.

Kinds of neighbourhood
----------------------
2-D grids (H, W), node i = r·W + c (raster order):
    "4"         4-connected: (±1, 0), (0, ±1)
    "8"         8-connected: the 3×3 window without the centre
    "window{k}" k×k window (k odd ≥ 3) without the centre, e.g. "window5" has 24 neighbours
1-D sequences (N,):
    "band{w}"   j with 0 < |i − j| ≤ w
    "causal{w}" j with 0 < i − j ≤ w (only the past); ``include_self=True`` adds j = i

Symmetry: on the symmetric kinds ("4", "8", "window", "band") j ∈ N(i) ⇔ i ∈ N(j), so weights built from
a symmetric similarity (Mahalanobis distance, dot product) give w_ij == w_ji edge by edge, under
normalisation "none" or "symmetric". Row normalisation (softmax over the neighbourhood) is NOT
symmetric, and causal neighbourhoods are directed by construction.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

NORMALIZATIONS = ("none", "row", "symmetric")
SIMILARITIES = ("mahalanobis", "dot")
GRID_KINDS = ("4", "8", "window{k}")
SEQUENCE_KINDS = ("band{w}", "causal{w}")

_WINDOW = re.compile(r"window(\d+)")
_BAND = re.compile(r"(band|causal)(\d+)")


# --------------------------------------------------------------------------------------------- offsets
def is_grid_kind(kind: str) -> bool:
    """True for the 2-D kinds "4", "8", "window{k}"."""
    return isinstance(kind, str) and (kind in ("4", "8") or _WINDOW.fullmatch(kind) is not None)


def is_sequence_kind(kind: str) -> bool:
    """True for the 1-D kinds "band{w}", "causal{w}"."""
    return isinstance(kind, str) and _BAND.fullmatch(kind) is not None


def _kind_error(kind) -> ValueError:
    return ValueError(f"neighbourhood: expected one of '4', '8', 'window<k>' (k odd >= 3) for 2-D grids or "
                      f"'band<w>', 'causal<w>' (w >= 1) for sequences, got {kind!r}")


def grid_offsets(kind: str) -> tuple[tuple[int, int], ...]:
    """(dr, dc) offsets of a 2-D neighbourhood, in raster order, centre excluded."""
    if kind == "4":
        return ((-1, 0), (0, -1), (0, 1), (1, 0))
    if kind == "8":
        radius = 1
    else:
        m = _WINDOW.fullmatch(kind) if isinstance(kind, str) else None
        if m is None:
            raise _kind_error(kind)
        size = int(m.group(1))
        if size < 3 or size % 2 == 0:
            raise ValueError(f"neighbourhood: window size must be odd and >= 3, got {kind!r}")
        radius = size // 2
    return tuple((dr, dc) for dr in range(-radius, radius + 1) for dc in range(-radius, radius + 1)
                 if (dr, dc) != (0, 0))


def sequence_offsets(kind: str, include_self: bool = False) -> tuple[int, ...]:
    """Offsets j − i of a 1-D neighbourhood in increasing order; ``include_self`` adds 0."""
    m = _BAND.fullmatch(kind) if isinstance(kind, str) else None
    if m is None:
        raise _kind_error(kind)
    width = int(m.group(2))
    if width < 1:
        raise ValueError(f"neighbourhood: band width must be >= 1, got {kind!r}")
    if m.group(1) == "band":
        offsets = list(range(-width, 0)) + list(range(1, width + 1))
    else:  # causal: 0 < i - j <= w
        offsets = list(range(-width, 0))
    if include_self:
        offsets.append(0)
        offsets.sort()
    return tuple(offsets)


def neighbourhood_radius(kind: str) -> int:
    """Largest |offset| per axis: 1 for "4"/"8", (k−1)/2 for "window{k}", w for "band{w}"/"causal{w}"."""
    if is_grid_kind(kind):
        return max(max(abs(dr), abs(dc)) for dr, dc in grid_offsets(kind))
    return max(abs(o) for o in sequence_offsets(kind))


def neighbourhood_size(kind: str, include_self: bool = False) -> int:
    """Number of neighbour columns k of ``kind``."""
    if is_grid_kind(kind):
        return len(grid_offsets(kind)) + int(include_self)
    return len(sequence_offsets(kind, include_self))


def equivalent_band(kind: str) -> str:
    """The 1-D band with as many neighbours as ``kind`` ("8" / "window3" -> "band4", "4" -> "band2")."""
    if is_sequence_kind(kind):
        return "band" + _BAND.fullmatch(kind).group(2)
    return f"band{max(1, neighbourhood_size(kind) // 2)}"


# --------------------------------------------------------------------------------------- neighbourhood
@dataclass(frozen=True, eq=False)
class Neighbourhood:
    """A fixed-offset neighbourhood on an (H, W) grid or a length-N sequence.

    Attributes:
        kind: the kind string ("4", "8", "window3", "band4", "causal4", ...).
        shape: (H, W) for grids, (N,) for sequences.
        offsets: one offset per column: (dr, dc) on grids, (j − i,) on sequences.
        index: long [N, k]; neighbour of node i in column c (node i itself where invalid).
        valid: bool [N, k]; False at borders and outside the causal support.
        undirected_columns, edge_columns, flat_offsets, edge_flat_offsets: derived at construction (below), so
        that reading them is a plain attribute access (no lazy caching, nothing for torch.compile to break on).

    Build with :func:`build_neighbourhood` (cached per kind, shape and device).
    """

    kind: str
    shape: tuple[int, ...]
    offsets: tuple[tuple[int, ...], ...]
    index: torch.Tensor
    valid: torch.Tensor
    include_self: bool = False
    undirected_columns: tuple[int, ...] = field(init=False, repr=False)
    """Columns listing every undirected edge once (the GTV edge set); self-loops dropped. An offset o is kept when
    −o is not in the set, or when o is "positive" in raster order (dr > 0, or dr == 0 and dc > 0): so symmetric
    kinds keep their forward half and causal kinds keep all their (past-pointing) columns."""
    edge_columns: torch.Tensor = field(init=False, repr=False)
    """``undirected_columns`` as a long tensor on the neighbourhood's device (select weight columns with it)."""
    flat_offsets: tuple[int, ...] = field(init=False, repr=False)
    """Per column, the node-index offset j − i of a valid neighbour (dr·W + dc on grids, o on sequences). Pass it as
    ``offsets=`` to the mat-vecs for the shift fast path (see :func:`shift_neighbours`)."""
    edge_flat_offsets: tuple[int, ...] = field(init=False, repr=False)
    """``flat_offsets`` of the undirected edge set (``undirected_columns``), for the GTV mat-vecs."""
    edge_index: torch.Tensor = field(init=False, repr=False)
    edge_valid: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        offs = set(self.offsets)
        undirected = tuple(c for c, o in enumerate(self.offsets) if any(v != 0 for v in o)
                           and (tuple(-v for v in o) not in offs or o > tuple(0 for _ in o)))
        if len(self.shape) == 2:
            flat = tuple(dr * self.shape[1] + dc for dr, dc in self.offsets)
        else:
            flat = tuple(o[0] for o in self.offsets)
        columns = torch.tensor(undirected, dtype=torch.long, device=self.index.device)
        derived = {"undirected_columns": undirected, "edge_columns": columns, "flat_offsets": flat,
                   "edge_flat_offsets": tuple(flat[c] for c in undirected),
                   "edge_index": self.index.index_select(1, columns), "edge_valid": self.valid.index_select(1, columns)}
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    @property
    def num_nodes(self) -> int:
        return self.index.shape[0]

    @property
    def size(self) -> int:
        """Number of neighbour columns k."""
        return self.index.shape[1]

    @property
    def is_symmetric(self) -> bool:
        """j ∈ N(i) ⇔ i ∈ N(j): the offset set is closed under negation."""
        offs = set(self.offsets)
        return all(tuple(-v for v in o) in offs for o in offs)

    def edges(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index_e [N, m], valid_e [N, m], columns [m]) of the undirected edge set (``undirected_columns``).

        The GTV edge weights are ``weights.index_select(-1, columns)`` of the full-neighbourhood weights.
        """
        return self.edge_index, self.edge_valid, self.edge_columns

    def to(self, device) -> "Neighbourhood":
        return build_neighbourhood(self.kind, self.shape, include_self=self.include_self, device=device)

    def __repr__(self) -> str:
        return f"Neighbourhood(kind={self.kind!r}, shape={self.shape}, k={self.size}, edges={int(self.valid.sum())})"


def _grid_tables(offsets, h: int, w: int):
    r = torch.arange(h).view(h, 1).expand(h, w)
    c = torch.arange(w).view(1, w).expand(h, w)
    node = (r * w + c).reshape(-1)
    index, valid = [], []
    for dr, dc in offsets:
        rr, cc = r + dr, c + dc
        ok = ((rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)).reshape(-1)
        index.append(torch.where(ok, (rr * w + cc).reshape(-1), node))
        valid.append(ok)
    return torch.stack(index, 1), torch.stack(valid, 1)


def _sequence_tables(offsets, n: int):
    node = torch.arange(n)
    index, valid = [], []
    for o in offsets:
        j = node + o
        ok = (j >= 0) & (j < n)
        index.append(torch.where(ok, j, node))
        valid.append(ok)
    return torch.stack(index, 1), torch.stack(valid, 1)


_NEIGHBOURHOODS: dict[tuple, Neighbourhood] = {}  # (kind, shape, include_self, device) -> Neighbourhood
_CACHE_SIZE = 128


def _build(kind: str, shape: tuple[int, ...], include_self: bool, device: str) -> Neighbourhood:
    if is_grid_kind(kind):
        offsets = grid_offsets(kind)
        if include_self:
            offsets = tuple(sorted(offsets + ((0, 0),)))
        index, valid = _grid_tables(offsets, *shape)
    else:
        offsets = tuple((o,) for o in sequence_offsets(kind, include_self))
        index, valid = _sequence_tables([o[0] for o in offsets], shape[0])
    return Neighbourhood(kind, shape, offsets, index.to(device), valid.to(device), include_self)


def build_neighbourhood(kind: str, shape: int | Sequence[int], *, include_self: bool = False,
                        device=None) -> Neighbourhood:
    """The cached :class:`Neighbourhood` of ``kind`` on ``shape`` = (H, W) (grid kinds) or N / (N,) (sequence kinds).

    Raises ValueError for an unknown kind, a shape of the wrong rank, or a grid too small for the
    neighbourhood (each side must exceed the radius, so that every offset occurs somewhere).
    """
    if not (is_grid_kind(kind) or is_sequence_kind(kind)):
        raise _kind_error(kind)
    shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    if is_grid_kind(kind):
        grid_offsets(kind)  # validates the window size
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"neighbourhood {kind!r}: expected a grid shape (H, W) with positive sizes, got {shape}")
        radius = neighbourhood_radius(kind)
        if min(shape) <= radius:
            raise ValueError(f"neighbourhood {kind!r}: grid {shape[0]}x{shape[1]} is too small; "
                             f"expected H, W >= {radius + 1}")
    else:
        sequence_offsets(kind)
        if len(shape) != 1 or shape[0] < 1:
            raise ValueError(f"neighbourhood {kind!r}: expected a sequence length (N,) >= 1, got {shape}")
    dev = str(torch.device(device)) if device is not None else "cpu"
    key = (kind, shape, bool(include_self), dev)
    cached = _NEIGHBOURHOODS.get(key)
    if cached is not None:
        return cached
    nbhd = _build(*key)
    if not torch.compiler.is_compiling():  # traced, the tables are part of the graph; the cache fills in eager calls
        if len(_NEIGHBOURHOODS) >= _CACHE_SIZE:
            _NEIGHBOURHOODS.pop(next(iter(_NEIGHBOURHOODS)))
        _NEIGHBOURHOODS[key] = nbhd
    return nbhd


# -------------------------------------------------------------------------------------------- weights
def _check_graph_tensors(name: str, t: torch.Tensor, index: torch.Tensor, last: str) -> None:
    if not isinstance(t, torch.Tensor) or t.ndim != 4:
        got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected shape [B, G, N, {last}], got {got}")
    if index.ndim != 2 or index.dtype != torch.long:
        raise ValueError(f"index: expected a long tensor [N, k], got {index.dtype} {list(index.shape)}")
    if t.shape[2] != index.shape[0]:
        raise ValueError(f"{name}: expected shape [B, G, N={index.shape[0]}, {last}] to match index [N, k], "
                         f"got {list(t.shape)}")
    if name == "weights" and t.shape[3] != index.shape[1]:
        raise ValueError(f"weights: expected shape [B, G, N, {last}={index.shape[1]}] to match index [N, {last}], "
                         f"got {list(t.shape)}")


def _check_matvec(weights: torch.Tensor, index: torch.Tensor, x: torch.Tensor) -> None:
    _check_graph_tensors("weights", weights, index, "k")
    _check_graph_tensors("x", x, index, "C")


def metric_features(features: torch.Tensor, metric: torch.Tensor | None = None) -> torch.Tensor:
    """g = M^{1/2}-transformed features so that (f_i − f_j)ᵀ M (f_i − f_j) = ‖g_i − g_j‖² (A.4).

    ``features`` [B, G, N, K]. ``metric``:
      * None: M = I;
      * [G, K]: log-diagonal, M = diag(exp(metric[g])) (positivity by exp);
      * [G, R, K]: factor Q with M = QᵀQ (R = K full, R < K low rank).
    """
    if features.ndim != 4:
        raise ValueError(f"features: expected shape [B, G, N, K], got {list(features.shape)}")
    if metric is None:
        return features
    g, k = features.shape[1], features.shape[-1]
    if metric.ndim == 2 and metric.shape[-1] == k and metric.shape[0] in (1, g):
        return features * torch.exp(0.5 * metric)[None, :, None, :]
    if metric.ndim == 3 and metric.shape[-1] == k and metric.shape[0] in (1, g):
        return torch.einsum("grk,bgnk->bgnr", metric, features)
    raise ValueError(f"metric: expected a log-diagonal [G={g}, K={k}] or a factor Q [G={g}, R, K={k}], "
                     f"got {list(metric.shape)}")


def gather_neighbours(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, G, N, C] -> [B, G, N, k, C] with out[..., i, c, :] = x[..., index[i, c], :] (O(N·k·C) memory)."""
    return x[:, :, index]


def shift_neighbours(x: torch.Tensor, offsets: Sequence[int]) -> list[torch.Tensor]:
    """Fast path of :func:`gather_neighbours` for fixed-offset neighbourhoods: one view [B, G, N, C] per column,
    column c holding x[..., i + offsets[c], :] (zero-padded at the ends of the node axis).

    Equal to the gather on every VALID neighbour; on invalid ones (a grid row's wrap-around, past the ends) it
    holds another finite value instead of x_i, so callers must give those columns weight 0 — which
    :func:`edge_weights` guarantees — and finite x. No [N, k, C] tensor and no index gather: every column is a
    slice of one padded copy, so the mat-vecs stream memory linearly in N (``Neighbourhood.flat_offsets``)."""
    pad = max((abs(o) for o in offsets), default=0)
    n = x.shape[2]
    xp = torch.nn.functional.pad(x, (0, 0, pad, pad)) if pad else x
    return [xp[:, :, pad + o: pad + o + n] for o in offsets]


def _check_offsets(offsets, index: torch.Tensor) -> None:
    if offsets is not None and len(offsets) != index.shape[1]:
        raise ValueError(f"offsets: expected one flat offset per index column ({index.shape[1]}), got {len(offsets)}")


def edge_logits(features: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, *,
                metric: torch.Tensor | None = None, similarity: str = "mahalanobis",
                clip: float | None = None, offsets: Sequence[int] | None = None) -> torch.Tensor:
    """Log-weights per neighbour [B, G, N, k]; −inf where ``valid`` is False. ``offsets``
    (``Neighbourhood.flat_offsets``): the shift fast path, same values (invalid columns are −inf either way).

    similarity "mahalanobis": −d_ij, d_ij = (f_i − f_j)ᵀ M (f_i − f_j)  (A.4), clipped at d ≤ clip;
    similarity "dot":         f_iᵀ M f_j (the 2025 reference code), clipped to [−clip, clip].
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity: expected one of {SIMILARITIES}, got {similarity!r}")
    _check_graph_tensors("features", features, index, "K")
    if valid.shape != index.shape:
        raise ValueError(f"valid: expected shape {list(index.shape)} like index, got {list(valid.shape)}")
    _check_offsets(offsets, index)
    g = metric_features(features, metric)
    if offsets is not None:  # shift fast path: one [B, G, N] column at a time, no [N, k, R] tensor
        n, pad = g.shape[-2], max((abs(o) for o in offsets), default=0)
        padded = torch.nn.functional.pad(g.transpose(-1, -2), (pad, pad))  # [B, G, R, N + 2 pad], node axis innermost
        own = padded[..., pad:pad + n]
        cols = [padded[..., pad + o: pad + o + n] for o in offsets]
        if similarity == "mahalanobis":
            logits = torch.stack([(own - nb).square().sum(-2) for nb in cols], -2).neg_()
        else:
            logits = torch.stack([(own * nb).sum(-2) for nb in cols], -2)
        logits = logits.transpose(-1, -2)  # stored column by column (column_major), like the mat-vecs read it
    else:
        nb = gather_neighbours(g, index)  # [B, G, N, k, R]
        if similarity == "mahalanobis":
            logits = -(g.unsqueeze(-2) - nb).square().sum(-1)
        else:
            logits = (g.unsqueeze(-2) * nb).sum(-1)
    if clip is not None:
        logits = logits.clamp_min(-float(clip)) if similarity == "mahalanobis" else logits.clamp(-float(clip), float(clip))
    return logits.masked_fill(~valid, float("-inf"))


def normalize_edges(logits: torch.Tensor, index: torch.Tensor, normalization: str = "none", *,
                    eps: float = 1e-12, return_log_degree: bool = False, offsets: Sequence[int] | None = None):
    """Weights from log-weights [B, G, N, k] (−inf = no edge); exactly 0 on missing edges.

    "none":      w_ij = exp(ℓ_ij)
    "row":       w̄_ij = w_ij / Σ_{l∈N(i)} w_il = softmax_{j∈N(i)} ℓ_ij            (A.4 [D]; not symmetric)
    "symmetric": w̄_ij = w_ij / sqrt(d_i d_j), d_i = Σ_{l∈N(i)} w_il                (A.4; symmetric if w is)
    Isolated nodes (no edge) get an all-zero row; a degree below ``eps`` is clamped to ``eps`` (only
    reachable on directed graphs, where j ∈ N(i) may have no neighbours of its own), so nothing divides by 0.
    Computed in the log domain, so tiny weights do not underflow before normalisation.
    ``return_log_degree``: also return log d_i [B, G, N] of the un-normalised weights (clamped at log ``eps``),
    e.g. for :func:`row_inner_weights`. ``offsets`` (``Neighbourhood.flat_offsets``): the neighbours' degrees
    d_j of "symmetric" by shifted slices instead of a gather (other finite values on missing edges, where
    exp(−inf) = 0 anyway).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization: expected one of {NORMALIZATIONS}, got {normalization!r}")
    if normalization == "none" and not return_log_degree:
        return torch.exp(logits)
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()  # isolated rows: any finite shift
    e = torch.exp(logits - m)  # 0 on missing edges
    s = e.sum(-1, keepdim=True)
    log_deg = (m + torch.log(s.clamp_min(eps))).squeeze(-1).clamp_min(math.log(eps))  # log d_i; isolated: log eps
    if normalization == "none":
        weights = torch.exp(logits)
    elif normalization == "row":
        weights = e / s.clamp_min(eps)
    else:  # ½(log d_i + log d_j) is commutative in floating point, so w̄_ij == w̄_ji bit for bit; exp(−inf) = 0 off-graph
        if offsets is None:
            neighbour_log_deg = log_deg[..., index]
        else:
            _check_offsets(offsets, index)
            neighbour_log_deg = torch.cat(shift_neighbours(log_deg.unsqueeze(-1), offsets), -1)
        weights = torch.exp(logits - 0.5 * (log_deg.unsqueeze(-1) + neighbour_log_deg))
    return (weights, log_deg) if return_log_degree else weights


def row_inner_weights(log_degree: torch.Tensor | None) -> torch.Tensor:
    """Node weights d_i / max_j d_j [B, G, N, 1] of the inner product in which the row-normalised Laplacian
    D⁻¹L (``normalize_edges`` "row") is self-adjoint: D·D⁻¹L = L is symmetric when the raw weights are, so exact
    CG with these ``inner_weights`` (core.solvers) is exact on (I + μD⁻¹L) x = v. The scale per graph does not
    change CG's steps, so the maximum is a constant (detached). ``log_degree`` None is a ValueError."""
    if log_degree is None:
        raise ValueError("log_degree: exact CG on a row-normalised graph needs the graph's log-degrees "
                         "(edge_weights(..., return_log_degree=True)); without them CG solves the wrong system")
    return torch.exp(log_degree - log_degree.amax(-1, keepdim=True).detach()).unsqueeze(-1)


def neighbour_mask(attn_mask: torch.Tensor, index: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Gather a dense attention mask [.., N_total, N_total] (bool or additive float; broadcastable leading dims)
    onto neighbour layout [.., N, k] for nodes ``offset .. offset+N-1`` (e.g. offset = number of prefix tokens)."""
    if attn_mask.ndim < 2:
        raise ValueError(f"attn_mask: expected [..., N, N], got {list(attn_mask.shape)}")
    n = index.shape[0]
    rows = attn_mask if attn_mask.shape[-2] == 1 else attn_mask[..., offset:offset + n, :]
    rows = rows if rows.shape[-1] == 1 else rows[..., offset:offset + n]
    if rows.shape[-2:] not in ((n, n), (1, n), (n, 1), (1, 1)):
        raise ValueError(f"attn_mask: expected the last two sizes to cover {offset + n} tokens, got {list(attn_mask.shape)}")
    rows = rows.expand(*rows.shape[:-2], n, n)
    idx = index.expand(*rows.shape[:-2], n, index.shape[1])
    return torch.gather(rows, -1, idx)


def edge_weights(features: torch.Tensor, neighbourhood: Neighbourhood, *, metric: torch.Tensor | None = None,
                 normalization: str = "none", similarity: str = "mahalanobis", clip: float | None = None,
                 mask: torch.Tensor | None = None, eps: float = 1e-12, return_log_degree: bool = False):
    """Edge weights [B, G, N, k] aligned with ``neighbourhood.index`` from node features f [B, G, N, K].

    w_ij = exp(−(f_i − f_j)ᵀ M (f_i − f_j)) on j ∈ N(i) (A.4), then ``normalization`` (see
    :func:`normalize_edges`). ``metric``: None, log-diagonal [G, K], or factor Q [G, R, K] (M = QᵀQ).
    ``mask`` [.., N, k] in neighbour layout (see :func:`neighbour_mask`): bool (False drops the edge) or
    additive float added to the log-weight, applied before normalisation. Invalid neighbours get 0.
    ``return_log_degree``: (weights, log d_i [B, G, N]) as in :func:`normalize_edges`.
    """
    logits = edge_logits(features, neighbourhood.index, neighbourhood.valid, metric=metric,
                         similarity=similarity, clip=clip, offsets=neighbourhood.flat_offsets)
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.to(logits.dtype)
    return normalize_edges(logits, neighbourhood.index, normalization, eps=eps, return_log_degree=return_log_degree,
                           offsets=neighbourhood.flat_offsets)


# ------------------------------------------------------------------------------------------- mat-vecs
# The shift fast paths (``offsets=``) accumulate each neighbour column in place into one output over the node range
# where the neighbour exists (:func:`node_ranges`): no [N, k, C] gather, no padded copy, one fresh node signal per
# mat-vec. Weights stored column by column (:func:`column_major`) and signals stored plane by plane (node axis
# innermost, e.g. image colour planes) stream every column as one contiguous vector. The index gather
# (``offsets=None``) is the reference of each fast path (parity tests in tests/test_core_graph.py).
def degree(weights: torch.Tensor) -> torch.Tensor:
    """d_i = Σ_{j∈N(i)} w_ij, [B, G, N] (row sums of W)."""
    return weights.sum(-1)


def node_ranges(offset: int, n: int) -> tuple[slice, slice]:
    """(heads, tails): slices of the node axis pairing each node i whose neighbour i + ``offset`` lies in 0..n−1
    (heads) with that neighbour (tails); empty when |offset| >= n."""
    lo, hi = max(0, -offset), min(n, n - offset)
    hi = max(hi, lo)
    return slice(lo, hi), slice(lo + offset, hi + offset)


def column_major(weights: torch.Tensor) -> torch.Tensor:
    """The same weights [B, G, N, k], stored column by column ([B, G, k, N] in memory) so that every neighbour
    column is a contiguous node vector for the shift fast paths; a view when they already are."""
    return weights.transpose(-1, -2).contiguous().transpose(-1, -2)


def _lead_shape(weights: torch.Tensor, x: torch.Tensor) -> tuple[int, ...]:
    return tuple(torch.broadcast_shapes(weights.shape[:-2], x.shape[:-2]))


def _new_signal(x: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """zeros [..., N, C] (``shape``) stored like x: node axis innermost when x's is (plane-by-plane signals)."""
    n, c = shape[-2:]
    if x.stride(-2) == 1 and c > 1:
        return x.new_zeros(*shape[:-2], c, n, dtype=dtype).transpose(-1, -2)
    return x.new_zeros(shape, dtype=dtype)


def _accumulate_neighbours(out: torch.Tensor, weights: torch.Tensor, x: torch.Tensor, offsets: Sequence[int], *,
                           value: float = 1.0, to_tails: bool = False) -> torch.Tensor:
    """In place: out_i += value · w[i, c] · x_{i + o_c} over every column c (``to_tails``: out_{i + o_c} +=
    value · w[i, c] · x_i, the transposed term), only where node i + o_c exists. Returns out."""
    n = x.shape[-2]
    for c, o in enumerate(offsets):
        heads, tails = node_ranges(o, n)
        w = weights[..., heads, c].unsqueeze(-1)
        if to_tails:
            out[..., tails, :].addcmul_(w, x[..., heads, :], value=value)
        else:
            out[..., heads, :].addcmul_(w, x[..., tails, :], value=value)
    return out


def adjacency_matvec(weights: torch.Tensor, index: torch.Tensor, x: torch.Tensor, *,
                     offsets: Sequence[int] | None = None) -> torch.Tensor:
    """(W x)_i = Σ_c w[i, c] x[index[i, c]] for x [B, G, N, C]: one gather [B, G, N, k, C], O(N·k·C).

    ``offsets`` (``Neighbourhood.flat_offsets``; weights must be 0 on invalid columns, as :func:`edge_weights`
    makes them): the shift fast path, Σ_c w[:, c] · x[i + o_c] accumulated in place into one [B, G, N, C]."""
    _check_matvec(weights, index, x)
    _check_offsets(offsets, index)
    if offsets is None:
        return torch.einsum("bgnk,bgnkc->bgnc", weights, gather_neighbours(x, index))
    out = _new_signal(x, (*_lead_shape(weights, x), *x.shape[-2:]), torch.promote_types(weights.dtype, x.dtype))
    return _accumulate_neighbours(out, weights, x, offsets)


def laplacian_matvec(weights: torch.Tensor, index: torch.Tensor, x: torch.Tensor, *,
                     offsets: Sequence[int] | None = None, degrees: torch.Tensor | None = None) -> torch.Tensor:
    """L x = D x − W x, (L x)_i = Σ_{j∈N(i)} w_ij (x_i − x_j)  (A.1); symmetric iff the weights are.
    ``offsets``: the shift fast path of :func:`adjacency_matvec`, accumulated into D x in place. ``degrees``:
    :func:`degree` of the weights when already known (see :func:`laplacian_operator`)."""
    _check_matvec(weights, index, x)
    d = degree(weights) if degrees is None else degrees
    if offsets is None:
        return d.unsqueeze(-1) * x - adjacency_matvec(weights, index, x)
    _check_offsets(offsets, index)
    return _accumulate_neighbours(x * d.unsqueeze(-1), weights, x, offsets, value=-1.0)


def laplacian_operator(weights: torch.Tensor, index: torch.Tensor, *,
                       offsets: Sequence[int] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> L x (:func:`laplacian_matvec`) for repeated use, e.g. by CG: the degrees are summed once and, on the
    shift fast path, the weights stored column by column (:func:`column_major`) once."""
    if offsets is None:
        return lambda x: laplacian_matvec(weights, index, x)
    columns = column_major(weights)
    degrees = degree(weights)
    return lambda x: laplacian_matvec(columns, index, x, offsets=offsets, degrees=degrees)


def incidence_matvec(weights: torch.Tensor, index: torch.Tensor, x: torch.Tensor, *,
                     offsets: Sequence[int] | None = None) -> torch.Tensor:
    """C_w x per edge (i, c): w[i, c] (x_i − x_{index[i, c]}), shape [B, G, N, m, C]  (A.1, ‖x‖_GTV = ‖C_w x‖₁).

    Pass the undirected edge set (``Neighbourhood.edges()`` and the matching weight columns) so each
    edge is counted once; then C_wᵀ C_w = L_{w²} on the full neighbourhood. ``offsets``
    (``Neighbourhood.edge_flat_offsets``, weights 0 on invalid edges): the shift fast path, w x_i for every
    column in one product and then −w x_{i + o_c} in place; the edge signal is stored column by column.
    """
    _check_graph_tensors("weights", weights, index, "m")
    _check_graph_tensors("x", x, index, "C")
    _check_offsets(offsets, index)
    if offsets is None:
        return weights.unsqueeze(-1) * (x.unsqueeze(-2) - gather_neighbours(x, index))
    if not offsets:
        return x.new_zeros(*_lead_shape(weights, x), x.shape[-2], 0, x.shape[-1])
    edges = x.unsqueeze(-3) * weights.transpose(-1, -2).unsqueeze(-1)  # [B, G, m, N, C]: w[i, c] x_i
    n = x.shape[-2]
    for c, o in enumerate(offsets):
        heads, tails = node_ranges(o, n)
        edges[..., c, heads, :].addcmul_(weights[..., heads, c].unsqueeze(-1), x[..., tails, :], value=-1.0)
    return edges.transpose(-2, -3)


def incidence_gram_diagonal(weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """diag(C_wᵀC_w) = Σ_{edges e ∋ i} w_e², [B, G, N], for an undirected edge set (weights [B, G, N, m]).

    Self edges (index[i, c] == i, the invalid columns) carry weight 0 and add nothing."""
    _check_graph_tensors("weights", weights, index, "m")
    sq = weights.square()
    return sq.sum(-1).index_add(2, index.reshape(-1), sq.flatten(2, 3))


def incidence_t_matvec(weights: torch.Tensor, index: torch.Tensor, e: torch.Tensor, *,
                       directed: bool = False, offsets: Sequence[int] | None = None) -> torch.Tensor:
    """C_wᵀ e for an edge signal e [B, G, N, m, C]: +w e at the head node i, −w e at the tail index[i, c].

    ``directed=True`` keeps only the head term (each node collects its own edges, nothing is sent back
    to the tail): this is not the transpose, but it keeps information flowing from neighbours to a node
    only, which is what a causal (past-only) edge set needs. ``offsets`` (``Neighbourhood.edge_flat_offsets``,
    weights 0 on invalid edges): the shift fast path, both terms accumulated in place into one node signal.
    """
    _check_graph_tensors("weights", weights, index, "m")
    if e.ndim != 5 or e.shape[2:4] != index.shape:
        raise ValueError(f"e: expected an edge signal [B, G, N={index.shape[0]}, m={index.shape[1]}, C], "
                         f"got {list(e.shape)}")
    _check_offsets(offsets, index)
    if offsets is None:
        flow = weights.unsqueeze(-1) * e
        out = flow.sum(-2)
        if directed:
            return out
        return out.index_add(2, index.reshape(-1), flow.flatten(2, 3), alpha=-1)  # −w e at every tail node
    n = e.shape[2]
    shape = (*torch.broadcast_shapes(weights.shape[:2], e.shape[:2]), n, e.shape[-1])
    if not offsets:
        return e.new_zeros(shape, dtype=torch.promote_types(weights.dtype, e.dtype))
    out = _new_signal(e[..., 0, :], shape, torch.promote_types(weights.dtype, e.dtype))
    for c, o in enumerate(offsets):
        w, column = weights[..., c].unsqueeze(-1), e[..., c, :]
        out.addcmul_(w, column)
        if not directed:  # node j = i + o_c is the tail of edge (i, c)
            heads, tails = node_ranges(o, n)
            out[..., tails, :].addcmul_(w[..., heads, :], column[..., heads, :], value=-1.0)
    return out


def incidence_gram_operator(weights: torch.Tensor, index: torch.Tensor, *, directed: bool = False,
                            offsets: Sequence[int] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> C_wᵀ C_w x (= L_{w²} x, A.3) on an undirected edge set, or with ``directed`` the head part
    (``incidence_t_matvec(directed=True)``) of it. Reference (``offsets=None``): the two incidence mat-vecs.
    Fast path (``offsets``, ``Neighbourhood.edge_flat_offsets``): with a = w² and the diagonal summed once,
    (C_wᵀC_w x)_i = diag_i x_i − Σ_{edges (i, j)} a x_j − Σ_{edges (j, i)} a x_j, no edge signal."""
    _check_graph_tensors("weights", weights, index, "m")
    _check_offsets(offsets, index)
    if offsets is None:
        return lambda x: incidence_t_matvec(weights, index, incidence_matvec(weights, index, x), directed=directed)
    squared = column_major(weights.square())
    diagonal = squared.sum(-1)
    n = weights.shape[2]
    if not directed:  # an edge (i, c) also counts at its tail i + o_c
        for c, o in enumerate(offsets):
            heads, tails = node_ranges(o, n)
            diagonal[..., tails].add_(squared[..., heads, c])

    def gram(x: torch.Tensor) -> torch.Tensor:
        _check_graph_tensors("x", x, index, "C")
        out = _accumulate_neighbours(x * diagonal.unsqueeze(-1), squared, x, offsets, value=-1.0)
        return out if directed else _accumulate_neighbours(out, squared, x, offsets, value=-1.0, to_tails=True)

    return gram


__all__ = [
    "GRID_KINDS", "NORMALIZATIONS", "Neighbourhood", "SEQUENCE_KINDS", "SIMILARITIES", "adjacency_matvec",
    "build_neighbourhood", "column_major", "degree", "edge_logits", "edge_weights", "equivalent_band",
    "gather_neighbours", "grid_offsets", "incidence_gram_diagonal", "incidence_gram_operator", "incidence_matvec",
    "incidence_t_matvec", "is_grid_kind", "is_sequence_kind", "laplacian_matvec", "laplacian_operator",
    "metric_features", "neighbour_mask", "neighbourhood_radius", "neighbourhood_size", "node_ranges",
    "normalize_edges", "row_inner_weights", "sequence_offsets", "shift_neighbours",
]
