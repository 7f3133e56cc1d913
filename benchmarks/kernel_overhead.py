"""Overhead of the kernel-regression attention layers (docs/papers.md C) over the SDPA softmax baseline:
forward+backward time and peak memory of one layer, ``gaussian``, ``mahalanobis``, ``bilateral`` and
``twicing`` vs ``mhsa``, at several sequence lengths and widths.

    python -m benchmarks.kernel_overhead                      # CPU defaults, writes benchmarks/results/
    python -m benchmarks.kernel_overhead --device cuda --tokens-per-batch 65536 --widths 384:6,768:12

Equal width, heads and qkv bias for every variant; tokens per batch fixed, so every row does the same
projection work and differences come from the attention itself. Bilateral attention gets the 2-D patch
grid of a square image when the length is a square (64 = 8x8, 256 = 16x16, 1024 = 32x32; no class token),
1-D token indices otherwise; its spatial log-kernel [H, N, N] is computed on every forward. ``overhead``
is time / time(mhsa) at the same shape; CPU memory counts the tensors the dispatcher sees (the attention
matrix inside a fused SDPA kernel is not one of them), CUDA memory is the allocator's peak.
"""
from __future__ import annotations

import argparse
import math

import torch

import unrollattn
from benchmarks.common import device_name, measure_layer, print_row, publish_table, without_finite_checks

VARIANTS = ("mhsa", "gaussian", "mahalanobis", "bilateral", "twicing")
COLUMNS = ["width", "heads", "seq_len", "batch", "variant", "params", "fwd_bwd_ms", "tokens_per_s",
           "time_vs_mhsa", "peak_mem_mb", "mem_vs_mhsa"]


def build_layer(variant: str, dim: int, heads: int, seq_len: int) -> torch.nn.Module:
    """``variant`` at width ``dim`` with ``heads`` heads (qkv bias as in ViT); bilateral gets the square grid of
    ``seq_len`` tokens when there is one."""
    layer = unrollattn.build_attention(variant, dim, heads, qkv_bias=True)
    side = math.isqrt(seq_len)
    if variant == "bilateral" and side * side == seq_len:
        layer.set_geometry((side, side), num_prefix_tokens=0)
    return layer


def measure(variant: str, dim: int, heads: int, seq_len: int, batch: int, device, dtype, repeats: int) -> dict:
    torch.manual_seed(0)
    return measure_layer(build_layer(variant, dim, heads, seq_len), variant, dim, heads, seq_len, batch, device, dtype,
                         repeats)


def parse_widths(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        try:
            dim, heads = (int(v) for v in item.split(":"))
        except ValueError:
            raise ValueError(f"--widths: expected width:heads pairs such as 192:3,384:6, got {item!r}") from None
        if dim < 1 or heads < 1 or dim % heads:
            raise ValueError(f"--widths: width {dim} must be a positive multiple of heads {heads}")
        pairs.append((dim, heads))
    return pairs


@without_finite_checks
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--widths", default="192:3,384:6", help="width:heads pairs")
    parser.add_argument("--seq-lens", default="64,256,1024")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="mhsa is always measured (the baseline)")
    parser.add_argument("--tokens-per-batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype)
    variants = ["mhsa"] + [v for v in (s.strip() for s in args.variants.split(",")) if v and v != "mhsa"]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    try:
        widths = parse_widths(args.widths)
        seq_lens = [int(n) for n in args.seq_lens.split(",")]
    except ValueError as err:
        parser.error(str(err))
    rows = []
    for dim, heads in widths:
        for seq_len in seq_lens:
            batch = max(1, args.tokens_per_batch // seq_len)
            group = [measure(v, dim, heads, seq_len, batch, device, dtype, args.repeats) for v in variants]
            base = group[0]
            for r in group:
                r["time_vs_mhsa"] = r["fwd_bwd_ms"] / base["fwd_bwd_ms"]
                r["mem_vs_mhsa"] = r["peak_mem_mb"] / base["peak_mem_mb"] if base["peak_mem_mb"] > 0 else math.nan
                print_row(r, COLUMNS)
            rows.extend(group)
    title = (f"Kernel attention overhead vs SDPA softmax (mhsa), one layer forward+backward, {device_name(device)}, "
             f"{args.dtype}, torch {torch.__version__}, {args.tokens_per_batch} tokens per batch")
    publish_table(rows, COLUMNS, name="kernel_overhead", title=title, argv=argv, out_dir=args.out, device=device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
