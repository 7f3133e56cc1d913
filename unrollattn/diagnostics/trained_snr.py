"""AoT's per-layer SNR (docs/papers.md B.4) on a trained model, against its learned subspaces instead of the true
bases: ``unrollattn diagnose snr --run RUN_DIR``.

For layer ℓ, on held-out data of the run: SNR(Z_in; U^ℓ) of the tokens the layer reads and SNR(Z_out; U^ℓ) of its
block's output, both against span(U_k^ℓ) with each token assigned to the subspace holding most of its energy
(``coding_rate.learned_subspace_snr``), and the layer's gain SNR(Z_out)/SNR(Z_in) next to the theorem's 1 + ητ.
A trained model's layers are not in the theorem's form unless built so (tied output, thresholded softmax); the table
then shows the factor of the given η, τ as a reference only (``theory_gain_of``: "layer" or "--eta/--tau").
"""
from __future__ import annotations

from pathlib import Path

from ..utils.plots import Series, series_figure
from ..utils.tables import write_table
from .compression import layer_measures
from .runs import load_run

__all__ = ["COLUMNS", "trained_snr_rows", "write_trained_outputs"]

COLUMNS = ["run", "layer", "attention", "subspaces", "snr_in", "snr_out", "snr_gain", "theory_gain", "theory_gain_of"]


def trained_snr_rows(run_dir: str | Path, *, images: int = 256, eta: float = 0.2, tau: float = 0.75) -> list[dict]:
    """One row per attention layer of the run's model (module doc)."""
    run = load_run(run_dir)
    if run.is_restoration:
        raise ValueError(f"{run_dir}: a restoration run has no tokens or subspaces; the SNR applies to classify and "
                         f"lm runs")
    rows = []
    for r in layer_measures(run.model, run.heldout(images)["inputs"], run=run.label,
                            forward_kwargs=run.forward_kwargs):
        own = r["theory_gain"] is not None
        rows.append({**{k: r[k] for k in COLUMNS[:7]}, "theory_gain": r["theory_gain"] if own else 1 + eta * tau,
                     "theory_gain_of": "layer" if own else "--eta/--tau"})
    return rows


def write_trained_outputs(rows: list[dict], out_dir: str | Path, *, eta: float, tau: float) -> Path:
    """``snr.md``, ``snr.csv`` and ``snr.png`` (SNR in / out per layer, log scale, with (1 + ητ)^ℓ dashed)."""
    out = Path(out_dir)
    gains = [r["snr_gain"] for r in rows]
    note = (f"SNR against span(U_k^ℓ) of each layer's own subspaces (column `subspaces`); gain = SNR(Z_out)/SNR(Z_in) "
            f"per layer; mean gain {sum(gains) / len(gains):.4g} vs the theorem's 1 + ητ = {1 + eta * tau:.4g} "
            f"(η={eta}, τ={tau}).")
    write_table(rows, COLUMNS, out / "snr.md", out / "snr.csv", heading=f"# Per-layer SNR: {rows[0]['run']}", note=note)
    xs = [r["layer"] for r in rows]
    series = [Series(xs, [r["snr_in"] for r in rows], label="SNR(Z_in; U^ℓ)", style={"marker": "o"}),
              Series(xs, [r["snr_out"] for r in rows], label="SNR(Z_out; U^ℓ)", style={"marker": "s"}),
              Series(xs, [rows[0]["snr_in"] * (1 + eta * tau) ** x for x in xs], label=f"(1+ητ)^ℓ, η={eta}, τ={tau}",
                     style={"color": "k", "linestyle": "--", "linewidth": 0.8})]
    series_figure(series, out / "snr.png", dpi=120, log_y=True, xlabel="layer ℓ", ylabel="SNR",
                  title=f"Trained {rows[0]['run']}: SNR against the learned subspaces")
    return out
