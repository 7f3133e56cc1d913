"""Per-layer SNR of tokens from the mixture of noisy subspaces (docs/papers.md B.1, B.4).

Tokens drawn from Definition 1 pass through L unrolled MSSA layers Z <- Z + eta * sum_k U_k U_k^T Z
phi(Z^T U_k U_k^T Z) with the true bases U_k. The theorem predicts SNR_{l+1} = (1 + eta*tau) SNR_l for
the thresholded softmax phi = tau * 1{softmax > tau}. The table shows the measured per-layer gain
next to that factor.

    unrollattn diagnose snr --layers 6 --eta 0.2 --tau 0.75 --deltas 0.2,0.5
    unrollattn diagnose snr --run RUN_DIR      # a trained model, against its learned U_k (trained_snr.py)
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..layers.attention import MultiHeadSubspaceSelfAttention
from ..utils.plots import Series, series_figure
from ..utils.tables import markdown_table, write_table


@dataclass(frozen=True)
class SubspaceMixture:
    """Definition 1: K orthonormal p-dim subspaces of R^d, N/K tokens each, off-subspace noise std delta."""

    subspaces: int = 4
    subspace_dim: int = 32
    tokens: int = 256
    delta: float = 0.2
    ambient_dim: int | None = None  # default K * p

    def __post_init__(self):
        d = self.ambient_dim or self.subspaces * self.subspace_dim
        if self.subspaces < 1 or self.subspace_dim < 1 or self.tokens < self.subspaces:
            raise ValueError("expected subspaces >= 1, subspace_dim >= 1 and tokens >= subspaces")
        if d < self.subspaces * self.subspace_dim:
            raise ValueError(f"ambient_dim={d} must be at least subspaces * subspace_dim = {self.subspaces * self.subspace_dim}")
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")

    @property
    def dim(self) -> int:
        return self.ambient_dim or self.subspaces * self.subspace_dim

    def sample(self, generator: torch.Generator, dtype=torch.float64):
        """Return (Z [N, d], bases [K, d, p], labels [N]) with z_i = U_k a_i + sum_{j != k} U_j e_ij."""
        k, p = self.subspaces, self.subspace_dim
        q, _ = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=generator, dtype=dtype))
        bases = q[:, : k * p].reshape(self.dim, k, p).permute(1, 0, 2).contiguous()  # U_k, mutually orthogonal
        labels = torch.arange(self.tokens) % k
        coords = self.delta * torch.randn(self.tokens, k, p, generator=generator, dtype=dtype)
        coords[torch.arange(self.tokens), labels] = torch.randn(self.tokens, p, generator=generator, dtype=dtype)
        tokens = torch.einsum("nkp,kdp->nd", coords, bases)
        return tokens, bases, labels


def subspace_snr(tokens: torch.Tensor, bases: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SNR(Z_k) = ||U_k U_k^T Z_k||_F / ||(I - U_k U_k^T) Z_k||_F for each subspace k (B.4)."""
    values = []
    for k in range(bases.shape[0]):
        z_k = tokens[labels == k]
        signal = z_k @ bases[k] @ bases[k].T
        values.append(signal.norm() / (z_k - signal).norm())
    return torch.stack(values)


def true_basis_mssa(bases: torch.Tensor, eta: float, tau: float | None, nonlinearity: str) -> MultiHeadSubspaceSelfAttention:
    """An MSSA layer whose heads are the true U_k, tied output, no temperature: eta * sum_k U_k U_k^T Z phi(.)."""
    k, d, p = bases.shape
    layer = MultiHeadSubspaceSelfAttention(d, k, head_dim=p, tied_output=True, step_size=eta, scale=1.0,
                                           nonlinearity=nonlinearity, threshold=tau).to(bases.dtype)
    with torch.no_grad():
        layer.subspace.weight.copy_(bases.transpose(1, 2).reshape(k * p, d))  # rows: U_1^T, ..., U_K^T
    return layer


@torch.no_grad()
def snr_trajectory(mixture: SubspaceMixture, layers: int, eta: float, tau: float | None,
                   nonlinearity: str = "thresholded_softmax", seed: int = 0) -> list[float]:
    """Mean SNR over subspaces before layer 1 and after each of ``layers`` unrolled MSSA layers."""
    gen = torch.Generator().manual_seed(seed)
    tokens, bases, labels = mixture.sample(gen)
    layer = true_basis_mssa(bases, eta, tau, nonlinearity).eval()
    snrs = [subspace_snr(tokens, bases, labels).mean().item()]
    z = tokens[None]
    for _ in range(layers):
        z = z + layer(z)
        snrs.append(subspace_snr(z[0], bases, labels).mean().item())
    return snrs


