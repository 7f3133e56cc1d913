"""Cached decoding speed of the causal LMs at equal parameters: tokens/s and FLOP/s of ``generate`` for every
registered LM variant (a user's own with ``--import``) against HF's GPT-2.

    python -m benchmarks.lm_decoding                       # CPU, the quick preset's sizes; writes benchmarks/results/
    python -m benchmarks.lm_decoding --device cuda --width 768 --heads 12 --depth 12 --vocab gpt2 --batches 1,8

Each variant has GPT-2's width and heads and the layer count whose stack matches GPT-2's parameters at
``--depth`` layers (``model.match_params=gpt2``). A run is greedy ``generate`` of ``--new-tokens`` tokens (no early
stop) after a random prompt of ``--prompt`` tokens, with the layer-owned cache (``use_cache=True``); the time is the
median over ``--repeats`` after one warm-up, the variants of one batch size timed in turn (interleaved), so a change
of machine load reaches them alike. ``mflop_per_token`` is torch's FlopCounterMode (SDPA on its math backend, so
attention counts: ``benchmarks.common.counting_flops``) over one whole ``generate`` divided by the tokens it
produced (prompt prefill included, a small share at 128 new tokens), so ``gflop_per_s`` compares how well each
variant turns its arithmetic into decoding speed; ``ops_per_token`` counts the tensor operations the dispatcher runs
over the same ``generate`` per new token position (one step decodes the whole batch; prefill included; at small
widths their fixed cost, not the FLOPs, sets the speed); ``decode`` says whether its attention extends the output
from stored state (``cached``) or recomputes the prefix (``recomputes``). ``--caches``
picks HF's cache implementations: ``dynamic`` (the default of ``generate``) grows every layer's keys and values by
concatenation, a copy of the whole prefix per layer and token, which a deep stack pays per layer; ``static``
preallocates them and writes each new token in place (GPT-2's attention then reads every slot, masked).
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import unrollattn  # noqa: F401 (registers the models)
from benchmarks.common import (
    VOCABS, add_lm_arguments, benchmark_settings, build_matched_lm, counting_flops, device_name, publish_table,
    selected_lm_variants, time_interleaved,
)
from unrollattn.registry import import_modules
from unrollattn.utils.params import count_parameters

COLUMNS = ["variant", "layers", "width", "params", "decode", "cache", "batch", "new_tokens", "seconds", "tokens_per_s",
           "tokens_per_s_vs_gpt2", "ops_per_token", "mflop_per_token", "gflop_per_s", "flop_per_s_vs_gpt2"]


CACHES = ("dynamic", "static")


def decodes_from_cache(model) -> bool:
    """Whether every block of ``model`` extends its output from stored state (HF's GPT-2 blocks do; an unrollattn
    block says so through ``decode_recomputes_prefix``)."""
    blocks = [getattr(layer, "block", layer) for layer in model.transformer.h]  # UnrollAttnBlock wraps a registry block
    return not any(getattr(block, "decode_recomputes_prefix", False) for block in blocks)


def prepare(label: str, batch: int, cache: str, args, device: torch.device):
    """The model ``label`` and a call that runs one timed ``generate`` of it on a fixed random prompt with HF's
    ``cache`` implementation."""
    torch.manual_seed(0)
    vocab, eos = VOCABS[args.vocab]
    model = build_matched_lm(label, width=args.width, heads=args.heads, depth=args.depth, vocab=args.vocab,
                             n_positions=args.prompt + args.new_tokens).to(device).eval()
    prompt = torch.randint(0, vocab - 1, (batch, args.prompt), device=device)
    generate = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                    pad_token_id=eos, cache_implementation=cache)

    def run():
        with torch.inference_mode():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **generate)
        if out.shape[1] != args.prompt + args.new_tokens:
            raise RuntimeError(f"{label}: generate returned {out.shape[1] - args.prompt} new tokens, expected "
                               f"{args.new_tokens}")

    return model, run


class _OpCounter(TorchDispatchMode):
    """Counts the tensor operations dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def describe(label: str, model, run, seconds: float, batch: int, cache: str, args) -> dict:
    """The table row of one variant: its timing, and the FLOPs (FlopCounterMode) and dispatched operations of two
    more ``generate`` calls."""
    ops = _OpCounter()
    with counting_flops() as counter:
        run()
    with ops:
        run()
    produced = batch * args.new_tokens
    tokens_per_s = produced / seconds
    flop_per_token = counter.get_total_flops() / produced
    return {"variant": label, "layers": model.config.n_layer, "width": args.width, "params": count_parameters(model),
            "decode": "cached" if decodes_from_cache(model) else "recomputes", "cache": cache, "batch": batch,
            "new_tokens": args.new_tokens, "seconds": seconds, "tokens_per_s": tokens_per_s,
            "ops_per_token": ops.count / args.new_tokens, "mflop_per_token": flop_per_token / 1e6,
            "gflop_per_s": tokens_per_s * flop_per_token / 1e9}


@benchmark_settings
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
    add_lm_arguments(parser)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--caches", default="dynamic,static", help="HF cache implementations, comma-separated: "
                        f"{', '.join(CACHES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import_modules(args.imports)
        labels = ["gpt2"] + [v for v in selected_lm_variants(args.variants) if v != "gpt2"]
        batches = [int(b) for b in args.batches.split(",")]
        caches = [c.strip() for c in args.caches.split(",") if c.strip()]
        if not caches or any(c not in CACHES for c in caches):
            raise ValueError(f"--caches: expected a comma-separated subset of {', '.join(CACHES)}, got {args.caches!r}")
    except ValueError as err:
        parser.error(str(err))
    rows = []
    for cache, batch in ((c, b) for c in caches for b in batches):
        prepared = {label: prepare(label, batch, cache, args, device) for label in labels}
        seconds = time_interleaved({label: run for label, (_, run) in prepared.items()}, device, warmup=1,
                                   repeats=args.repeats)
        group = []
        for label, (model, run) in prepared.items():
            row = describe(label, model, run, seconds[label], batch, cache, args)
            group.append(row)
            print(f"{label:>16s} {cache} cache, batch {batch}: {row['tokens_per_s']:9,.0f} tok/s  "
                  f"{row['gflop_per_s']:8.2f} GFLOP/s  {row['ops_per_token']:6.1f} ops/token  ({row['decode']})",
                  flush=True)
        del prepared
        for row in group:
            row["tokens_per_s_vs_gpt2"] = row["tokens_per_s"] / group[0]["tokens_per_s"]
            row["flop_per_s_vs_gpt2"] = row["gflop_per_s"] / group[0]["gflop_per_s"]
        rows.extend(group)
    title = (f"Cached decoding ({args.new_tokens} new tokens after a {args.prompt}-token prompt, greedy), "
             f"{device_name(device)}, float32, torch {torch.__version__}, width {args.width}, GPT-2 depth {args.depth}, "
             f"vocab {args.vocab}")
    publish_table(rows, COLUMNS, name="lm_decoding", title=title, argv=argv, out_dir=args.out, device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
