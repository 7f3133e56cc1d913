"""Per-layer compression, sparsity and SNR of a trained model's tokens on held-out data (docs/papers.md B.2, B.4, B.5).

For each attention layer ℓ, over held-out examples of the run (classification: test images, patch tokens only;
language models: validation windows), with Z_in the tokens the layer reads (its input, after the block's
LayerNorm where there is one) and Z_out the output of the block around it:

    R(Z)             coding rate ½ logdet(I + d/(Nε²) ZᵀZ) per image / window, averaged (B.5)
    R^c(Z; U^ℓ)      compression term ½ Σ_k logdet(I + p/(Nε²) (U_kᵀZ)ᵀ(U_kᵀZ)) against the layer's own per-head
                     subspaces (B.2): MSSA's learned U_k; for layers without learned subspaces (mhsa, kernel and graph
                     attentions) the per-head value projections W_V^k, as the table's ``subspaces`` column says;
                     each U_k is orthonormalised first (R^c against span(U_k)): learned U_k are neither orthonormal
                     nor of one scale, and R^c of the raw weights would measure their norm (weight decay) instead
    sparsity         share of exact zeros in Z_out (CRATE: after ISTA's ReLU; other blocks produce none)
    SNR              AoT's ‖P_k Z_k‖/‖(I − P_k) Z_k‖ (B.4) against span(U_k^ℓ), each token assigned to the subspace
                     holding most of its energy; ``snr_gain`` = SNR(Z_out)/SNR(Z_in), next to the theorem's 1 + ητ
                     where the layer has the theorem's form (tied output, thresholded softmax), else "-"

R and R^c are computed on tokens scaled to unit norm (``--raw`` keeps them), so that families whose residual streams
have different scales (vision AoT has no LayerNorm) compare; ε = 0.5 by default. Several run directories overlay
in one table and plot::

    unrollattn diagnose compression runs/diag-classify-quick/aot_mssa runs/diag-classify-quick/crate \\
        runs/diag-classify-quick/vit --out runs/diagnostics/compression
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.plots import Series, draw_series, new_figure, save_figure
from ..utils.tables import markdown_table, write_table
from .attention import attention_layers, attention_name, token_geometry
from .coding_rate import coding_rate, compression_rate, head_subspaces, learned_subspace_snr, orthonormal_bases
from .runs import load_run

__all__ = ["COLUMNS", "layer_measures", "main", "theory_gain", "write_outputs"]

COLUMNS = ["run", "layer", "attention", "subspaces", "R_in", "Rc_in", "R_out", "Rc_out", "sparsity_out", "snr_in",
           "snr_out", "snr_gain", "theory_gain"]


def theory_gain(layer: nn.Module) -> float | None:
    """1 + ητ (B.4) for an MSSA layer in the theorem's form (tied output, thresholded softmax), else None."""
    if getattr(layer, "tied_output", False) and getattr(layer, "nonlinearity", None) == "thresholded_softmax":
        return 1.0 + layer.step_size * layer.threshold
    return None


