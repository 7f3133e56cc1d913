"""Per-layer SNR of tokens from the mixture of noisy subspaces (docs/papers.md B.1, B.4).

Tokens drawn from Definition 1 pass through L unrolled MSSA layers Z <- Z + eta * sum_k U_k U_k^T Z
phi(Z^T U_k U_k^T Z) with the true bases U_k. The theorem predicts SNR_{l+1} = (1 + eta*tau) SNR_l for
the thresholded softmax phi = tau * 1{softmax > tau}. The table shows the measured per-layer gain
next to that factor.

    unrollattn diagnose snr --layers 6 --eta 0.2 --tau 0.75 --deltas 0.2,0.5
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..layers.attention import MultiHeadSubspaceSelfAttention


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


def to_markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) and not math.isnan(v) else ("" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_outputs(rows: list[dict], out_dir: str | Path, eta: float, tau: float) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "snr.md", (to_markdown(rows) + "\n").encode())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(out / "snr.csv", buf.getvalue().encode())

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for delta in sorted({r["delta"] for r in rows}):
        sub = [r for r in rows if r["delta"] == delta]
        xs = [r["layer"] for r in sub]
        for key in (k for k in sub[0] if k.startswith("snr_")):
            ax.plot(xs, [r[key] for r in sub], marker="o", label=f"δ={delta}, {key[4:]}")
        ax.plot(xs, [sub[0][next(k for k in sub[0] if k.startswith('snr_'))] * (1 + eta * tau) ** x for x in xs],
                "k--", lw=0.8, label=f"δ={delta}, theory (1+ητ)^ℓ" if delta == rows[0]["delta"] else None)
    ax.set_yscale("log")
    ax.set_xlabel("layer ℓ")
    ax.set_ylabel("SNR (mean over subspaces)")
    ax.set_title(f"Unrolled MSSA with true bases, η={eta}, τ={tau}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = out / "snr.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out / "snr.png")
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
    parser.add_argument("--out", default="runs/diagnose-snr")
    args = parser.parse_args(argv)
    try:
        deltas = tuple(float(d) for d in args.deltas.split(","))
    except ValueError:
        raise ValueError(f"--deltas: expected comma-separated numbers, got {args.deltas!r}") from None
    rows = run(deltas, args.layers, args.eta, args.tau, args.subspaces, args.subspace_dim, args.tokens, args.seed)
    out = write_outputs(rows, args.out, args.eta, args.tau)
    print(to_markdown(rows))
    print(f"\nwrote {out}/snr.md, snr.csv, snr.png")
    return 0


__all__ = ["SubspaceMixture", "main", "run", "snr_trajectory", "subspace_snr", "true_basis_mssa"]


if __name__ == "__main__":
    raise SystemExit(main())