def theorem_tau_range(mixture: SubspaceMixture) -> tuple[float, float]:
    """tau in (1/2, 1/(1 + N exp(-9p/32))] as the theorem requires."""
    return 0.5, 1.0 / (1.0 + mixture.tokens * math.exp(-9 * mixture.subspace_dim / 32))


def run(deltas=(0.2, 0.5), layers=6, eta=0.2, tau=0.75, subspaces=4, subspace_dim=32, tokens=256, seed=0,
        nonlinearities=("thresholded_softmax", "softmax")) -> list[dict]:
    rows = []
    for delta in deltas:
        mixture = SubspaceMixture(subspaces, subspace_dim, tokens, delta)
        lo, hi = theorem_tau_range(mixture)
        if not lo < tau <= hi:
            raise ValueError(f"tau={tau} is outside the theorem's range ({lo}, {hi:.4f}] for N={tokens}, p={subspace_dim}")
        curves = {phi: snr_trajectory(mixture, layers, eta, tau if phi == "thresholded_softmax" else None, phi, seed)
                  for phi in nonlinearities}
        for layer in range(layers + 1):
            row = {"delta": delta, "layer": layer, "theory_gain": 1 + eta * tau}
            for phi, curve in curves.items():
                row[f"snr_{phi}"] = curve[layer]
                row[f"gain_{phi}"] = curve[layer] / curve[layer - 1] if layer else float("nan")
            rows.append(row)
    return rows


def write_outputs(rows: list[dict], out_dir: str | Path, eta: float, tau: float) -> Path:
    """``out_dir/snr.md``, ``snr.csv`` (every column of ``rows``) and ``snr.png`` (SNR against layer, log scale, with
    the theorem's (1 + ητ)^ℓ growth dashed)."""
    out = Path(out_dir)
    columns = list(rows[0])
    write_table(rows, columns, out / "snr.md", out / "snr.csv")
    series = []
    for delta in sorted({r["delta"] for r in rows}):
        sub = [r for r in rows if r["delta"] == delta]
        xs = [r["layer"] for r in sub]
        snr_keys = [k for k in columns if k.startswith("snr_")]
        series += [Series(xs, [r[key] for r in sub], label=f"δ={delta}, {key[4:]}", style={"marker": "o"})
                   for key in snr_keys]
        start = sub[0][snr_keys[0]]
        series.append(Series(xs, [start * (1 + eta * tau) ** x for x in xs],
                             label=f"δ={delta}, theory (1+ητ)^ℓ" if delta == rows[0]["delta"] else None,
                             style={"color": "k", "linestyle": "--", "linewidth": 0.8}))
    series_figure(series, out / "snr.png", dpi=120, log_y=True, xlabel="layer ℓ", ylabel="SNR (mean over subspaces)",
                  title=f"Unrolled MSSA with true bases, η={eta}, τ={tau}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="unrollattn diagnose snr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deltas", default="0.2,0.5", help="comma-separated noise levels delta")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--eta", type=float, default=0.2, help="step size eta")
    parser.add_argument("--tau", type=float, default=0.75, help="threshold tau of the thresholded softmax")
    parser.add_argument("--subspaces", type=int, default=4)
    parser.add_argument("--subspace-dim", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default: runs/diagnose-snr, or RUN_DIR with --run)")
    parser.add_argument("--run", default=None, metavar="RUN_DIR",
                        help="a trained classify / lm run: per-layer SNR against its learned U_k (trained_snr.py)")
    parser.add_argument("--images", type=int, default=256, help="with --run: held-out examples")
    args = parser.parse_args(argv)
    if args.run is not None:
        from .trained_snr import trained_snr_rows, write_trained_outputs

        rows = trained_snr_rows(args.run, images=args.images, eta=args.eta, tau=args.tau)
        out = write_trained_outputs(rows, args.out or args.run, eta=args.eta, tau=args.tau)
        print(markdown_table(rows, list(rows[0])))
        print(f"\nwrote {out}/snr.md, snr.csv, snr.png")
        return 0
    args.out = args.out or "runs/diagnose-snr"
    try:
        deltas = tuple(float(d) for d in args.deltas.split(","))
    except ValueError:
        raise ValueError(f"--deltas: expected comma-separated numbers, got {args.deltas!r}") from None
    rows = run(deltas, args.layers, args.eta, args.tau, args.subspaces, args.subspace_dim, args.tokens, args.seed)
    out = write_outputs(rows, args.out, args.eta, args.tau)
    print(markdown_table(rows, list(rows[0])))
    print(f"\nwrote {out}/snr.md, snr.csv, snr.png")
    return 0


__all__ = ["SubspaceMixture", "main", "run", "snr_trajectory", "subspace_snr", "true_basis_mssa"]


if __name__ == "__main__":
    raise SystemExit(main())
