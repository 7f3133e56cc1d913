"""Forward+backward time and peak memory of one attention layer, for every registered attention (a user's own,
registered in a module named with ``--import``, included) against a baseline (``mhsa``: SDPA softmax) and timm's
own ``Attention`` (and, with ``--flex`` on CUDA, softmax attention through FlexAttention).

    python -m benchmarks.attention_throughput                          # CPU defaults, writes benchmarks/results/
    python -m benchmarks.attention_throughput --attentions mhsa,gaussian,mahalanobis,bilateral,twicing --qkv-bias
    python -m benchmarks.attention_throughput --device cuda --tokens-per-batch 65536 --widths 384:6,768:12

Equal width and heads for every layer; tokens per batch fixed, so every row does the same projection work and the
differences come from the attention itself. A length that is a square is laid out as the 2-D patch grid of a square
image (64 = 8x8, 256 = 16x16, 1024 = 32x32; no class token), which the layers that use geometry (bilateral's spatial
kernel, the glr/gtv graphs) read; other lengths are 1-D sequences. ``--causal`` lays every length out as a 1-D causal
sequence, as a language model calls its attention (timm's ``Attention`` has no causal flag and is left out).
``time_vs_baseline`` / ``mem_vs_baseline`` are ratios to the baseline at the same shape; the layers of one shape are
timed in turn, a step each per round, so a change of machine load during the run reaches the baseline and every
attention alike. CPU memory counts the tensors the dispatcher sees (the attention matrix inside a fused SDPA kernel
is not one of them); CUDA memory is the allocator's peak.
"""
from __future__ import annotations

import argparse
import math

import torch
from timm.layers import Attention as TimmAttention

import unrollattn
from benchmarks.common import benchmark_settings, device_name, measure_layers, print_row, publish_table
from unrollattn.registry import import_modules, list_attentions

TIMM_REFERENCE = "timm_attention"  # timm.layers.Attention, the field's reference implementation (not registered)
FLEX_REFERENCE = "flex_softmax"  # softmax attention through torch's compiled FlexAttention (CUDA: backward)


