"""Forward+backward throughput and peak memory of one attention layer: mssa vs mhsa vs timm Attention.

    python -m benchmarks.attention_throughput                  # CPU defaults, writes benchmarks/results/
    python -m benchmarks.attention_throughput --device cuda --tokens-per-batch 65536

Equal width and heads for every variant, no biases in the input projections; tokens per batch fixed
so every row does the same amount of projection work.
"""
from __future__ import annotations

import argparse

import torch
from timm.layers import Attention as TimmAttention

import unrollattn
from benchmarks.common import device_name, measure_layer, print_row, publish_table, without_finite_checks

VARIANTS = {
    "mssa": lambda dim, heads: unrollattn.build_attention("mssa", dim, heads),
    "mhsa": lambda dim, heads: unrollattn.build_attention("mhsa", dim, heads),
    "timm_attention": lambda dim, heads: TimmAttention(dim, num_heads=heads),
}
COLUMNS = ["width", "heads", "seq_len", "batch", "variant", "params", "fwd_bwd_ms", "tokens_per_s",
           "speedup_vs_mhsa", "peak_mem_mb"]


def measure(variant: str, dim: int, heads: int, seq_len: int, batch: int, device, dtype, repeats: int) -> dict:
    torch.manual_seed(0)
    return measure_layer(VARIANTS[variant](dim, heads), variant, dim, heads, seq_len, batch, device, dtype, repeats)


@without_finite_checks
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--widths", default="192:3,384:6,768:12", help="width:heads pairs")
    parser.add_argument("--seq-lens", default="64,256,1024")
    parser.add_argument("--tokens-per-batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for pair in args.widths.split(","):
        dim, heads = (int(v) for v in pair.split(":"))
        for seq_len in (int(n) for n in args.seq_lens.split(",")):
            batch = max(1, args.tokens_per_batch // seq_len)
            group = [measure(v, dim, heads, seq_len, batch, device, dtype, args.repeats) for v in VARIANTS]
            base = next(r for r in group if r["variant"] == "mhsa")["tokens_per_s"]
            for r in group:
                r["speedup_vs_mhsa"] = r["tokens_per_s"] / base
                print_row(r, COLUMNS)
            rows.extend(group)
    title = (f"Attention layer forward+backward, {device_name(device)}, {args.dtype}, torch {torch.__version__}, "
             f"{args.tokens_per_batch} tokens per batch")
    publish_table(rows, COLUMNS, name="attention_throughput", title=title, argv=argv, out_dir=args.out, device=device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
