"""Attention maps of a trained run, per layer and head, from the layers' own forward (``diagnostics.attention``).

    unrollattn diagnose maps RUN_DIR [--index 0] [--patch ROW,COL] [--images 32] [--window 32] [--out DIR]

Classification runs (one held-out test image, ``--index``):
  ``maps.png``            per layer (rows) and head: class-token-to-patch weights and the weights of the chosen
                          query patch (``--patch``, marked ×; default the centre) drawn over the image;
  ``maps_bilateral.png``  bilateral attention: the range factor and the spatial factor of the chosen patch, each
                          normalised over the keys (their renormalised product is the attention, C.5);
  ``maps_graph.png``      glr / gtv: the learned graph's edge weights between patch centres (line width and
                          colour ∝ weight) and the class token's dense row.
Restoration runs (uGLR / uGTV, one test photo): ``maps_restoration.png``, the image after each unrolled block and
the mean edge weight of every pixel's learned graph (low across edges: the filter does not smooth across them).
Language-model runs: ``maps.png``, token-to-token weights over the first ``--window`` tokens of a validation window.

``maps.md`` / ``maps.csv``: per layer and head, over ``--images`` held-out examples: the mean attention distance
(patches or tokens, over patch queries and patch keys), the entropy of the class token's weights (nats), the
learned bandwidths h_y, h_p of kernel attentions and the mean edge weight of graph layers (restoration: per block,
PSNR of the image after the block).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

import torch

from ..utils.plots import new_figure, save_figure
from ..utils.tables import markdown_table, write_table
from .attention import AttentionRecord, attention_maps
from .runs import LoadedRun, load_run

__all__ = ["COLUMNS", "layer_statistics", "main"]

COLUMNS = ["layer", "head", "attention", "mean_distance", "cls_entropy", "range_bandwidth", "spatial_bandwidth",
           "edge_weight_mean", "psnr"]


TABLE_NOTE = ("Per layer and head over the held-out examples: mean attention distance (patches or tokens; patch queries "
              "and keys), entropy of the class token's weights (nats), learned bandwidths h_y / h_p (kernel attentions), "
              "mean edge weight (graph layers); restoration: per block, PSNR (dB) of the image after the block.")


def _positions(rec: AttentionRecord, n: int) -> torch.Tensor:
    """Key positions of the non-prefix tokens: (row, col) on the grid, else the 1-D index."""
    if rec.grid is not None:
        rows, cols = torch.meshgrid(torch.arange(rec.grid[0]), torch.arange(rec.grid[1]), indexing="ij")
        return torch.stack([rows.flatten(), cols.flatten()], -1).double()
    return torch.arange(n).double()[:, None]


def _bandwidths(module, name: str, heads: int) -> list[float | None]:
    param = getattr(module, name, None)
    return param.detach().exp().double().tolist() if param is not None else [None] * heads


def layer_statistics(records: Sequence[AttentionRecord]) -> list[dict]:
    """One row per (layer, head) of the first call of each layer (module doc, ``maps.csv``)."""
    rows = []
    for rec in (r for r in records if r.call == 0):
        t, p = rec.tensors, rec.num_prefix_tokens
        if "weights" in t:
            w = t["weights"].double()
            heads = w.shape[1]
            patch = w[:, :, p:, p:]
            patch = patch / patch.sum(-1, keepdim=True).clamp_min(1e-30)
            pos = _positions(rec, patch.shape[-1])
            dist = torch.cdist(pos, pos)
            mean_distance = (patch * dist).sum(-1).mean((0, 2)).tolist()
            if p:
                cls = w[:, :, 0, :].clamp_min(1e-30)
                cls_entropy = (-(cls * cls.log()).sum(-1)).mean(0).tolist()
            else:
                cls_entropy = [None] * heads
            edge = [None] * heads
        elif "edge_weights" in t:
            ew, valid = t["edge_weights"].double(), t["neighbour_valid"]
            heads = ew.shape[1]
            edge = (ew[..., valid].mean((0, 2))).tolist()
            mean_distance = [None] * heads
            cls_entropy = ([(-(pw * pw.clamp_min(1e-30).log()).sum(-1)).mean().item() for pw in
                            t["prefix_weights"][:, :, 0].double().unbind(1)] if "prefix_weights" in t
                           else [None] * heads)
        else:
            continue
        h_y = _bandwidths(rec.module, "log_range_bandwidth", heads)
        h_p = _bandwidths(rec.module, "log_spatial_bandwidth", heads)
        for h in range(heads):
            rows.append({"layer": rec.layer, "head": h, "attention": rec.attention, "mean_distance": mean_distance[h],
                         "cls_entropy": cls_entropy[h], "range_bandwidth": h_y[h], "spatial_bandwidth": h_p[h],
                         "edge_weight_mean": edge[h], "psnr": None})
    return rows


def _image(pixels: torch.Tensor):
    """[C, H, W] in [0, 1] -> an array for imshow (grey for one channel)."""
    img = pixels.clamp(0, 1).permute(1, 2, 0).numpy()
    return img[..., 0] if img.shape[-1] == 1 else img


def _overlay(ax, image, grid_map: torch.Tensor, title: str, mark: tuple[int, int] | None = None) -> None:
    h, w = image.shape[:2]
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, extent=(0, w, h, 0))
    ax.imshow(grid_map.numpy(), cmap="inferno", alpha=0.6, extent=(0, w, h, 0), interpolation="nearest")
    if mark is not None:
        gh, gw = grid_map.shape
        ax.plot((mark[1] + 0.5) * w / gw, (mark[0] + 0.5) * h / gh, "x", color="cyan", markersize=6)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def _dense_figures(records, pixels, patch, out: Path) -> list[Path]:
    image = _image(pixels)
    dense = [r for r in records if r.call == 0 and "weights" in r.tensors and r.grid is not None]
    written = []
    if dense:
        heads = dense[0].tensors["weights"].shape[1]
        cols = heads * (2 if dense[0].num_prefix_tokens else 1)
        fig, axes = new_figure(len(dense), cols, figsize=(1.9 * cols, 1.9 * len(dense)))
        for row, rec in enumerate(dense):
            w, p, (gh, gw) = rec.tensors["weights"][0].float(), rec.num_prefix_tokens, rec.grid
            query = p + patch[0] * gw + patch[1]
            for h in range(heads):
                col = h * (2 if p else 1)
                if p:
                    _overlay(axes[row, col], image, w[h, 0, p:].view(gh, gw), f"L{rec.layer} h{h} {rec.attention}: cls")
                _overlay(axes[row, col + (1 if p else 0)], image, w[h, query, p:].view(gh, gw),
                         f"L{rec.layer} h{h}: patch {patch}", patch)
        fig.tight_layout()
        written.append(save_figure(fig, out / "maps.png", dpi=100))
    bilateral = [r for r in dense if "spatial" in r.tensors]
    if bilateral:
        heads = bilateral[0].tensors["weights"].shape[1]
        fig, axes = new_figure(len(bilateral), 2 * heads, figsize=(3.8 * heads, 1.9 * len(bilateral)))
        for row, rec in enumerate(bilateral):
            p, (gh, gw) = rec.num_prefix_tokens, rec.grid
            query = p + patch[0] * gw + patch[1]
            h_p = _bandwidths(rec.module, "log_spatial_bandwidth", heads)
            for h in range(heads):
                for j, part in enumerate(("range", "spatial")):
                    _overlay(axes[row, 2 * h + j], image, rec.tensors[part][0, h, query, p:].float().view(gh, gw),
                             f"L{rec.layer} h{h} {part}" + (f" h_p={h_p[h]:.2f}" if part == "spatial" else ""), patch)
        fig.tight_layout()
        written.append(save_figure(fig, out / "maps_bilateral.png", dpi=100))
    graph = [r for r in records if r.call == 0 and "edge_weights" in r.tensors and r.grid is not None]
    if graph:
        from matplotlib.collections import LineCollection

        heads = graph[0].tensors["edge_weights"].shape[1]
        has_cls = "prefix_weights" in graph[0].tensors
        cols = heads * (2 if has_cls else 1)
        fig, axes = new_figure(len(graph), cols, figsize=(1.9 * cols, 1.9 * len(graph)))
        h_img, w_img = image.shape[:2]
        for row, rec in enumerate(graph):
            (gh, gw), t = rec.grid, rec.tensors
            centres = torch.stack(torch.meshgrid((torch.arange(gh) + 0.5) * h_img / gh,
                                                 (torch.arange(gw) + 0.5) * w_img / gw, indexing="ij"), -1).view(-1, 2)
            index, valid = t["neighbour_index"].cpu(), t["neighbour_valid"].cpu()
            src = torch.arange(index.shape[0])[:, None].expand_as(index)[valid]
            dst = index[valid]
            segments = torch.stack([centres[src].flip(-1), centres[dst].flip(-1)], 1).numpy()
            for h in range(heads):
                ax = axes[row, h * (2 if has_cls else 1)]
                weight = t["edge_weights"][0, h].float().cpu()[valid]
                scale = weight / weight.max().clamp_min(1e-30)
                ax.imshow(image, cmap="gray" if image.ndim == 2 else None, extent=(0, w_img, h_img, 0), alpha=0.5)
                ax.add_collection(LineCollection(segments, linewidths=0.3 + 2.5 * scale.numpy(), cmap="viridis",
                                                 array=scale.numpy()))
                ax.set_title(f"L{rec.layer} h{h} {rec.attention}: edges", fontsize=7)
                ax.axis("off")
                if has_cls:
                    _overlay(axes[row, 2 * h + 1], image, t["prefix_weights"][0, h, 0, rec.num_prefix_tokens:]
                             .float().view(gh, gw), f"L{rec.layer} h{h}: cls")
        fig.tight_layout()
        written.append(save_figure(fig, out / "maps_graph.png", dpi=100))
    return written


def _restoration(run: LoadedRun, index: int, out: Path) -> tuple[list[dict], list[Path]]:
    held = run.heldout(index + 1)
    y, truth = held["inputs"][index:index + 1], held["display"][index]
    records = attention_maps(run.model, y)
    initial = run.model.initial(y)[0]
    def psnr(img):  # without the recipe's 4-pixel border
        return -10 * math.log10(max((img - truth).square()[..., 4:-4, 4:-4].mean().item(), 1e-12))

    rows = []
    images = [(f"{'bilinear' if run.model.init == 'bilinear' else 'Hᵀy'} start: {psnr(initial):.2f} dB", initial)]
    for rec in records:
        ew, valid = rec.tensors["edge_weights"][0].double(), rec.tensors["neighbour_valid"]
        rows.append({"layer": rec.layer, "head": None, "attention": rec.attention, "mean_distance": None,
                     "cls_entropy": None, "range_bandwidth": None, "spatial_bandwidth": None,
                     "edge_weight_mean": ew[..., valid].mean().item(), "psnr": psnr(rec.output[0])})
        images.append((f"after block {rec.layer + 1}: {rows[-1]['psnr']:.2f} dB", rec.output[0]))
    cols = len(images)
    fig, axes = new_figure(2, cols, figsize=(2.4 * cols, 5))
    h, w = truth.shape[-2:]
    for col, (title, img) in enumerate(images):
        axes[0, col].imshow(_image(img.float()))
        axes[0, col].set_title(title, fontsize=7)
        axes[0, col].axis("off")
    axes[1, 0].imshow(_image(truth))
    axes[1, 0].set_title("ground truth", fontsize=7)
    axes[1, 0].axis("off")
    for col, rec in enumerate(records, start=1):
        ew, valid = rec.tensors["edge_weights"][0].float(), rec.tensors["neighbour_valid"]
        per_pixel = (ew * valid).sum(-1) / valid.sum(-1).clamp_min(1)  # [G, N], mean over the pixel's edges
        axes[1, col].imshow(per_pixel.mean(0).view(h, w).cpu().numpy(), cmap="magma")
        axes[1, col].set_title(f"block {rec.layer + 1}: mean edge weight", fontsize=7)
        axes[1, col].axis("off")
    fig.tight_layout()
    return rows, [save_figure(fig, out / "maps_restoration.png", dpi=100)]


def _text_figure(run: LoadedRun, records, window: int, out: Path) -> Path:
    ids = run.heldout(1)["display"][0][:window]
    labels = [repr(t)[1:-1] for t in run.decode_tokens(ids)]
    dense = [r for r in records if r.call == 0 and "weights" in r.tensors]
    if not dense:
        raise ValueError(f"{run.run_dir}: no dense attention weights to draw as token-to-token maps "
                         f"(graph attentions record edge weights)")
    heads = dense[0].tensors["weights"].shape[1]
    fig, axes = new_figure(len(dense), heads, figsize=(3.2 * heads, 3.2 * len(dense)))
    for row, rec in enumerate(dense):
        for h in range(heads):
            ax = axes[row, h]
            ax.imshow(rec.tensors["weights"][0, h, :window, :window].float().cpu().numpy(), cmap="viridis")
            ax.set_title(f"L{rec.layer} h{h} {rec.attention}", fontsize=7)
            ax.set_xticks(range(len(labels)), labels, fontsize=4, rotation=90)
            ax.set_yticks(range(len(labels)), labels, fontsize=4)
    fig.tight_layout()
    return save_figure(fig, out / "maps.png", dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unrollattn diagnose maps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a classify, restore or lm run directory")
    parser.add_argument("--index", type=int, default=0, help="which held-out example to draw")
    parser.add_argument("--patch", default=None, help="query patch ROW,COL of the patch-to-patch maps (default: centre)")
    parser.add_argument("--images", type=int, default=32, help="held-out examples for the table's statistics")
    parser.add_argument("--window", type=int, default=32, help="tokens shown in language-model maps")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR)")
    args = parser.parse_args(argv)
    if args.index < 0:
        raise ValueError(f"--index: expected >= 0, got {args.index}")
    run = load_run(args.run_dir)
    out = Path(args.out or args.run_dir)
    if run.is_restoration:
        rows, written = _restoration(run, args.index, out)
    else:
        held = run.heldout(max(args.images, args.index + 1))
        rows = layer_statistics(attention_maps(run.model, held["inputs"][: args.images], **run.forward_kwargs))
        one = attention_maps(run.model, held["inputs"][args.index:args.index + 1], **run.forward_kwargs)
        if run.is_language_model:
            written = [_text_figure(run, one, args.window, out)]
        else:
            grid = next((r.grid for r in one if r.grid is not None), None)
            if grid is None:
                raise ValueError(f"{args.run_dir}: the model's attention layers know no patch grid")
            patch = (grid[0] // 2, grid[1] // 2)
            if args.patch:
                try:
                    patch = tuple(int(v) for v in args.patch.split(","))
                except ValueError:
                    patch = ()
                if len(patch) != 2 or not (0 <= patch[0] < grid[0] and 0 <= patch[1] < grid[1]):
                    raise ValueError(f"--patch: expected ROW,COL inside the {grid[0]}x{grid[1]} patch grid, "
                                     f"got {args.patch!r}")
            written = _dense_figures(one, held["display"][args.index], patch, out)
    write_table(rows, COLUMNS, out / "maps.md", out / "maps.csv", heading=f"# Attention maps: {run.label}",
                note=TABLE_NOTE)
    print(markdown_table(rows, COLUMNS))
    print("\nwrote " + ", ".join(str(p) for p in [*written, out / "maps.md", out / "maps.csv"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
