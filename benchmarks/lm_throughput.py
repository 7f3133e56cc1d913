"""Training throughput and MFU of the causal LMs at equal parameters: GPT-2 vs AoT-MHSA vs AoT-MSSA vs CRATE (paper
ISTA and CRATE-alpha sparse coding) vs the GPT-2-shaped kernel-attention LMs (bilateral, gaussian, twicing).

    python -m benchmarks.lm_throughput                      # CPU, the quick preset's sizes; writes benchmarks/results/
    python -m benchmarks.lm_throughput --device cuda --dtype bfloat16 --width 768 --heads 12 --depth 12 \\
        --seq-len 1024 --batch 8 --vocab gpt2 --peak-tflops 989

One training step = forward, cross-entropy, backward and an AdamW update, timed with ``benchmarks.common.time_call``.
Every variant (a registered variant, or ``attention-block``) has the same width and heads and the layer count whose
layer stack has the parameters of GPT-2 at ``--depth`` (``model.match_params=gpt2``, computed on the meta device). FLOPs per token, two ways:

- ``6N + attn`` (the PaLM / nanoGPT convention): 6 x the matmul parameters N (all weights except the position
  embedding; the tied token embedding counts once, as the LM head) plus 12 x layers x attention width x sequence
  length for the attention scores and weighted sums (no causal discount). MFU uses this number.
- ``counted``: ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward with SDPA on its math
  backend (so attention is plain matmuls the counter sees; causal masking is not discounted either). CRATE's ISTA
  applies its dictionary twice, which ``6N`` does not see.

The peak is ``--peak-tflops`` when given; on CUDA a table of known dense bf16 peaks; on CPU an *estimate*: threads x
clock (/proc/cpuinfo) x FP32 FLOPs per cycle (2 FMA units x SIMD width: 32 for AVX2, 64 for AVX-512), labelled so.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import unrollattn  # noqa: F401 (registers the models)
from benchmarks.common import (
    VOCABS, add_lm_arguments, benchmark_settings, build_matched_lm, counting_flops, device_name, peak_memory_mb,
    publish_table, selected_lm_variants, time_call,
)
from unrollattn.registry import import_modules
from unrollattn.utils.params import count_parameters

COLUMNS = ["variant", "mode", "layers", "params", "non_emb_params", "seq_len", "batch", "step_ms", "tokens_per_s",
           "mflop_per_token_6n", "mflop_per_token_counted", "achieved_gflops", "pct_of_matmul_peak",
           "pct_vs_gpt2", "pct_of_peak_counted", "pct_vs_gpt2_counted", "mfu_pct", "peak_mem_mb"]
# dense bf16 tensor-core peaks (TFLOPS), by a substring of torch.cuda.get_device_name()
CUDA_PEAK_BF16 = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
                  "L4": 121.0, "RTX 4090": 165.0}


def cpu_peak_estimate() -> tuple[float, str]:
    """(GFLOPS, description): threads x clock x FP32 FLOPs per cycle per core, from /proc/cpuinfo."""
    threads = torch.get_num_threads()
    ghz, flags, model = None, set(), "CPU"
    try:
        info = Path("/proc/cpuinfo").read_text()
        mhz = re.findall(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)
        ghz = max(float(m) for m in mhz) / 1000 if mhz else None
        flag_line = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
        flags = set(flag_line.group(1).split()) if flag_line else set()
        name = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
        model = name.group(1).strip() if name else model
    except OSError:
        pass
    ghz = ghz or 2.5
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16 if "avx" in flags else 8
    isa = "AVX-512" if per_cycle == 64 else "AVX2+FMA" if per_cycle == 32 else "AVX" if per_cycle == 16 else "SSE"
    gflops = threads * ghz * per_cycle
    return gflops, (f"CPU estimate for {model}: {threads} threads x {ghz:.2f} GHz x {per_cycle} FP32 FLOP/cycle "
                    f"({isa}, 2 FMA units assumed) = {gflops:.0f} GFLOPS")


def measured_matmul_gflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """GFLOP/s of a square ``size`` x ``size`` matmul in ``dtype`` on ``device``: the peak this run can reach."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    seconds = time_call(lambda: a @ b, device, warmup=2, repeats=repeats)
    return 2 * size ** 3 / seconds / 1e9


def peak_gflops(device: torch.device, given_tflops: float | None) -> tuple[float, str]:
    if given_tflops:
        return given_tflops * 1e3, f"given: {given_tflops:g} TFLOPS"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in CUDA_PEAK_BF16.items():
            if key in name:
                return tflops * 1e3, f"{name}: dense bf16 peak {tflops:g} TFLOPS (datasheet)"
        raise SystemExit(f"unknown peak for {name}: pass --peak-tflops")
    return cpu_peak_estimate()


def _position_params(model) -> int:
    """Learned position-embedding parameters (0 for ``position_embedding="none"``, e.g. bilateral attention)."""
    wpe = getattr(model.transformer, "wpe", None)
    return 0 if wpe is None else wpe.weight.numel()


