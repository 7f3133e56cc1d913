"""Forward time and peak memory of uGLR / uGTV vs the Swin transformer baseline, against image size.

    python -m benchmarks.graph_restoration                         # CPU: 128, 256, 512
    python -m benchmarks.graph_restoration --sizes 256,512,1024 --threads 1 --repeats 1 --warmup 0 --quick
    python -m benchmarks.graph_restoration --sizes 256,512,1024 --device cuda

One RGB image (batch 1), Bayer RGGB demosaicking (``--task sr2``: ×2 interpolation of an image of half
the size), no gradient, the registered models at their default sizes (``--quick``: the sizes of the
``demosaic_quick`` preset). Each row reports the median seconds of ``--repeats`` calls (after ``--warmup``
calls at every size; the timed calls interleaved over the sizes), peak tensor
memory (CUDA allocator peak, or live-tensor tracking on CPU, :mod:`benchmarks.common`) and the growth
against the previous size: the graph models cost O(N·k) per mat-vec, so 4× pixels should give ≤ 4.5×
time and memory ("linear" column). Writes ``benchmarks/results/graph_restoration_<cpu|cuda>.md``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import unrollattn
import unrollattn.vision.restoration_baselines  # noqa: F401  (registers the restoration models)
from unrollattn.utils.params import count_parameters
from benchmarks.common import benchmark_settings, device_name, peak_memory_mb, publish_table, time_interleaved

COLUMNS = ["model", "params", "size", "megapixels", "seconds", "s_per_mp", "peak_mem_mb", "time_ratio", "mem_ratio",
           "linear"]
LINEAR_LIMIT = 4.5


def build(variant: str, task: str, quick: bool):
    """(model, registered name) of restoration ``variant`` for ``task`` from the registry, at its registered size or,
    with ``quick``, at the ``<task>_quick`` preset's."""
    from unrollattn.recipes import restore

    name = restore.model_name(task, variant)
    options = restore.load_config(f"{task}_quick", [f"model.variant={variant}"]).model.options(task) if quick else {}
    return unrollattn.build_model(name, **options), name


def measure_sizes(model, sizes: list[int], device, repeats: int, warmup: int = 1) -> list[dict]:
    """Median forward seconds and peak memory at every size, after ``warmup`` calls at every size, the timed calls
    interleaved over the sizes (:func:`benchmarks.common.time_interleaved`)."""
    calls = {}
    for size in sizes:
        torch.manual_seed(0)
        y = model.observe(torch.rand(1, 3, size, size, device=device))  # the model's own forward operator H

        def forward(y=y):
            with torch.no_grad():
                model(y)

        calls[size] = forward
    seconds = time_interleaved(calls, device, warmup, repeats)
    return [{"size": f"{size}x{size}", "megapixels": size * size / 1e6, "seconds": seconds[size],
             "s_per_mp": seconds[size] / (size * size / 1e6), "peak_mem_mb": peak_memory_mb(calls[size], device)}
            for size in sizes]


@benchmark_settings
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default=None, help="comma-separated square sizes (default: 128,256,512 on CPU, "
                                                      "256,512,1024 on CUDA)")
    parser.add_argument("--variants", default="uglr,ugtv,transformer", help="restore recipe variants")
    parser.add_argument("--task", default="demosaic", choices=["demosaic", "sr2"])
    parser.add_argument("--quick", action="store_true", help="the demosaic_quick preset's model sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in (args.sizes or ("256,512,1024" if device.type == "cuda" else "128,256,512")).split(",")]
    rows, verdicts = [], []
    load_start = os.getloadavg()[0]
    for variant in args.variants.split(","):
        model, name = build(variant, args.task, args.quick)
        model = model.to(device).eval()
        params = count_parameters(model)
        previous = None
        for size, measured in zip(sizes, measure_sizes(model, sizes, device, args.repeats, args.warmup)):
            row = {"model": name, "params": params, **measured}
            if previous is not None:
                scale = row["megapixels"] / previous["megapixels"]
                row["time_ratio"] = row["seconds"] / previous["seconds"]
                row["mem_ratio"] = row["peak_mem_mb"] / max(previous["peak_mem_mb"], 1e-9)
                limit = LINEAR_LIMIT * scale / 4
                ok = row["time_ratio"] <= limit and row["mem_ratio"] <= limit
                row["linear"] = "yes" if ok else "NO"
                verdicts.append((name, size, ok))
            else:
                row.update(time_ratio="-", mem_ratio="-", linear="-")
            previous = row
            print(" ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in COLUMNS),
                  flush=True)
            rows.append(row)
    title = (f"Restoration forward pass (batch 1, no grad, {args.task}) vs image size, {device_name(device)}, "
             f"torch {torch.__version__}{', quick-preset model sizes' if args.quick else ', default model sizes'}")
    load_end = os.getloadavg()[0]
    note = (f"time_ratio / mem_ratio: against the previous size (4x the pixels for doubling sizes); linear = both "
            f"ratios <= {LINEAR_LIMIT} per 4x pixels. CPU peak memory counts live tensor storages created during the "
            f"call (benchmarks/common.py). Machine load (1-min load average, {os.cpu_count()} cores) at start / end: "
            f"{load_start:.2f} / {load_end:.2f}" + (" - the CPU was shared, timings are noisy." if max(load_start, load_end)
                                                     > 1.5 else "."))
    publish_table(rows, COLUMNS, name="graph_restoration", title=title, argv=argv, out_dir=args.out, device=device,
                  note=note)
    failed = [f"{n}@{s}" for n, s, ok in verdicts if not ok and not n.startswith("swin")]
    if failed:
        print(f"graph models not linear at: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