class FlexSoftmaxAttention(torch.nn.Module):
    """Softmax self-attention with mhsa's projections, its scores through ``flex_attention`` (compiled once)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = False):
        super().__init__()
        from torch.nn.attention.flex_attention import flex_attention

        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = torch.nn.Linear(dim, dim)
        self.attend = torch.compile(flex_attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(self.attend(q, k, v).transpose(1, 2).reshape(b, n, c))
COLUMNS = ["width", "heads", "seq_len", "batch", "attention", "params", "fwd_bwd_ms", "tokens_per_s",
           "time_vs_baseline", "peak_mem_mb", "mem_vs_baseline"]


def build_layer(attention: str, dim: int, heads: int, seq_len: int, *, qkv_bias: bool = False,
                causal: bool = False) -> torch.nn.Module:
    """Registered ``attention`` (or timm's reference) at width ``dim`` with ``heads`` heads, given the square grid
    of ``seq_len`` tokens when there is one and the layout is not ``causal`` (1-D)."""
    if attention == TIMM_REFERENCE:
        return TimmAttention(dim, num_heads=heads, qkv_bias=qkv_bias)
    if attention == FLEX_REFERENCE:
        return FlexSoftmaxAttention(dim, heads, qkv_bias)
    layer = unrollattn.build_attention(attention, dim, heads, qkv_bias=qkv_bias)
    side = math.isqrt(seq_len)
    if side * side == seq_len and not causal:
        layer.set_geometry((side, side), num_prefix_tokens=0)
    return layer


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


def selected_attentions(text: str, baseline: str, timm_reference: bool, flex_reference: bool = False) -> list[str]:
    """The baseline first, then the named attentions (default: every registered one), then the references."""
    registered = list_attentions()
    names = [n.strip() for n in text.split(",") if n.strip()] if text else registered
    unknown = [n for n in [baseline, *names] if n not in registered]
    if unknown:
        raise ValueError(f"unknown attention(s) {', '.join(unknown)}; registered: {', '.join(registered)}")
    ordered = [baseline] + [n for n in dict.fromkeys(names) if n != baseline]
    return ordered + ([TIMM_REFERENCE] if timm_reference else []) + ([FLEX_REFERENCE] if flex_reference else [])


@benchmark_settings
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attentions", default="", help="comma-separated registered attentions (default: all)")
    parser.add_argument("--baseline", default="mhsa", help="the attention every ratio is relative to")
    parser.add_argument("--no-timm", dest="timm_reference", action="store_false",
                        help="leave out timm.layers.Attention")
    parser.add_argument("--flex", action="store_true", help="add softmax attention through FlexAttention (CUDA only: "
                        "torch 2.14 has no FlexAttention backward on CPU)")
    parser.add_argument("--qkv-bias", action="store_true", help="biases in the input projections (as in ViT)")
    parser.add_argument("--causal", action="store_true", help="1-D causal sequences, as a language model attends "
                        "(leaves out timm's Attention, which has no causal flag)")
    parser.add_argument("--import", dest="imports", default="", metavar="MODULES",
                        help="comma-separated modules to import first (e.g. one registering your own attention)")
    parser.add_argument("--widths", default="192:3,384:6", help="width:heads pairs")
    parser.add_argument("--seq-lens", default="64,256,1024")
    parser.add_argument("--tokens-per-batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype)
    try:
        import_modules(args.imports)
        if args.flex and device.type != "cuda":
            raise ValueError("--flex: FlexAttention's backward needs a CUDA device (torch 2.14 has none on CPU)")
        if args.flex and args.causal:
            raise ValueError("--flex: the FlexAttention softmax reference is non-causal; leave out --causal or --flex")
        attentions = selected_attentions(args.attentions, args.baseline, args.timm_reference and not args.causal,
                                         args.flex)
        widths = parse_widths(args.widths)
        seq_lens = [int(n) for n in args.seq_lens.split(",")]
    except ValueError as err:
        parser.error(str(err))
    rows = []
    # the first layer measured in a process pays one-off costs (thread pool, allocator, first dispatch): a discarded
    # run of the baseline at the first shape keeps them out of every ratio
    layout = dict(qkv_bias=args.qkv_bias, causal=args.causal)
    measure_layers({attentions[0]: build_layer(attentions[0], *widths[0], seq_lens[0], **layout)}, *widths[0],
                   seq_lens[0], max(1, args.tokens_per_batch // seq_lens[0]), device, dtype, 1, args.causal)
    for dim, heads in widths:
        for seq_len in seq_lens:
            batch = max(1, args.tokens_per_batch // seq_len)
            layers = {}
            for name in attentions:
                torch.manual_seed(0)
                layers[name] = build_layer(name, dim, heads, seq_len, **layout)
            group = measure_layers(layers, dim, heads, seq_len, batch, device, dtype, args.repeats, args.causal)
            for row in group:
                row["attention"] = row.pop("variant")
            base = group[0]
            for r in group:
                r["time_vs_baseline"] = r["fwd_bwd_ms"] / base["fwd_bwd_ms"]
                r["mem_vs_baseline"] = r["peak_mem_mb"] / base["peak_mem_mb"] if base["peak_mem_mb"] > 0 else math.nan
                print_row(r, COLUMNS)
            rows.extend(group)
    title = (f"One attention layer forward+backward vs {args.baseline}, {device_name(device)}, {args.dtype}, "
             f"torch {torch.__version__}, {args.tokens_per_batch} tokens per batch"
             + (", qkv bias" if args.qkv_bias else "") + (", causal 1-D sequences" if args.causal else ""))
    publish_table(rows, COLUMNS, name="attention_throughput", title=title, argv=argv, out_dir=args.out, device=device,
                  variant="causal" if args.causal else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