def flops_per_token_6n(model, seq_len: int) -> tuple[float, int]:
    """(6N + 12 L d_attn T, N) with N = all parameters but the position embedding."""
    cfg = model.config
    wpe = _position_params(model)
    n = count_parameters(model) - wpe
    d_attn = cfg.n_head * (getattr(cfg, "head_dim", None) or cfg.n_embd // cfg.n_head)
    return 6 * n + 12 * cfg.n_layer * d_attn * seq_len, n


def counted_flops_per_token(model, x: torch.Tensor) -> float:
    with counting_flops() as counter:
        logits = model(input_ids=x).logits
        F.cross_entropy(logits.float().flatten(0, 1), x.flatten()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.numel()


def measure(variant: str, args, device: torch.device, dtype: torch.dtype, peak: float, matmul_peak: float,
            compiled: bool = False) -> dict:
    torch.manual_seed(0)
    vocab = VOCABS[args.vocab][0]
    model = build_matched_lm(variant, width=args.width, heads=args.heads, depth=args.depth, vocab=args.vocab,
                             n_positions=args.seq_len).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randint(0, vocab - 1, (args.batch, args.seq_len), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    torch._dynamo.reset()
    forward = torch.compile(model, backend=args.compile_backend) if compiled else model

    def step():
        with autocast:
            logits = forward(input_ids=x).logits
        F.cross_entropy(logits.float().flatten(0, 1)[:-1], x.flatten()[1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = time_call(step, device, warmup=2, repeats=args.repeats)
    flops_6n, _ = flops_per_token_6n(model, args.seq_len)
    counted = counted_flops_per_token(model, x[:1]) if args.count_flops else float("nan")
    tokens_per_s = args.batch * args.seq_len / seconds
    params = count_parameters(model)
    emb = model.transformer.wte.weight.numel() + _position_params(model)
    achieved = tokens_per_s * flops_6n / 1e9
    return {
        "variant": variant, "mode": "compiled" if compiled else "eager", "layers": model.config.n_layer,
        "width": args.width, "heads": args.heads, "params": params, "non_emb_params": params - emb,
        "seq_len": args.seq_len, "batch": args.batch, "step_ms": seconds * 1e3, "tokens_per_s": tokens_per_s,
        "mflop_per_token_6n": flops_6n / 1e6, "mflop_per_token_counted": counted / 1e6, "achieved_gflops": achieved,
        "pct_of_matmul_peak": 100 * achieved / matmul_peak, "mfu_pct": 100 * achieved / peak,
        "pct_of_peak_counted": 100 * tokens_per_s * counted / 1e9 / matmul_peak,
        "peak_mem_mb": peak_memory_mb(step, device),
    }


@benchmark_settings
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_lm_arguments(parser)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak of the device (default: see doc)")
    parser.add_argument("--no-count-flops", dest="count_flops", action="store_false")
    parser.add_argument("--modes", default="eager", help="eager and/or compiled (torch.compile), comma-separated")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled mode")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmul measuring the peak")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import_modules(args.imports)
        variants = selected_lm_variants(args.variants)
    except ValueError as err:
        parser.error(str(err))
    peak, peak_text = peak_gflops(device, args.peak_tflops)
    matmul_peak = measured_matmul_gflops(device, dtype, args.matmul_size)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"eager", "compiled"}:
        parser.error(f"--modes: expected eager and/or compiled, got {args.modes!r}")
    rows = []
    for mode in modes:
        group = []
        for variant in variants:
            row = measure(variant, args, device, dtype, peak, matmul_peak, compiled=mode == "compiled")
            group.append(row)
            print(f"{variant:9s} {mode:8s} {row['layers']:3d} layers  {row['tokens_per_s']:10,.0f} tok/s  "
                  f"{row['pct_of_matmul_peak']:.1f}% of the matmul peak", flush=True)
        reference = next((r for r in group if r["variant"] == "gpt2"), None)
        for row in group:  # points of the matmul peak above (+) or below (-) GPT-2's, same mode
            for pct, vs in (("pct_of_matmul_peak", "pct_vs_gpt2"), ("pct_of_peak_counted", "pct_vs_gpt2_counted")):
                row[vs] = row[pct] - reference[pct] if reference else math.nan
        rows.extend(group)
    title = f"Causal LM training throughput, {device_name(device)}, {args.dtype}, vocab {args.vocab}"
    note = (f"Measured matmul peak of this run: {matmul_peak:,.1f} GFLOP/s ({args.matmul_size}^3 {args.dtype} "
            f"matmul; pct_of_matmul_peak = achieved / it, pct_vs_gpt2 = points against GPT-2's in the same mode). "
            f"MFU: against {peak_text}. FLOPs per token: 6N + 12 L d T (PaLM convention; N = weights without the "
            f"position embedding); the counted column is torch's FlopCounterMode over forward + backward, and "
            f"pct_of_peak_counted the hardware's share from it: 6N counts a weight once per token, so it misses the work "
            f"of a weight used twice (CRATE's ISTA step applies D and D^T) or of a second attention pass (twicing). "
            f"compiled = torch.compile(model, backend={args.compile_backend!r}).")
    publish_table(rows, COLUMNS, name="lm_throughput", title=title, argv=argv, out_dir=args.out, device=device,
                  note=note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