def _capture(model: nn.Module, inputs: torch.Tensor, batch_size: int, forward_kwargs: dict):
    """Per attention layer: (name, layer, its inputs Z_in, its block's outputs Z_out), prefix tokens dropped."""
    layers = attention_layers(model)
    modules = dict(model.named_modules())
    seen: dict[str, dict[str, list]] = {name: {"in": [], "out": []} for name, _ in layers}
    handles, first = [], {}
    for name, layer in layers:
        block = modules[name.rsplit(".", 1)[0]] if "." in name else layer
        prefix = token_geometry(model, layer)[1]

        def take_in(module, args, name=name, prefix=prefix):
            if not first.get(name):  # the first call of a block that calls its attention twice
                first[name] = True
                seen[name]["in"].append(args[0][:, prefix:].detach().double())

        def take_out(module, args, output, name=name, prefix=prefix):
            out = output[0] if isinstance(output, tuple) else output
            seen[name]["out"].append(out[:, prefix:].detach().double())

        handles += [layer.register_forward_pre_hook(take_in), block.register_forward_hook(take_out)]
    try:
        with torch.no_grad():
            for chunk in inputs.split(batch_size):
                first.clear()
                model(chunk, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    return [(name, layer, torch.cat(seen[name]["in"]), torch.cat(seen[name]["out"])) for name, layer in layers]


def layer_measures(model: nn.Module, inputs: torch.Tensor, *, eps: float = 0.5, normalize: bool = True,
                   batch_size: int = 64, run: str = "", forward_kwargs: dict | None = None) -> list[dict]:
    """One row per attention layer of ``model`` on ``inputs`` (the columns of :data:`COLUMNS`, module doc);
    ``forward_kwargs``: extra keywords of ``model``'s forward."""
    rows = []
    for index, (name, layer, z_in, z_out) in enumerate(_capture(model, inputs, batch_size, forward_kwargs or {})):
        bases, what = head_subspaces(layer)
        spans = orthonormal_bases(bases)
        scaled = (lambda z: F.normalize(z, dim=-1)) if normalize else (lambda z: z)
        snr_in, _ = learned_subspace_snr(z_in, bases)
        snr_out, _ = learned_subspace_snr(z_out, bases)
        rows.append({
            "run": run, "layer": index, "attention": attention_name(layer), "subspaces": what,
            "R_in": coding_rate(scaled(z_in), eps).mean().item(),
            "Rc_in": compression_rate(scaled(z_in), spans, eps).mean().item(),
            "R_out": coding_rate(scaled(z_out), eps).mean().item(),
            "Rc_out": compression_rate(scaled(z_out), spans, eps).mean().item(),
            "sparsity_out": (z_out == 0).double().mean().item(),
            "snr_in": snr_in, "snr_out": snr_out, "snr_gain": snr_out / snr_in, "theory_gain": theory_gain(layer),
        })
    return rows


def _change(rows: list[dict], key: str) -> str:
    first, last = rows[0][key], rows[-1][key]
    return f"{first:.4g} → {last:.4g} ({100 * (last - first) / abs(first):+.1f}%)" if first else "-"


def write_outputs(rows: list[dict], out_dir: str | Path, *, eps: float, normalize: bool, images: int) -> Path:
    """``compression.md`` (table + first → last layer changes), ``compression.csv`` and ``compression.png``."""
    out = Path(out_dir)
    runs = list(dict.fromkeys(r["run"] for r in rows))
    changes = "\n".join(f"- {run}: R^c(Z_in) {_change(sub, 'Rc_in')}; R(Z_in) {_change(sub, 'R_in')}; "
                        f"SNR(Z_in) {_change(sub, 'snr_in')}; geometric-mean per-layer SNR gain "
                        f"{math.prod(r['snr_gain'] for r in sub) ** (1 / len(sub)):.4g}"
                        for run in runs for sub in [[r for r in rows if r["run"] == run]])
    note = (f"ε = {eps}; R, R^c on {'unit-norm' if normalize else 'raw'} tokens; {images} held-out examples per run; "
            f"layer ℓ's Z_in is the input of its attention, Z_out the output of its block; R^c, SNR against the "
            f"layer's own subspaces (column `subspaces`).\n\nFirst → last layer:\n\n{changes}")
    write_table(rows, COLUMNS, out / "compression.md", out / "compression.csv", note=note,
                heading="# Per-layer coding rate, compression, sparsity and SNR")
    fig, axes = new_figure(2, 2, figsize=(10, 7))
    panels = [("Rc_in", "R^c(Z_in; U^ℓ)", False), ("R_in", "R(Z_in)", False), ("snr_in", "SNR(Z_in; U^ℓ)", True),
              ("sparsity_out", "share of zeros in Z_out", False)]
    for ax, (key, label, log_y) in zip(axes.flat, panels):
        series = [Series([r["layer"] for r in rows if r["run"] == run], [r[key] for r in rows if r["run"] == run],
                         label=run, style={"marker": "o"}) for run in runs]
        draw_series(ax, series, xlabel="layer ℓ", ylabel=label, log_y=log_y, legend=ax is axes.flat[0])
    fig.suptitle(f"Per-layer compression on held-out data (ε={eps})", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out / "compression.png", dpi=110)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unrollattn diagnose compression", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="classify or lm run directories")
    parser.add_argument("--images", type=int, default=256, help="held-out examples per run (images or windows)")
    parser.add_argument("--eps", type=float, default=0.5, help="ε of the coding rate")
    parser.add_argument("--raw", action="store_true", help="R, R^c on the tokens as they are (not unit-norm)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=None, help="output folder (default: the run directory; several runs: "
                                                    "<first run>/compression-overlay)")
    args = parser.parse_args(argv)
    if args.eps <= 0:
        raise ValueError(f"--eps: expected a positive ε, got {args.eps}")
    rows, labels = [], set()
    for run_dir in args.run_dirs:
        run = load_run(run_dir)
        label = run.label if run.label not in labels else f"{run.label} ({Path(run_dir).name})"
        labels.add(label)
        if run.is_restoration:
            raise ValueError(f"{run_dir}: a restoration run has no tokens or subspaces; compression applies to "
                             f"classify and lm runs")
        rows += layer_measures(run.model, run.heldout(args.images)["inputs"], eps=args.eps, normalize=not args.raw,
                               batch_size=args.batch_size, run=label,
                               forward_kwargs=run.forward_kwargs)
    out = args.out or (args.run_dirs[0] if len(args.run_dirs) == 1 else Path(args.run_dirs[0]) / "compression-overlay")
    write_outputs(rows, out, eps=args.eps, normalize=not args.raw, images=args.images)
    print(markdown_table(rows, COLUMNS))
    print(f"\nwrote {out}/compression.md, compression.csv, compression.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
